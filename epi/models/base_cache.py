"""The cached `tiny-base` models: where each lives, and what its pre-training left beside the weights.

A base is the tiny model pre-trained on a general mix of the abilities (built by
epi.experiments.base_build; `python -m epi base`). It is cached per seed under a key of the settings
that shape it, so a change of them (or of the task formats) builds a new one. This module only finds
and reads a cached base: it never builds one.

`cfg` below is an experiment config (epi.experiments.profiles.ExperimentConfig) or anything with its
base fields: seed, base_steps, base_lr, base_batch_size, difficulty, train_records, max_length, beta
(which decays' importance it records: `base_betas`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional

import torch

from ..tasks import ABILITIES, generate
from .factory import cache_root


# EMA decays whose base-phase importance every base records: the suite's default and notebook 06's sweep. The
# weights do not depend on β (tracking protects nothing), so one base serves all of them; another β gets a base
# of its own that records it too.
BASE_BETAS = (0.9, 0.99, 0.999)


def base_betas(cfg) -> tuple:
    """Return the EMA decays whose importance the base of `cfg` records (BASE_BETAS, plus cfg.beta if another)."""
    return tuple(sorted(set(BASE_BETAS) | {float(cfg.beta)}))


def base_key(cfg) -> str:
    """Return the cache key of a base: a hash of the settings that shape it and of a sample of its data."""
    # a fingerprint of the generated data, so a change of the task formats invalidates the cache
    sample = [generate(t, 3, seed=cfg.seed, split="train", difficulty=cfg.difficulty) for t in ABILITIES]
    fields = dict(seed=cfg.seed, steps=cfg.base_steps, lr=cfg.base_lr, batch=cfg.base_batch_size, difficulty=cfg.difficulty,
                  records=cfg.train_records, max_length=cfg.max_length, version=2, data=sample)
    if float(cfg.beta) not in BASE_BETAS:
        fields["betas"] = base_betas(cfg)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def base_dir(cfg, cache_dir: Optional[str] = None) -> Path:
    """Return the cache folder of the base model for this config's base settings and seed."""
    return cache_root(cache_dir) / "base" / f"tiny-base-s{cfg.seed}-{base_key(cfg)}"


def beta_key(beta: float) -> str:
    """Return the key of one EMA decay in a base's importance file (e.g. "0.99")."""
    return f"{float(beta):g}"


def load_base_importance(folder: Path, beta: float) -> Dict[str, Dict[str, torch.Tensor]]:
    """Return the base phase's importance at EMA decay `beta`: {"global" | task: {param name: EMA of g²}}."""
    by_beta = torch.load(Path(folder) / "importance.pt", map_location="cpu", weights_only=True)
    if beta_key(beta) not in by_beta:
        raise KeyError(f"the base at {folder} recorded importance at β in {sorted(by_beta)}, not {beta_key(beta)}: "
                       "a base built for this β has another cache key (epi.models.base_cache.base_key)")
    return by_beta[beta_key(beta)]


def base_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / "meta.json").read_text())

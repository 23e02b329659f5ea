"""`tiny-base`: the tiny model pre-trained on a general mix of the five abilities — the CPU stand-in for the
paper's pretrained LLM (sequential SFT from a random init forgets everything; docs/CPU_FINDINGS.md, Q2).

  python -m epi base --profile cpu --seed S     # minutes on 2 cores (2000 steps); cached per seed

A run's base is the one of its `base_seed` (`ExperimentConfig.start_seed`; None = the run's seed): the cpu
profile sets base_seed=0, so its training seeds share one base.

The cache itself (where a base lives, reading its importance) is epi.models.base_cache; the model
factory only loads a base, this module builds one.

While pre-training, the base phase tracks the importance (EMA of g²) globally and per task without
isolating anything, so SFT runs can start EPI and EWC from what the base model found important. It does so at
every decay of `base_betas` (0.9, 0.99, 0.999 and the config's own), so runs that differ only in β share a base.

The build runs on the config's device in fp32 whatever the run's precision (the cache key holds neither:
a base is the start model, shared by every run of a base seed, and fp32 on a GPU is quick at this size).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..engine.config import EPIConfig
from ..engine.core import isolatable
from ..engine.importance import ImportanceTracker
from ..jsonio import atomic_write
from ..models.base_cache import base_betas, base_dir, beta_key
from ..models.factory import load_model, save_model
from ..tasks import ABILITIES, evaluate
from ..training.data import StepData, balanced_schedule, eval_records, make_batchers
from ..training.device import describe, resolve_device, solo_threads
from ..training.loop import TrackImportance, TrainConfig, make_optimizer, seed_everything, train_steps
from .profiles import resolve

log = logging.getLogger(__name__)

# the base's data order: its own stream, apart from the SFT runs' stage schedules (epi.experiments.runner)
BASE_SCHEDULE_SEED_OFFSET = 7919


def base_config(cfg):
    """Return the config the base of `cfg` is built from: `cfg` with seed = its base seed (base_seed, else seed)
    and base_seed cleared, so that a base is keyed, seeded and named by its own seed only."""
    if getattr(cfg, "base_seed", None) is None:
        return cfg
    return dataclasses.replace(cfg, seed=cfg.base_seed, base_seed=None)


def build_base(cfg, cache_dir: Optional[str] = None, progress: bool = True) -> Path:
    """Pre-train the tiny model on a balanced mix of all abilities and cache it; return its folder."""
    cfg = base_config(cfg)
    out = base_dir(cfg, cache_dir)
    t0 = time.time()
    # The build runs alone (runners build bases before their workers start), so it takes every core: the weights
    # do not depend on the thread count — a 2-thread cpu-profile build (2,000 steps) equals the 1-thread one bit
    # for bit in weights, importance and scores on this suite's x86-64 CPU, in 353 s instead of 555 s
    # (tests/test_base_seed.py checks a short build). Restored afterwards: the caller's runs keep their threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(build_threads(cfg))
    try:
        return _build(cfg, out, t0, progress)
    finally:
        torch.set_num_threads(threads)


def build_threads(cfg) -> int:
    """Return the threads a base build uses (`solo_threads`: every core, at least the profile's own)."""
    return solo_threads(cfg.threads)


def _build(cfg, out: Path, t0: float, progress: bool) -> Path:
    seed_everything(cfg.seed)
    model, tok = load_model("tiny", seed=cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    tasks = list(ABILITIES)
    batchers = make_batchers(tok, tasks, n=cfg.train_records, seed=cfg.seed, batch_size=cfg.base_batch_size,
                             max_length=cfg.max_length, difficulty=cfg.difficulty)
    per_task = -(-cfg.base_steps // len(tasks))
    schedule = balanced_schedule(tasks, per_task, seed=cfg.seed + BASE_SCHEDULE_SEED_OFFSET)[:cfg.base_steps]
    data = StepData(batchers, schedule)
    opt = make_optimizer(model, TrainConfig(lr=cfg.base_lr, weight_decay=cfg.weight_decay))
    params = [p for _, p in isolatable(model, EPIConfig())]
    names = [n for n, _ in isolatable(model, EPIConfig())]
    # one global and one per-task tracker per EMA decay: runs at any of base_betas(cfg) share this base
    trackers = {beta_key(b): (ImportanceTracker(params, EPIConfig(score="fisher", beta=b, scope="global")),
                              ImportanceTracker(params, EPIConfig(score="fisher", beta=b, scope="per_task")))
                for b in base_betas(cfg)}

    state = train_steps(model, opt, data, steps=len(data), plugins=[TrackImportance(g, p) for g, p in trackers.values()],
                        clip=cfg.clip, desc="tiny-base" if progress else None)
    scores = evaluate(model, tok, {t: eval_records(t, cfg.eval_records, cfg.difficulty) for t in tasks})
    importance = {key: {"global": {n: b.cpu() for n, b in zip(names, glob.buffers["global"])},
                        **{t: {n: b.cpu() for n, b in zip(names, bufs)} for t, bufs in per.buffers.items()}}
                  for key, (glob, per) in trackers.items()}
    meta: dict = {}

    def write(folder: Path) -> None:
        save_model(model, tok, folder)
        torch.save(importance, folder / "importance.pt")
        meta.update({"command": f"python -m epi base --profile {cfg.profile} --seed {cfg.seed}", "seed": cfg.seed,
                     "importance_betas": list(trackers),
                     "steps": cfg.base_steps, "lr": cfg.base_lr, "tasks": tasks, "scores": scores,
                     "final_loss": sum(state.losses[-50:]) / len(state.losses[-50:]),
                     "wall_s": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
                     "device": describe(device)})
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))

    # a parallel builder never sees a half-written base; when another one finished first, its base is kept
    atomic_write(out, write, unless=lambda final: (final / "meta.json").exists())
    log.info("built %s in %.0f s: %s", out, meta["wall_s"], {t: round(s["score"], 2) for t, s in scores.items()})
    return out


def ensure_base(cfg, cache_dir: Optional[str] = None) -> Path:
    """Return the cached base folder for this config's base seed, building it first if it is missing."""
    cfg = base_config(cfg)
    out = base_dir(cfg, cache_dir)
    if not (out / "meta.json").exists():
        build_base(cfg, cache_dir)
    return out


def load_base(seed: int = 0, profile: str = "cpu", cache_dir: Optional[str] = None, **overrides) -> Tuple:
    """Return (model, tokenizer) of tiny-base for a seed and profile (built and cached on first use); `seed` is
    the base's own seed (a profile's base_seed does not replace it)."""
    cfg = resolve(profile, **{"seed": seed, "base_seed": seed, **overrides})
    return load_model(str(ensure_base(cfg, cache_dir)))



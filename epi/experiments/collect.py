"""Every finished run under a folder as one table: one row per run, runs of one method pooled only when
their settings match (`python -m epi compare ROOT`).

What a run "computed with" is its experiment settings (epi.experiments.profiles): its config without the
seed and the how-settings (NOT_SETTINGS), a field an older record lacks at its default. Rows, tables and
paired differences come from epi.analysis.compare.
"""
from __future__ import annotations

import logging
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Dict, List

import pandas as pd

from ..analysis.compare import load_runs, reference_scores, run_row
from .profiles import NOT_SETTINGS, ExperimentConfig

log = logging.getLogger(__name__)


def settings(rec: dict) -> dict:
    """Return what a run computed with: its config without the seeds and the how-settings (NOT_SETTINGS), a
    field the record predates at its default, and the precision as the run resolved it."""
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory()
                for f in fields(ExperimentConfig)}
    cfg = {**defaults, **rec["config"]}
    old_bf16 = cfg.pop("bf16_autocast", None)  # the flag `precision` replaced
    cfg["precision"] = rec.get("precision") or ("bf16" if old_bf16 else cfg.get("precision", "auto"))
    if cfg["precision"] == "auto":
        cfg["precision"] = "fp32"  # records without a resolved precision ran on CPU, where auto is fp32
    for key in ("seed", "base_seed", *NOT_SETTINGS):  # the base seed, like the seed, is a replicate (a block)
        cfg.pop(key, None)
    return cfg


def _variants(runs: List[dict]) -> List[str]:
    """Return, per run, "" when every run of its protocol and method has the same settings, else the settings
    that tell its group apart ("lr=0.01, clip=0.0"); warn about groups that are not pooled."""
    labels = [""] * len(runs)
    by_method: Dict[tuple, List[int]] = {}
    for i, r in enumerate(runs):
        arm = r.get("arm") or r["config"]["method"]  # an arm (another lr) is a method of its own, never pooled with it
        by_method.setdefault((r["config"]["protocol"], arm), []).append(i)
    for (protocol, method), idx in by_method.items():
        sets = [settings(runs[i]) for i in idx]
        keys = sorted({k for s in sets for k in s if any(s.get(k) != t.get(k) for t in sets)})
        if not keys:
            continue
        for i, s in zip(idx, sets):
            labels[i] = ", ".join(f"{k}={s.get(k)}" for k in keys)
        log.warning("compare: %d %s runs of protocol %s have different settings (%s); they are not pooled: %s",
                    len(idx), method, protocol, ", ".join(keys), "; ".join(sorted(set(labels[i] for i in idx))))
    return labels


def compare(root: str | Path) -> pd.DataFrame:
    """Return one row per finished run under `root`, sorted by protocol, method and seed."""
    runs = load_runs(root)
    rows, kept = [], []
    refs = reference_scores(runs)
    for r in runs:
        try:
            rows.append(run_row(r, refs.get(r["seed"])))
            kept.append(r)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            log.warning("compare: skipped %s/results.json: incomplete record (%s: %s)", r["_path"], type(e).__name__, e)
    if not rows:
        raise FileNotFoundError(f"no readable results.json under {root}; create runs with "
                                f"`python -m epi run ... --out {root}`")
    df = pd.DataFrame(rows)
    labels = _variants(kept)
    if any(labels):  # runs of one method with different settings: one row each, never pooled
        df.insert(df.columns.get_loc("method") + 1, "variant", labels)
    return df.sort_values(["protocol", "method", "seed"], kind="stable").reset_index(drop=True)

"""X3's pure parts: importance drift measured against the estimation noise floor (issue 15, item 4).

Two importance estimates at the *same* checkpoint disagree too (each averages g² over a few batches), so
"J(first, last) is below 1" alone does not show drift. At every checkpoint t and replicate r, importance is
estimated twice with one fixed estimator (mean of g² over m batches per task, no EMA) on disjoint batch sets
A_r and B_r; masks are made exactly as EPI makes them (`top_p_masks` at ratio p, layer_mean normaliser):

  scopes   "global" (all tasks' batches pooled: the mean of the task means, each task having m batches) and
           one scope per task (that task's batches only); per layer = the global mask restricted to one tensor.
  J_same_r(t)   = J(A_r(t), B_r(t))                                   the noise floor at t
  J_r(t, t')    = ½[J(A_r(t), B_r(t')) + J(B_r(t), A_r(t'))]          cross halves: each side carries the noise
                                                                      of one estimate, as J_same does
  D_r(t, t')    = ½[J_same_r(t) + J_same_r(t')] − J_r(t, t')          excess drift (0 at t = t' by construction)

A replicate keeps its batch sets at every checkpoint (paired across time, so the time effect is not mixed with a
change of batches), and replicates use disjoint batches (their estimates are independent given the model).

Claims, each decided by the one rule (`stats.verdict`, minimum 0.02 Jaccard) with **replicates as the units**:
the interval therefore covers estimation noise on ONE training trajectory, not training-seed variation.

  1. drift beyond the noise floor: D(first, last), global scope;
  2. drift grows with the distance between checkpoints: mean D at the largest lag − mean D at one grid step;
     this also comes out positive when all the drift happens in one early interval (then one lag-one pair
     carries it and the others none), so
  2b. drift keeps growing after the first interval: the same effect on the checkpoints from the second one on
     (needs ≥ 4 checkpoints): a set that keeps changing beyond the floor without moving further away (a
     fluctuation) gives 0 here;
  3. drift beyond the noise floor in every task: per replicate, the smallest D(first, last) over the tasks
     (each task's own verdict is in the per-task table, a description).

Masks are kept bit-packed per tensor (1 bit a coordinate), so hundreds of them fit in memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from ..engine.masks import top_p_masks
from . import evidence, stats

GLOBAL = "global"
MINIMUM = 0.02   # the smallest excess drift (in Jaccard) a claim counts
Packed = List[np.ndarray]  # one np.packbits array per tensor


def pack(masks: Sequence[torch.Tensor]) -> Packed:
    """Return the masks bit-packed, one uint8 array per tensor (flattened, 1 bit per coordinate)."""
    return [np.packbits(m.detach().reshape(-1).cpu().numpy().astype(bool)) for m in masks]


def overlap(a: Packed, b: Packed, tensors: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """Return (|a ∩ b|, |a|, |b|) summed over the tensors (indices into the lists; default all)."""
    idx = range(len(a)) if tensors is None else tensors
    inter = sum(int(np.bitwise_count(a[i] & b[i]).sum()) for i in idx)
    na = sum(int(np.bitwise_count(a[i]).sum()) for i in idx)
    nb = sum(int(np.bitwise_count(b[i]).sum()) for i in idx)
    return inter, na, nb


def jaccard(a: Packed, b: Packed, tensors: Optional[Sequence[int]] = None) -> float:
    """Return the Jaccard index of two packed mask lists (1.0 when both are empty), over `tensors`."""
    inter, na, nb = overlap(a, b, tensors)
    union = na + nb - inter
    return inter / union if union else 1.0


def scope_masks(per_task: Dict[str, Sequence[torch.Tensor]], ratio: float,
                normalize: str = "layer_mean") -> Dict[str, Packed]:
    """Return {scope: packed masks}: "global" from the pooled importance (mean of the task means) and one
    scope per task, each the top-p set of `top_p_masks` at `ratio` with `normalize`, as the EPI engine makes it."""
    tasks = list(per_task)
    if not tasks:
        raise ValueError("per_task must hold the importance of at least one task")
    pooled = [sum(per_task[t][i] for t in tasks) / len(tasks) for i in range(len(per_task[tasks[0]]))]
    out = {GLOBAL: pack(top_p_masks(pooled, ratio, normalize=normalize))}
    for t in tasks:
        out[t] = pack(top_p_masks(list(per_task[t]), ratio, normalize=normalize))
    return out


@dataclass
class Estimates:
    """The packed masks of every (checkpoint step, replicate, half "A" | "B"): {scope: packed masks}."""
    steps: List[int] = field(default_factory=list)
    masks: Dict[Tuple[int, int, str], Dict[str, Packed]] = field(default_factory=dict)

    def add(self, step: int, replicate: int, half: str, scopes: Dict[str, Packed]) -> None:
        """Store one estimate's masks."""
        if half not in ("A", "B"):
            raise ValueError(f"half must be 'A' or 'B', got {half!r}")
        if step not in self.steps:
            self.steps.append(step)
        self.masks[(step, replicate, half)] = scopes

    @property
    def replicates(self) -> List[int]:
        """Return the replicate indices stored."""
        return sorted({r for _, r, _ in self.masks})

    @property
    def scopes(self) -> List[str]:
        """Return the scopes of the masks: "global" first, then the tasks in name order."""
        first = next(iter(self.masks.values()))
        return [GLOBAL] + sorted(s for s in first if s != GLOBAL)

    def same(self, step: int, r: int, scope: str, tensors=None) -> float:
        """Return J_same_r(t): the two halves at one checkpoint."""
        return jaccard(self.masks[(step, r, "A")][scope], self.masks[(step, r, "B")][scope], tensors)

    def cross(self, t: int, u: int, r: int, scope: str, tensors=None) -> float:
        """Return J_r(t, t') = ½[J(A(t), B(t')) + J(B(t), A(t'))]."""
        m = self.masks
        return 0.5 * (jaccard(m[(t, r, "A")][scope], m[(u, r, "B")][scope], tensors)
                      + jaccard(m[(t, r, "B")][scope], m[(u, r, "A")][scope], tensors))


def drift_frame(est: Estimates) -> pd.DataFrame:
    """Return one row per (scope, t, t' ≥ t, replicate): lag (grid steps), j_same_t, j_same_t2, j_cross,
    excess = ½(j_same_t + j_same_t2) − j_cross (t = t' rows: j_cross = J_same and excess = 0)."""
    steps = sorted(est.steps)
    rows = []
    for scope in est.scopes:
        for r in est.replicates:
            same = {t: est.same(t, r, scope) for t in steps}
            for i, t in enumerate(steps):
                for k, u in enumerate(steps[i:], start=i):
                    j = est.cross(t, u, r, scope)
                    rows.append({"scope": scope, "t": t, "t2": u, "lag": k - i, "replicate": r,
                                 "j_same_t": same[t], "j_same_t2": same[u], "j_cross": j,
                                 "excess": 0.5 * (same[t] + same[u]) - j})
    return pd.DataFrame(rows)


def per_layer_frame(est: Estimates, names: Sequence[str]) -> pd.DataFrame:
    """Return one row per (tensor, replicate): the global mask restricted to that tensor at the first and last
    checkpoint — j_same_first, j_same_last, j_cross (first, last) and excess drift."""
    first, last = min(est.steps), max(est.steps)
    rows = []
    for i, name in enumerate(names):
        for r in est.replicates:
            a, b = est.same(first, r, GLOBAL, [i]), est.same(last, r, GLOBAL, [i])
            j = est.cross(first, last, r, GLOBAL, [i])
            rows.append({"tensor": name, "replicate": r, "j_same_first": a, "j_same_last": b, "j_cross": j,
                         "excess": 0.5 * (a + b) - j})
    return pd.DataFrame(rows)


def first_last(frame: pd.DataFrame, scope: str) -> pd.Series:
    """Return D_r(first, last) of `scope`, indexed by replicate."""
    part = frame[(frame["scope"] == scope) & (frame["t"] == frame["t"].min()) & (frame["t2"] == frame["t2"].max())]
    return part.set_index("replicate")["excess"].sort_index()


def lag_effects(frame: pd.DataFrame, scope: str = GLOBAL, start: Optional[int] = None) -> pd.Series:
    """Return, per replicate, mean D at the largest lag − mean D at lag one grid step, over the checkpoints at
    step ≥ `start` (default all); empty with fewer than 3 such checkpoints."""
    part = frame[frame["scope"] == scope]
    if start is not None:
        part = part[part["t"] >= start]
    if part.empty:
        return pd.Series(dtype=float)
    top = int(part["lag"].max())
    if top < 2:
        return pd.Series(dtype=float)
    by = part.groupby(["replicate", "lag"])["excess"].mean().unstack("lag")
    return (by[top] - by[1]).sort_index()


def _decided(text: str, measured: str, effects: Sequence[float], minimum: float, evidence_text: str) -> dict:
    v = stats.verdict([float(e) for e in effects], direction="increase", minimum=minimum)
    # the verdict line (effect, interval, replicates as "seeds", rule) goes where every claims table shows it
    return evidence.claim(text, f"{measured}; {v.describe()}", v.verdict, evidence=evidence_text,
                          decision=v.to_dict())


UNITS = ("units: estimation replicates (disjoint batch sets) on ONE training trajectory — the interval covers "
         "estimation noise, not training-seed variation")


def decide(frame: pd.DataFrame, minimum: float = MINIMUM) -> List[dict]:
    """Return X3's claim rows (evidence.claim with "decision"), each decided by stats.verdict over replicates."""
    steps = sorted(set(frame["t"]))
    first, last = steps[0], steps[-1]
    tasks = [s for s in frame["scope"].unique() if s != GLOBAL]
    g = first_last(frame, GLOBAL)
    fl = frame[(frame["t"] == first) & (frame["t2"] == last) & (frame["scope"] == GLOBAL)]
    claims = [_decided(
        "Importance drifts beyond the estimation noise floor (global top-p set, first vs last checkpoint)",
        f"D(first, last) = {g.mean():.3f}: J_same {0.5 * (fl['j_same_t'] + fl['j_same_t2']).mean():.3f} vs "
        f"J(step {first}, step {last}) {fl['j_cross'].mean():.3f}", g.values, minimum, UNITS)]
    lag = lag_effects(frame)
    if len(lag):
        claims.append(_decided(
            "Drift grows with the distance between checkpoints (global)",
            f"mean D at lag {last - first} steps − mean D at lag {steps[1] - steps[0]} steps = {lag.mean():.3f}",
            lag.values, minimum, UNITS + "; paired by replicate"))
    later = lag_effects(frame, start=steps[1]) if len(steps) >= 4 else pd.Series(dtype=float)
    if len(later):
        claims.append(_decided(
            f"Drift keeps growing with distance after the first interval (global, checkpoints from step {steps[1]})",
            f"mean D at lag {last - steps[1]} steps − mean D at lag {steps[2] - steps[1]} steps, checkpoints "
            f"≥ step {steps[1]} = {later.mean():.3f}", later.values, minimum,
            UNITS + "; paired by replicate; a set that changes beyond the floor without moving further away gives 0"))
    if tasks:
        worst = pd.concat([first_last(frame, t) for t in tasks], axis=1).min(axis=1)
        claims.append(_decided(
            "Importance drifts beyond the noise floor in every task (per-task top-p sets, first vs last)",
            f"smallest per-task D(first, last), mean over replicates = {worst.mean():.3f}", worst.values, minimum,
            UNITS + "; per replicate the smallest D over the tasks"))
    return claims


def scope_table(frame: pd.DataFrame, minimum: float = MINIMUM) -> pd.DataFrame:
    """Return one row per scope: J_same at first and last, J(first, last), D(first, last) with the rule's
    interval and verdict (a description for the per-task rows; the claims are `decide`'s)."""
    first, last = frame["t"].min(), frame["t2"].max()
    rows = []
    for scope in frame["scope"].unique():
        part = frame[(frame["scope"] == scope) & (frame["t"] == first) & (frame["t2"] == last)]
        v = stats.verdict(part["excess"].tolist(), direction="increase", minimum=minimum)
        rows.append({"scope": scope, "j_same_first": part["j_same_t"].mean(), "j_same_last": part["j_same_t2"].mean(),
                     "j_first_last": part["j_cross"].mean(), "excess": v.effect, "low": v.interval[0],
                     "high": v.interval[1], "replicates": v.n_seeds, "verdict": v.verdict})
    return pd.DataFrame(rows)


def figure(frame: pd.DataFrame, out: str | Path, title: str = "X3: drift against the noise floor",
           name: str = "x3_drift") -> Path:
    """Draw, per scope, J_same(t) (mean and the range over replicates) and J(first, t) against the step, and
    D by lag; save `out/figures/<name>.png` and return its path."""
    import matplotlib.pyplot as plt

    from .plots import band_label, savefig, seed_bands, set_style
    set_style()
    scopes = list(frame["scope"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    first = frame["t"].min()
    for k, scope in enumerate(scopes):
        color = f"C{k}"
        width = 2.2 if scope == GLOBAL else 1.0
        same = frame[(frame["scope"] == scope) & (frame["lag"] == 0)].groupby("t")["j_cross"]
        xs = same.mean().index.to_numpy()
        ax.plot(xs, same.mean().to_numpy(), color=color, lw=width, ls="--")
        ax.fill_between(xs, same.min().to_numpy(), same.max().to_numpy(), color=color, alpha=0.12)
        cross = frame[(frame["scope"] == scope) & (frame["t"] == first)].groupby("t2")["j_cross"].mean()
        ax.plot(cross.index, cross.to_numpy(), color=color, lw=width, marker="o", ms=3, label=scope)
    ax.set(xlabel="optimizer step of the checkpoint", ylabel="Jaccard of top-p sets",
           title="same checkpoint (dashed, band: replicate range) vs to step 0 (solid)", ylim=(0, 1.02))
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    for k, scope in enumerate(scopes):
        by = frame[frame["scope"] == scope].groupby(["lag", "replicate"])["excess"].mean().groupby("lag")
        dt = frame["t2"].max() - frame["t"].min()
        lags = by.mean().index.to_numpy() * (dt / max(1, frame["lag"].max()))
        mean = by.mean().to_numpy()
        lo, hi = seed_bands(np.column_stack([g.to_numpy() for _, g in by]) if by.size().nunique() == 1 else
                            np.full((1, len(mean)), np.nan))  # the rule's interval over replicates at each lag
        yerr = np.nan_to_num(np.vstack([mean - lo, hi - mean]))
        ax.errorbar(lags, mean, yerr=yerr, color=f"C{k}",
                    lw=2.2 if scope == GLOBAL else 1.0, marker="o", ms=3, capsize=2, label=scope)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(MINIMUM, color="grey", lw=0.8, ls=":", label=f"minimum {MINIMUM}")
    ax.set(xlabel="distance between checkpoints (optimizer steps)",
           ylabel="excess drift D (Jaccard below the noise floor)",
           title=f"excess drift by lag (bars: {band_label(int(frame['replicate'].nunique())).replace('seeds', 'replicates')})")
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = savefig(fig, name, out)
    plt.close(fig)
    return path


def layer_grid(per_layer: pd.DataFrame) -> Tuple[np.ndarray, List[str], List[str]]:
    """Return (grid of mean excess drift per tensor, block labels, kinds) for a heatmap: rows = blocks, columns =
    kinds of tensor (q_proj, ...), from names like model.layers.3.self_attn.q_proj.weight."""
    import re
    means = per_layer.groupby("tensor")["excess"].mean()
    parts = {}
    for n in means.index:
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.weight$", n)
        if m:
            parts[n] = (int(m.group(1)), m.group(2))
    blocks = sorted({b for b, _ in parts.values()})
    kinds = list(dict.fromkeys(k for _, k in parts.values()))
    grid = np.full((len(blocks), len(kinds)), math.nan)
    for n, (b, k) in parts.items():
        grid[blocks.index(b), kinds.index(k)] = means[n]
    return grid, [f"block {b}" for b in blocks], kinds

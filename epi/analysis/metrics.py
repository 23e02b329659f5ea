"""Evaluation metrics for multi-task and sequential SFT: pure functions of arrays.

Conventions used throughout (each function states its formula, indexed from 0):

- ``R`` is a T×T score matrix with ``R[j, i]`` = score on task i after training stage j, both 0-based and in
  training order. The base model (before stage 0) is *not* a row of ``R``; its scores are a separate vector
  ``base`` of length T.
- Scores may be in [0, 1] or [0, 100]; no function rescales them, so differences come out in the input's unit
  (ratios such as normalised scores and forgetting rates are unit-free). Do not mix scales within one call.
- Inputs are array-likes (lists, numpy arrays, torch tensors on any device); results are numpy arrays or floats.
- Bad inputs (wrong shape, length mismatch, empty) raise ``ValueError`` naming the argument.

Gradient-conflict metrics live in :mod:`epi.analysis.conflict` and are re-exported here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from ..engine.masks import mask_overlap
from ..engine.masks import spearman as rank_correlation
from .conflict import conflict_score_per_task, conflict_scores, task_gradients, trainable_parameter_names

__all__ = [
    "final_scores", "average_score", "normalized_scores", "average_normalized_score",
    "forgetting_per_task", "average_forgetting", "backward_transfer", "backward_transfer_gem_code",
    "forward_transfer", "forgetting_rate", "bwt", "bwt_gem_code", "forgetting_chaudhry", "forgetting_first_last",
    "forgetting_first_last_per_task", "retention", "seesaw", "table2", "mean_of_last", "summarize_seeds", "mean_sd",
    "jaccard", "churn", "released_fraction", "spearman", "drift_summary", "drift_over_scopes",
    "task_gradients", "conflict_scores", "conflict_score_per_task", "trainable_parameter_names",
]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _matrix(R: ArrayLike, name: str = "R", min_tasks: int = 1) -> np.ndarray:
    m = _to_numpy(R)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square T×T matrix (R[stage, task]), got shape {m.shape}")
    if m.shape[0] < min_tasks:
        raise ValueError(f"{name} must cover at least {min_tasks} task(s), got T={m.shape[0]}")
    return m


def _vector(x: ArrayLike, name: str, length: int | None = None) -> np.ndarray:
    v = _to_numpy(x)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of scores, got shape {v.shape}")
    if length is not None and v.size != length:
        raise ValueError(f"{name} must have length {length} (one entry per task), got {v.size}")
    return v


# ---------------------------------------------------------------- scores after training

def final_scores(R: ArrayLike) -> np.ndarray:
    """Return the scores after the last stage, ``R[T-1, :]`` (one per task)."""
    return _matrix(R)[-1].copy()


def average_score(R: ArrayLike) -> float:
    """Return ACC_T = (1/T) Σ_i R[T-1, i], the mean final score (TRACE "OP"), in the unit of ``R``."""
    return float(_matrix(R)[-1].mean())


def normalized_scores(scores: ArrayLike, references: ArrayLike) -> np.ndarray:
    """Return NS_i = scores_i / references_i, each task's score relative to its single-task reference S_i.

    ``references`` are single-task fine-tuning scores (each task trained alone, same budget), in the same unit
    as ``scores``; NS_i = 1 means the mix matches training on task i alone. References must be > 0.
    """
    s = _vector(scores, "scores")
    ref = _vector(references, "references", len(s))
    if np.any(ref <= 0):
        raise ValueError(f"references must all be > 0 to normalise by them, got {ref.tolist()}")
    return s / ref


def average_normalized_score(scores: ArrayLike, references: ArrayLike, scale: float = 10.0) -> float:
    """Return ANS = scale · (1/T) Σ_i scores_i / references_i, the suite's "Average Normalized Score".

    The papers' normalisation is undocumented, and the simple rule (divide the %-scale tasks by 10, keep the
    1–10 judge scores, average) does not reproduce CPI-FT Table 1 (5.49 vs the printed 6.58 for LLaMA-2 Full
    SFT). The suite therefore normalises by single-task references S_i and multiplies by ``scale`` = 10 only
    so that values resemble the papers' ~6–8 range. It is not comparable to the papers' numbers: always
    report the raw scores next to it.
    """
    return float(scale * normalized_scores(scores, references).mean())


# ---------------------------------------------------------------- sequential (continual) setting

def forgetting_per_task(R: ArrayLike) -> np.ndarray:
    """Return f_i = max_{l ∈ {0..T-2}} R[l, i] − R[T-1, i] for each task i < T-1 (length T-1).

    Chaudhry et al. 2018, re-indexed from 0: the best score seen at any earlier stage minus the final score.
    As in their formula the max also covers stages l < i, before task i was trained. Positive = forgotten.
    """
    m = _matrix(R, min_tasks=2)
    return m[:-1, :-1].max(axis=0) - m[-1, :-1]


def average_forgetting(R: ArrayLike) -> float:
    """Return F_T = (1/(T-1)) Σ_{i<T-1} f_i, the mean of :func:`forgetting_per_task` (positive = forgetting)."""
    return float(forgetting_per_task(R).mean())


def backward_transfer(R: ArrayLike) -> float:
    """Return BWT = (1/(T-1)) Σ_{i<T-1} (R[T-1, i] − R[i, i]) (GEM paper; negative = forgetting)."""
    m = _matrix(R, min_tasks=2)
    return float((m[-1, :-1] - np.diag(m)[:-1]).mean())


def backward_transfer_gem_code(R: ArrayLike) -> float:
    """Return (1/T) Σ_{i<T} (R[T-1, i] − R[i, i]), BWT as GEM's code computes it (last task adds a 0 term)."""
    m = _matrix(R)
    return float((m[-1] - np.diag(m)).mean())


def forward_transfer(R: ArrayLike, base: ArrayLike) -> float:
    """Return FWT = (1/(T-1)) Σ_{i≥1} (R[i-1, i] − base[i]): the gain on task i before it is trained.

    ``base[i]`` is the base model's score on task i (before stage 0), as in the GEM paper's b_i.
    """
    m = _matrix(R, min_tasks=2)
    b = _vector(base, "base", len(m))
    return float((np.diag(m, k=1) - b[1:]).mean())


def forgetting_rate(R: ArrayLike) -> np.ndarray:
    """Return the relative forgetting of each task, (max_{l ≥ i} R[l, i] − R[T-1, i]) / max_{l ≥ i} R[l, i].

    Our definition of the EPI paper's per-task "Forgetting Rate" (its definition is unknown): the share of
    the best score reached since task i was trained that is lost by the end; 0 when that max is ≤ 0, and 0
    for the last task. Unlike :func:`forgetting_per_task` it ignores stages before task i. Multiply by 100
    for percent. The alternative for a multi-task mix is (S_i − R_i) / S_i against single-task references,
    i.e. ``1 - normalized_scores(scores, references)``.
    """
    m = _matrix(R)
    T = len(m)
    best = np.array([m[i:, i].max() for i in range(T)])
    lost = best - m[-1]
    return np.divide(lost, best, out=np.zeros(T), where=best > 0)


# ---------------------------------------------------------------- the literature's names, one definition each
# The continual-learning papers use several definitions under one name (GEM's paper averages BWT over T−1
# tasks, its code over T; Chaudhry's forgetting takes the max over earlier rows, avalanche's is first minus
# last). Each name below is one of them, stated; a table says which one it shows.

def bwt(R: ArrayLike) -> float:
    """Return BWT = (1/(T-1)) Σ_{i<T-1} (R[T-1, i] − R[i, i]), as in the GEM paper (Lopez-Paz & Ranzato 2017).

    Negative = forgetting. The same number as :func:`backward_transfer`."""
    return backward_transfer(R)


def bwt_gem_code(R: ArrayLike) -> float:
    """Return (1/T) Σ_{i<T} (R[T-1, i] − R[i, i]): the same sum as :func:`bwt` divided by T, as GEM's code does
    (the last task adds a 0 term, so it is (T-1)/T · bwt). The same number as :func:`backward_transfer_gem_code`."""
    return backward_transfer_gem_code(R)


def forgetting_chaudhry(R: ArrayLike) -> float:
    """Return F = (1/(T-1)) Σ_{i<T-1} (max_{l<T-1} R[l, i] − R[T-1, i]), Chaudhry et al. 2018 (RWalk).

    Per task it is :func:`forgetting_per_task` (the max also covers rows before task i was trained, as in
    their formula; Mammoth's variant takes it over every row). Positive = forgotten. The same number as
    :func:`average_forgetting`."""
    return average_forgetting(R)


def forgetting_first_last_per_task(R: ArrayLike) -> np.ndarray:
    """Return f_i = R[i, i] − R[T-1, i] for each task i < T-1 (length T-1): the score right after training task i
    minus the final one (avalanche's forgetting: first evaluation after learning minus last). Positive = forgotten."""
    m = _matrix(R, min_tasks=2)
    return np.diag(m)[:-1] - m[-1, :-1]


def forgetting_first_last(R: ArrayLike) -> float:
    """Return (1/(T-1)) Σ_{i<T-1} (R[i, i] − R[T-1, i]), the mean of :func:`forgetting_first_last_per_task`.

    Equals −:func:`bwt`; it differs from :func:`forgetting_chaudhry` when a task scored higher at a row other
    than its own (before it was trained, or after a later stage helped it)."""
    return float(forgetting_first_last_per_task(R).mean())


def retention(*, a_after_a: float, a_after_b: float) -> float:
    """Return a_after_b / a_after_a: the share of A's score after training A that is left after then training B.

    1 = nothing forgotten, 0 = all of it, above 1 = B helped A. Unlike absolute forgetting (a_after_a −
    a_after_b) it does not penalise a method for having learned A better. Scores must be >= 0 (scores, not
    deltas: ValueError otherwise). When a_after_a is 0 the ratio is nan: A was never learned, so there is
    nothing to retain, and nan (skipped by the tables' mean ± sd cells) says "not measured" rather than a
    number that would rank runs. For an R matrix, task i's retention is R[T-1, i] / R[i, i]."""
    a, b = float(a_after_a), float(a_after_b)
    if not (a >= 0 and b >= 0):  # also refuses nan
        raise ValueError(f"retention needs scores >= 0 (not deltas), got a_after_a={a_after_a!r}, "
                         f"a_after_b={a_after_b!r}")
    return b / a if a > 0 else math.nan


# ---------------------------------------------------------------- multi-task mix (seesaw)

def seesaw(scores: ArrayLike, references: ArrayLike) -> dict[str, Any]:
    """Return the seesaw statistics of a multi-task mix against single-task references.

    - ``delta``: Δ_i = scores_i − references_i (numpy array; negative = the mix hurts task i);
    - ``count``: #{i: Δ_i < 0} when at least one Δ_j > 0, else 0 — a seesaw needs a task that gains while
      another loses; a uniform drop is interference but not a seesaw;
    - ``spread``: population std of Δ (ddof=0);
    - ``worst``: min_i Δ_i, the worst-task drop.
    """
    s = _vector(scores, "scores")
    delta = s - _vector(references, "references", len(s))
    count = int((delta < 0).sum()) if (delta > 0).any() else 0
    return {"delta": delta, "count": count, "spread": float(delta.std(ddof=0)), "worst": float(delta.min())}


def table2(*, a_after_a: float, a_after_b: float, b_after_a: float, b_after_b: float,
           a_before: float | None = None) -> dict[str, float]:
    """Return the forgetting/learning deltas of one sequential run A → B, as in CPI-FT Table 2.

    Arguments are scores of the model after each stage: ``a_after_a`` = on A after training A, ``a_after_b`` =
    on A after then training B, ``b_after_a`` = on B before the B stage, ``b_after_b`` = on B after it;
    ``a_before`` (optional) = on A before any training.

    - ``forgetting_A`` = a_after_a − a_after_b (positive = A was forgotten);
    - ``delta_A`` = −forgetting_A, CPI-FT's "ΔA (↓ forgetting)" column, printed negative (e.g. −24.5);
    - ``learning_B`` = ``delta_B`` = b_after_b − b_after_a, CPI-FT's "ΔB (↑ learning)";
    - ``learning_A`` = a_after_a − a_before (nan without ``a_before``).

    For the B → A columns call again with the roles of A and B swapped.
    """
    forgetting_a = float(a_after_a) - float(a_after_b)
    learning_b = float(b_after_b) - float(b_after_a)
    learning_a = math.nan if a_before is None else float(a_after_a) - float(a_before)
    return {"forgetting_A": forgetting_a, "delta_A": -forgetting_a, "learning_B": learning_b,
            "delta_B": learning_b, "learning_A": learning_a}


def mean_of_last(history_scores: ArrayLike, k: int = 3) -> float | np.ndarray:
    """Return the mean of the last ``k`` evaluations (all of them if fewer than k).

    The mix protocol scores a run this way because single checkpoints swing by ±0.1–0.2. A 1-D input (one
    score per evaluation) gives a float; a 2-D input (evaluations × tasks) gives one mean per task.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    h = _to_numpy(history_scores)
    if h.ndim not in (1, 2) or len(h) == 0:
        raise ValueError(f"history_scores must be a non-empty 1-D or 2-D sequence, got shape {h.shape}")
    last = h[-k:].mean(axis=0)
    return float(last) if h.ndim == 1 else last


def summarize_seeds(values: ArrayLike) -> tuple[float, float]:
    """Return (mean, sample standard deviation with ddof=1) over seeds; the sd is nan for a single seed."""
    v = _vector(values, "values")
    sd = float(v.std(ddof=1)) if len(v) > 1 else math.nan
    return float(v.mean()), sd


def mean_sd(values: ArrayLike, digits: int = 2) -> str:
    """Return "mean ± sd" over seeds, e.g. "0.71 ± 0.05"; a single seed gives "0.71 (1 seed)"."""
    mean, sd = summarize_seeds(values)
    if math.isnan(sd):
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


# ---------------------------------------------------------------- isolation dynamics (masks, importance)

MaskLike = Any  # numpy bool array, torch bool tensor, or a list/tuple/dict of them (one per parameter tensor)


def _is_mask_list(x: Any) -> bool:
    # a list of arrays/tensors is one mask per parameter tensor; a list of bools is a single mask
    return isinstance(x, (list, tuple)) and any(isinstance(e, (np.ndarray, torch.Tensor)) for e in x)


def _mask_pairs(a: MaskLike, b: MaskLike, names: tuple[str, str]) -> list[tuple[Any, Any]]:
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)) or set(a) != set(b):
            raise ValueError(f"{names[0]} and {names[1]} must be dicts with the same keys")
        return [(a[key], b[key]) for key in a]
    if _is_mask_list(a) or _is_mask_list(b):
        if not (_is_mask_list(a) and _is_mask_list(b)) or len(a) != len(b):
            raise ValueError(f"{names[0]} and {names[1]} must be lists of the same length")
        return list(zip(a, b))
    return [(a, b)]


def _overlap(a: MaskLike, b: MaskLike, names: tuple[str, str]) -> dict:
    """Return `epi.engine.masks.mask_overlap` of aligned masks (nonzero entries count as members)."""
    xs, ys = [], []
    for x, y in _mask_pairs(a, b, names):
        if tuple(np.shape(x)) != tuple(np.shape(y)):
            raise ValueError(f"{names[0]} and {names[1]} masks must have the same shape, "
                             f"got {tuple(np.shape(x))} and {tuple(np.shape(y))}")
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        xs.append(x.bool())
        ys.append((y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))).to(x.device).bool())
    return mask_overlap(xs, ys)


def jaccard(a: MaskLike, b: MaskLike) -> float:
    """Return J = |a ∩ b| / |a ∪ b| of two boolean masks; two empty masks give 1.0 (identical sets).

    Masks are numpy bool arrays or torch bool tensors, or lists/dicts of them (one per parameter tensor),
    in which case counts are summed over the list before dividing.
    """
    return _overlap(a, b, ("a", "b"))["jaccard"]


def churn(prev: MaskLike, cur: MaskLike) -> float:
    """Return C = |prev △ cur| / |cur|, the share of the current mask that changed since the previous one.

    0.0 if both masks are empty; inf if only ``cur`` is empty. Accepts the same mask types as :func:`jaccard`.
    """
    return _overlap(prev, cur, ("prev", "cur"))["churn"]


def released_fraction(prev: MaskLike, cur: MaskLike) -> float:
    """Return |prev \\ cur| / |prev|, the share of previously protected entries now released.

    0.0 if ``prev`` is empty (nothing to release). Accepts the same mask types as :func:`jaccard`.
    """
    return _overlap(prev, cur, ("prev", "cur"))["released_fraction"]


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Return Spearman's ρ: the Pearson correlation of the ranks of x and y (ties get their average rank).

    Inputs are flattened; nan if either input is constant. Matches ``scipy.stats.spearmanr`` without
    needing scipy; meant for importance scores on a fixed sample of coordinates, not full tensors. The
    ranking is the engine's (`epi.engine.masks.spearman`, which computes the drift history's values).
    """
    a, b = _to_numpy(x).ravel(), _to_numpy(y).ravel()
    if a.size != b.size or a.size < 2:
        raise ValueError(f"x and y must have the same length >= 2, got {a.size} and {b.size}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("x and y must not contain nan")
    return rank_correlation(torch.from_numpy(a.astype(np.float64)), torch.from_numpy(b.astype(np.float64)))


def _series(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    values = [h.get(key) for h in history]
    return np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)


def drift_summary(history: Sequence[Mapping[str, Any]], scope: str | None = None) -> dict[str, Any]:
    """Return summary statistics of an engine history (one dict per refresh, see docs/CONTRACTS.md).

    Keys: ``refreshes``, ``final_step``, ``final_protected_fraction``, ``jaccard_prev_mean`` and ``_last``,
    ``jaccard_first_final`` (last refresh vs the first mask), ``churn_mean`` and ``_last``,
    ``released_fraction_mean``, ``spearman_prev_mean`` and ``_last``, ``per_layer_final``. Missing values
    (None or nan, e.g. ``jaccard_prev`` at the first refresh, which has no previous mask) are skipped; a
    statistic with no values is nan. ``scope`` keeps only entries with that ``scope_key`` (per-task masks).
    """
    entries = [h for h in history if scope is None or h.get("scope_key") == scope]
    if not entries:
        raise ValueError(f"history has no refresh entries{'' if scope is None else f' for scope {scope!r}'}")

    def stat(key: str, how: str) -> float:
        s = _series(entries, key)
        return math.nan if s.size == 0 else float(s.mean() if how == "mean" else s[-1])

    last = entries[-1]
    return {
        "refreshes": len(entries), "final_step": last.get("step"),
        "final_protected_fraction": stat("protected_fraction", "last"),
        "jaccard_prev_mean": stat("jaccard_prev", "mean"), "jaccard_prev_last": stat("jaccard_prev", "last"),
        "jaccard_first_final": stat("jaccard_first", "last"),
        "churn_mean": stat("churn", "mean"), "churn_last": stat("churn", "last"),
        "released_fraction_mean": stat("released_fraction", "mean"),
        "spearman_prev_mean": stat("spearman_prev", "mean"), "spearman_prev_last": stat("spearman_prev", "last"),
        "per_layer_final": dict(last.get("per_layer") or {}),
    }


def drift_over_scopes(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Return drift statistics of an engine history pooled over its scope keys (one key in global scope).

    ``jaccard_prev_mean``, ``churn_mean`` and ``released_fraction_mean`` average every refresh entry of every
    key (as :func:`drift_summary` without ``scope``); ``jaccard_first_final`` is the mean over keys of each
    key's last Jaccard to its own first mask, so per-task scope is not read as the last task's value alone.
    A statistic with no values, or an empty history (no refresh yet), is nan.
    """
    names = ("jaccard_prev_mean", "churn_mean", "released_fraction_mean", "jaccard_first_final")
    if not history:
        return dict.fromkeys(names, math.nan)
    pooled = drift_summary(history)
    finals = [drift_summary(history, scope=k)["jaccard_first_final"]
              for k in dict.fromkeys(h.get("scope_key") for h in history)]
    finals = [v for v in finals if not math.isnan(v)]
    return {**{k: pooled[k] for k in names[:3]}, "jaccard_first_final": float(np.mean(finals)) if finals else math.nan}

"""The one verdict rule and the noise levels it reads: how a claim comparing two arms is decided.

A claim compares two arms (a method and its baseline) paired by seed, and by order where there is one. Its
per-pair **effects** are oriented by `direction` so that a positive effect is what the claim says; every
verdict is one of "supported", "mixed", "not supported", "not measured" and comes with the effect, an
interval, the number of seeds and prompts, and the name of the rule that decided it (`Verdict.describe`).

`verdict` is the single entry point. Its `rule` picks how the interval is formed and read:

- ``seed_2se`` (the notebooks' rule): interval = mean ± 2 standard errors over seeds; supported when the mean
  exceeds 2 se (needs ≥ 2 seeds), not supported when it is ≤ 0, mixed otherwise.
- ``evaluation_2se``: interval = effect ± `noise` (two evaluation standard errors of the difference, for one
  seed); supported when the effect exceeds `noise`, not supported when it is ≤ 0, mixed otherwise.
- ``every_pair``: interval = the range of the pairs; supported when every pair shows the effect and the mean
  exceeds `minimum`, not supported when the mean is ≤ 0, mixed otherwise.
- ``within_margin`` (non-inferiority: "as well as, up to `minimum`"): interval = the range of the pairs;
  supported when every pair's effect is ≥ −`minimum`, not supported when the mean is < −`minimum`.
- ``bootstrap`` (calibrated): a 95 % percentile interval from a hierarchical bootstrap, seeds first, then the
  evaluation prompts inside each drawn seed; supported when the interval excludes 0 in the claimed direction
  and the effect exceeds `minimum`, not supported when the whole interval lies below `minimum`, mixed
  otherwise (and when one seed without per-prompt effects leaves no interval to read).

Every rule says **not measured** when no pair exists, or when `baseline` (the baseline arm's own values, e.g.
how much full SFT forgot) has a mean ≤ `floor`: there was no effect to reduce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

VERDICTS = ("supported", "not supported", "mixed", "not measured")
DIRECTIONS = ("increase", "decrease")

RULES = {  # name → (what the interval is, the decision) — shown by Verdict.describe and written into reports
    "seed_2se": ("mean ± 2 se over seeds",
                 "supported when the mean effect exceeds 2 standard errors over seeds, not supported when it is ≤ 0"),
    "evaluation_2se": ("± 2 evaluation se",
                       "supported when the effect exceeds 2 evaluation standard errors of the difference, "
                       "not supported when it is ≤ 0"),
    "every_pair": ("range of pairs",
                   "supported when every pair shows the effect and the mean exceeds the minimum, "
                   "not supported when the mean is ≤ 0"),
    "within_margin": ("range of pairs",
                      "supported when every pair is within the margin, not supported when the mean falls outside it"),
    "bootstrap": ("95% hierarchical bootstrap",
                  "supported when the interval excludes 0 in the claimed direction and the effect exceeds the "
                  "minimum, not supported when the interval lies below the minimum"),
}
DEFAULT_RULE = "seed_2se"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_LEVEL = 0.95
_BLOCK = 4_000_000  # prompt indices drawn at once by the bootstrap (32 MB)


@dataclass(frozen=True)
class Verdict:
    """A decided claim: its effect (positive = the claimed direction), interval, sample sizes and rule."""

    effect: float                       # mean effect over seeds, oriented so that > 0 is what the claim says
    interval: tuple[float, float]       # (low, high) in the same orientation; (nan, nan) when not estimable
    n_seeds: int                        # pairs (seeds, or seed × order) the effect averages
    n_prompts: Optional[int]            # evaluation prompts per seed (per task) when known
    rule: str                           # a key of RULES
    verdict: str                        # one of VERDICTS
    minimum: float = 0.0                # the smallest effect the claim counts (the margin for within_margin)

    def describe(self, digits: int = 3) -> str:
        """Return one line: effect, interval, seeds, prompts, rule and verdict."""
        if self.n_seeds == 0:
            return f"no pairs · rule: {self.rule} → {self.verdict}"
        label = RULES[self.rule][0]
        lo, hi = self.interval
        interval = (f"{label}: {lo:+.{digits}f}, {hi:+.{digits}f}" if math.isfinite(lo) and math.isfinite(hi)
                    else f"{label}: not estimable")
        prompts = f", {self.n_prompts} prompts per task" if self.n_prompts else ""
        minimum = f", minimum {self.minimum:.{digits}g}" if self.minimum else ""
        return (f"effect {self.effect:+.{digits}f} [{interval}] over {self.n_seeds} seed(s){prompts} · "
                f"rule: {self.rule}{minimum} → {self.verdict}")

    def to_dict(self) -> dict:
        """Return the verdict as plain values (a non-finite interval end as None), e.g. for summary.json."""
        finite = [v if math.isfinite(v) else None for v in self.interval]
        return {"effect": self.effect, "interval": finite, "n_seeds": self.n_seeds, "n_prompts": self.n_prompts,
                "rule": self.rule, "verdict": self.verdict, "minimum": self.minimum}


# ------------------------------------------------------------------------------------------------ noise levels

def score_se(score: float, n: int) -> float:
    """Return the binomial standard error of a score on `n` prompts, Agresti–Coull: √(p̃(1−p̃)/(n+2)) with
    p̃ = (score·n + 1)/(n + 2), so a score of 0 or 1 does not claim zero noise."""
    if n < 1:
        raise ValueError(f"n (prompts) must be >= 1, got {n}")
    p = (score * n + 1) / (n + 2)
    return float(np.sqrt(p * (1 - p) / (n + 2)))


def mean_score_se(scores: Sequence[float], n: int) -> float:
    """Return the evaluation standard error of a mean over k task scores, each on `n` prompts:
    √(Σ_t se(s_t)²) / k (tasks are scored on different prompts, so their errors are independent)."""
    scores = list(scores)
    if not scores:
        raise ValueError("scores must hold at least one task score")
    return float(np.sqrt(sum(score_se(s, n) ** 2 for s in scores)) / len(scores))


def difference_se(*ses: float) -> float:
    """Return the standard error of a sum or difference of independent estimates: √(Σ se²)."""
    if not ses:
        raise ValueError("difference_se needs at least one standard error")
    return float(np.hypot.reduce(np.asarray(ses, dtype=float)))


def seed_se(values: Sequence[float]) -> float:
    """Return the standard error of a mean over seeds, sd(ddof=1)/√n; nan for fewer than 2 seeds."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else math.nan


# ------------------------------------------------------------------------------------------------ pairing

def pairs(frame: pd.DataFrame, column: str, method: str, baseline: str,
          keys: Sequence[str] = ("seed", "direction")) -> pd.DataFrame:
    """Return the paired runs of `method` and `baseline`: one row per pair with `<column>_base` and `<column>_m`.

    Runs pair on each of `keys` that `frame` has (seed, and the order of a sequential run), so the two arms
    share base model, data order and evaluation prompts."""
    for name in ("method", column):
        if name not in frame:
            raise ValueError(f"frame has no column {name!r} (columns: {list(frame.columns)})")
    on = [k for k in keys if k in frame]
    return frame[frame["method"] == baseline].merge(frame[frame["method"] == method], on=on,
                                                    suffixes=("_base", "_m"))


# ------------------------------------------------------------------------------------------------ the verdict

def _effects(effects_by_seed) -> list[np.ndarray]:
    out = []
    for i, e in enumerate(effects_by_seed):
        a = np.asarray(e, dtype=float)
        if a.ndim > 2 or a.size == 0:
            raise ValueError(f"effects_by_seed[{i}] must be a number, or per-prompt effects (prompts, or tasks × "
                             f"prompts), got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"effects_by_seed[{i}] holds a non-finite value (nan or inf): a pair whose score is "
                             "missing cannot be counted; drop the pair or rerun its evaluation")
        out.append(a)
    if out and len({a.ndim for a in out}) > 1:
        raise ValueError("effects_by_seed mixes kinds: give every seed a number, or every seed per-prompt effects "
                         "of the same shape kind (prompts, or tasks × prompts)")
    return out


def _seed_effect(a: np.ndarray) -> float:
    # per-seed effect: a number as given; per-prompt effects averaged per task, then over tasks
    return float(a) if a.ndim == 0 else float(a.mean(axis=-1).mean())


def hierarchical_bootstrap(effects_by_seed, *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = BOOTSTRAP_LEVEL,
                           seed: int = 0) -> tuple[float, float]:
    """Return the percentile interval at `level` of the mean effect under a two-stage bootstrap.

    Stage 1 draws seeds with replacement; stage 2 draws, for every drawn seed independently, its evaluation
    prompts with replacement (within each task when a seed's effects are tasks × prompts). Per-seed numbers
    (no prompt-level data) skip stage 2. The generator is seeded, so the interval is reproducible."""
    arrays = _effects(effects_by_seed)
    if not arrays:
        raise ValueError("hierarchical_bootstrap needs at least one seed")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples}, {level}")
    rng = np.random.default_rng(seed)
    n = len(arrays)
    total = np.zeros(resamples)
    for _ in range(n):                                    # one slot of the resampled set of seeds at a time
        drawn = rng.integers(n, size=resamples)
        for s, a in enumerate(arrays):
            rows = np.flatnonzero(drawn == s)
            if rows.size == 0:
                continue
            if a.ndim == 0:
                total[rows] += float(a)
                continue
            grid = a if a.ndim == 2 else a[None, :]        # tasks × prompts
            for block in np.array_split(rows, -(-rows.size * grid.size // _BLOCK)):  # bounded memory
                idx = rng.integers(grid.shape[1], size=(block.size, *grid.shape))
                drawn_means = np.take_along_axis(np.broadcast_to(grid, idx.shape), idx, axis=2).mean(axis=2)
                total[block] += drawn_means.mean(axis=1)
    means = total / n
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def verdict(effects_by_seed, *, direction: str = "increase", rule: str = DEFAULT_RULE, minimum: float = 0.0,
            floor: Optional[float] = None, baseline: Optional[Sequence[float]] = None, noise: Optional[float] = None,
            n_prompts: Optional[int] = None, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Verdict:
    """Return the Verdict on a claim from its paired effects, one entry per seed (or seed × order).

    effects_by_seed: per pair, the difference method − baseline as a number, or the per-prompt differences on
        the shared evaluation prompts (1-D, or tasks × prompts) for the bootstrap's prompt stage.
    direction: "increase" when the claim says the difference is positive, "decrease" when negative (e.g. "forgets
        less"); the Verdict's effect and interval are oriented so that positive is the claim's way.
    rule: a key of RULES (see the module docstring). minimum: the smallest effect that counts (every_pair,
        bootstrap), or the tolerated shortfall (within_margin). noise: the 2-se evaluation noise of the
        difference (evaluation_2se only).
    floor, baseline: "not measured" when the mean of `baseline` (the baseline arm's values) is ≤ `floor`.
    n_prompts: prompts per task, for the description (taken from the arrays when they are per-prompt).
    resamples, seed: the bootstrap's size and generator seed.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not math.isfinite(minimum) or minimum < 0:
        raise ValueError(f"minimum must be a finite number >= 0, got {minimum}")
    if rule == "evaluation_2se" and (noise is None or not math.isfinite(noise) or noise < 0):
        raise ValueError(f"rule 'evaluation_2se' needs noise (the 2-se evaluation noise, >= 0), got {noise}")
    if (floor is None) != (baseline is None):
        raise ValueError("floor and baseline go together: give both (not measured when mean(baseline) <= floor)")
    sign = 1.0 if direction == "increase" else -1.0
    arrays = [sign * a for a in _effects(effects_by_seed)]
    if arrays and arrays[0].ndim > 0 and n_prompts is None:
        n_prompts = min(a.shape[-1] for a in arrays)
    diffs = np.array([_seed_effect(a) for a in arrays])
    n = len(diffs)
    nan2 = (math.nan, math.nan)

    def decided(effect: float, interval: tuple[float, float], word: str) -> Verdict:
        return Verdict(float(effect), (float(interval[0]), float(interval[1])), n, n_prompts, rule, word, minimum)

    if n == 0:
        return decided(math.nan, nan2, "not measured")
    mean = diffs.mean()
    if floor is not None:
        base = np.asarray(baseline, dtype=float)
        if base.size == 0 or not np.isfinite(base).all():
            raise ValueError("baseline must hold finite values (the baseline arm's own scores or forgetting)")
        if base.mean() <= floor:
            return decided(mean, nan2, "not measured")

    if rule == "seed_2se":
        if n < 2:
            return decided(mean, nan2, "not supported" if mean <= 0 else "mixed")
        se = diffs.std(ddof=1) / np.sqrt(n)
        word = "not supported" if mean <= 0 else "supported" if mean > 2 * se else "mixed"
        return decided(mean, (mean - 2 * se, mean + 2 * se), word)
    if rule == "evaluation_2se":
        word = "supported" if mean > noise else "mixed" if mean > 0 else "not supported"
        return decided(mean, (mean - noise, mean + noise), word)
    if rule == "every_pair":
        word = ("supported" if diffs.min() > 0 and mean > minimum else "not supported" if mean <= 0 else "mixed")
        return decided(mean, (diffs.min(), diffs.max()), word)
    if rule == "within_margin":
        word = ("supported" if diffs.min() >= -minimum else "not supported" if mean < -minimum else "mixed")
        return decided(mean, (diffs.min(), diffs.max()), word)
    # bootstrap: one seed without per-prompt effects has no spread to resample
    if n < 2 and arrays[0].ndim == 0:
        return decided(mean, nan2, "mixed")
    lo, hi = hierarchical_bootstrap(arrays, resamples=resamples, seed=seed)
    word = ("supported" if lo > 0 and mean > minimum else "not supported" if hi < minimum else "mixed")
    return decided(mean, (lo, hi), word)

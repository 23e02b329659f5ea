"""The one verdict rule and the noise levels it reads: how a claim comparing two arms is decided.

A claim compares two arms (a method and its baseline) paired by seed, and by order where there is one. Its
per-pair **effects** are oriented by `direction` so that a positive effect is what the claim says; every
verdict is one of "supported", "mixed", "not supported", "not measured" and comes with the effect, an
interval, the number of seeds and prompts, and the name of the rule that decided it (`Verdict.describe`).

`verdict` is the single entry point; its default rule ``bootstrap`` is the one rule of the suite:

- **interval**: the 95 % percentile interval of the mean effect under a hierarchical bootstrap — seeds
  drawn with replacement, then, inside every drawn seed, its evaluation prompts drawn with replacement (per
  task). Per-seed numbers without prompt-level data skip the prompt stage (the description then says
  "prompts: not recorded").
- **supported** when the interval excludes 0 on the claimed side (its low end > 0) *and* the effect exceeds
  the stated `minimum`.
- **not supported** when the interval excludes the minimum on the other side: its high end < `minimum`.
  This is the precise reading of the issue's "excludes the minimum in the other direction": the data rule
  out an effect as large as the one the claim needs. With minimum 0 it is "significantly the other way";
  with minimum m > 0 a small but real effect (interval inside (0, m)) is also "not supported" — it is
  smaller than the claim's own threshold. (Reading it as "high end < −minimum" would make a larger minimum
  *harder* to reject, which no claim intends.)
- **not measured** when no pair exists, or when the baseline arm's own values (`baseline`, e.g. how much
  full SFT forgot) have a mean ≤ `floor`: there was no effect to reduce. The interval is still shown.
- **mixed** otherwise, including one seed given as a single number (no spread to resample).

Few seeds without prompt scores. A seeds-only bootstrap draws all n seeds alike with probability n·n⁻ⁿ (½ for
2 seeds, 1/9 for 3); while that exceeds the 2.5 % tail its "interval" is just the range of the seeds, and
"supported" would be a sign test with p = 2⁻ⁿ (the audit's "every pair improves"). So with ≤ 3 seeds given as
numbers the interval is shown as the seed range and the verdict is "mixed" at best (`reaches_level`). With
4–8 seeds the seeds-only percentile interval is still narrower than a t interval (it uses the sd with
ddof = 0 and normal quantiles); per-prompt scores, whose resampling adds the evaluation noise, or more seeds
are what make the interval trustworthy.

Non-inferiority ("as well as, up to `tolerance`") is the same rule with its zero line moved to −tolerance:
supported when the interval's low end > −tolerance, not supported when its high end < −tolerance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

VERDICTS = ("supported", "not supported", "mixed", "not measured")
DIRECTIONS = ("increase", "decrease")

RULES = {  # name → (what the interval is, the decision) — shown by Verdict.describe and written into reports
    "bootstrap": ("95% hierarchical bootstrap",
                  "supported when the interval excludes 0 in the claimed direction and the effect exceeds the "
                  "minimum; not supported when the interval lies below the minimum; not measured when the "
                  "baseline shows no effect to reduce; mixed otherwise"),
}
DEFAULT_RULE = "bootstrap"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_LEVEL = 0.95
_BLOCK = 4_000_000  # prompt indices drawn at once by the bootstrap (32 MB)

# one seed's effects: a number, or per-prompt effects as rows (one row per task or order; rows may differ in length)
SeedEffects = Union[float, Sequence[float], Sequence[Sequence[float]], np.ndarray]


@dataclass(frozen=True)
class Verdict:
    """A decided claim: its effect (positive = the claimed direction), interval, sample sizes and rule."""

    effect: float                       # mean effect over seeds, oriented so that > 0 is what the claim says
    interval: tuple[float, float]       # (low, high) in the same orientation; (nan, nan) when not estimable
    n_seeds: int                        # replicates the effect averages (seeds; orders are averaged inside one)
    n_prompts: Optional[int]            # evaluation prompts per task (the fewest) when prompts were resampled
    rule: str                           # a key of RULES
    verdict: str                        # one of VERDICTS
    minimum: float = 0.0                # the smallest effect the claim counts
    tolerance: float = 0.0              # non-inferiority: the shortfall the claim tolerates (bootstrap)

    def describe(self, digits: int = 3) -> str:
        """Return one line: effect, interval, seeds, prompts, rule and verdict."""
        if self.n_seeds == 0:
            return f"no pairs · rule: {self.rule} → {self.verdict}"
        label = RULES[self.rule][0]
        if self.rule == "bootstrap" and not self.n_prompts and not reaches_level(self.n_seeds):
            label = f"range of {self.n_seeds} seed(s), too few for a 95% interval without prompt scores"
        lo, hi = self.interval
        interval = (f"{label}: {lo:+.{digits}f}, {hi:+.{digits}f}" if math.isfinite(lo) and math.isfinite(hi)
                    else f"{label}: not estimable")
        if self.n_prompts:
            prompts = f", {self.n_prompts} prompts per task"
            if self.n_seeds == 1:  # nothing resamples training: a second seed can move the effect beyond this
                prompts += " (one seed: the interval covers evaluation noise, not seed-to-seed variation)"
        else:
            prompts = ", prompts: not recorded" if self.rule == "bootstrap" else ""
        extra = (f", minimum {self.minimum:.{digits}g}" if self.minimum else "") + \
            (f", tolerance {self.tolerance:.{digits}g}" if self.tolerance else "")
        return (f"effect {self.effect:+.{digits}f} [{interval}] over {self.n_seeds} seed(s){prompts} · "
                f"rule: {self.rule}{extra} → {self.verdict}")

    def to_dict(self) -> dict:
        """Return the verdict as plain values (a non-finite number as None), e.g. for summary.json."""
        finite = [v if math.isfinite(v) else None for v in self.interval]
        return {"effect": self.effect if math.isfinite(self.effect) else None, "interval": finite,
                "n_seeds": self.n_seeds, "n_prompts": self.n_prompts, "rule": self.rule, "verdict": self.verdict,
                "minimum": self.minimum, "tolerance": self.tolerance}


def reaches_level(n_seeds: int, level: float = BOOTSTRAP_LEVEL) -> bool:
    """Return whether a seeds-only bootstrap of `n_seeds` numbers can form an interval at `level`: the chance
    n·n⁻ⁿ that a resample draws one seed n times must fall below the tail (1 − level)/2 (false for n ≤ 3 at 95 %)."""
    return n_seeds > 1 and n_seeds * float(n_seeds) ** -n_seeds < (1 - level) / 2


def arm_interval(values_by_seed, *, level: float = BOOTSTRAP_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Return the interval the one rule draws around one arm's mean over seeds (a figure's error bar): the
    hierarchical bootstrap's percentile interval of `values_by_seed` (numbers, or per-prompt scores per seed);
    with too few seeds given as numbers to reach `level` (`reaches_level`: ≤ 3 at 95 %) the range of the seeds,
    as the verdicts show it; (nan, nan) for one number."""
    arrays = _effects(values_by_seed)
    if not arrays:
        raise ValueError("arm_interval needs at least one seed")
    numbers = isinstance(arrays[0], float)
    if numbers and len(arrays) < 2:
        return (math.nan, math.nan)
    if numbers and not reaches_level(len(arrays), level):
        return (float(min(arrays)), float(max(arrays)))
    return hierarchical_bootstrap(arrays, resamples=resamples, level=level, seed=seed)


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
    share base model, data order and evaluation prompts. (Claims are decided from records or frames by
    `epi.analysis.evidence`, which also averages orders within a seed.)"""
    for name in ("method", column):
        if name not in frame:
            raise ValueError(f"frame has no column {name!r} (columns: {list(frame.columns)})")
    on = [k for k in keys if k in frame]
    return frame[frame["method"] == baseline].merge(frame[frame["method"] == method], on=on,
                                                    suffixes=("_base", "_m"))


# ------------------------------------------------------------------------------------------------ the verdict

def _rows(e, i: int):
    """Return one seed's effects as a float (a number) or a list of 1-D arrays (one per task/order)."""
    try:
        a = np.asarray(e, dtype=float)
    except ValueError:  # ragged: rows of different lengths (e.g. two orders whose first tasks have different sizes)
        try:
            rows = [np.asarray(r, dtype=float) for r in e]
        except (TypeError, ValueError) as err:
            raise ValueError(f"effects_by_seed[{i}] must be a number or per-prompt effects, got {e!r}") from err
        if any(r.ndim != 1 for r in rows):
            raise ValueError(f"effects_by_seed[{i}]: ragged per-prompt effects must be rows of numbers")
    else:
        if a.ndim > 2:
            raise ValueError(f"effects_by_seed[{i}] must be a number, or per-prompt effects (prompts, or tasks × "
                             f"prompts), got shape {a.shape}")
        if a.ndim == 0:
            if not math.isfinite(float(a)):
                raise ValueError(f"effects_by_seed[{i}] holds a non-finite value (nan or inf): a pair whose score "
                                 "is missing cannot be counted; drop the pair or rerun its evaluation")
            return float(a)
        rows = [a] if a.ndim == 1 else list(a)
    if not rows or any(r.size == 0 for r in rows):
        raise ValueError(f"effects_by_seed[{i}] holds an empty row of per-prompt effects")
    if not all(np.isfinite(r).all() for r in rows):
        raise ValueError(f"effects_by_seed[{i}] holds a non-finite value (nan or inf): a pair whose score is "
                         "missing cannot be counted; drop the pair or rerun its evaluation")
    return rows


def _effects(effects_by_seed) -> list:
    out = [_rows(e, i) for i, e in enumerate(effects_by_seed)]
    if out and len({isinstance(e, float) for e in out}) > 1:
        raise ValueError("effects_by_seed mixes kinds: give every seed a number, or every seed per-prompt effects "
                         "(prompts, or tasks × prompts)")
    return out


def _seed_effect(e) -> float:
    # per-seed effect: a number as given; per-prompt effects averaged per row (task/order), then over rows
    return e if isinstance(e, float) else float(np.mean([r.mean() for r in e]))


def _oriented(e, sign: float):
    return sign * e if isinstance(e, float) else [sign * r for r in e]


def hierarchical_bootstrap(effects_by_seed, *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = BOOTSTRAP_LEVEL,
                           seed: int = 0) -> tuple[float, float]:
    """Return the percentile interval at `level` of the mean effect under a two-stage bootstrap.

    Stage 1 draws seeds with replacement; stage 2 draws, for every drawn seed independently, its evaluation
    prompts with replacement (within each row — task or order — when a seed's effects have several rows).
    Per-seed numbers (no prompt-level data) skip stage 2. The generator is seeded, so the interval is
    reproducible."""
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
        for s, e in enumerate(arrays):
            hits = np.flatnonzero(drawn == s)
            if hits.size == 0:
                continue
            if isinstance(e, float):
                total[hits] += e
                continue
            seed_means = np.zeros(hits.size)
            for row in e:                                 # each task's (or order's) prompts drawn on their own
                for block in np.array_split(np.arange(hits.size), -(-hits.size * row.size // _BLOCK)):
                    seed_means[block] += row[rng.integers(row.size, size=(block.size, row.size))].mean(axis=1)
            total[hits] += seed_means / len(e)
    tail = (1 - level) / 2
    lo, hi = np.quantile(total / n, [tail, 1 - tail])
    return float(lo), float(hi)


def verdict(effects_by_seed, *, direction: str = "increase", rule: str = DEFAULT_RULE, minimum: float = 0.0,
            tolerance: float = 0.0, floor: Optional[float] = None, baseline: Optional[Sequence[float]] = None,
            n_prompts: Optional[int] = None, resamples: int = BOOTSTRAP_RESAMPLES,
            seed: int = 0) -> Verdict:
    """Return the Verdict on a claim from its paired effects, one entry per seed (orders averaged inside it).

    effects_by_seed: per seed, the difference method − baseline as a number, or the per-prompt differences on
        the shared evaluation prompts (1-D, tasks × prompts, or a list of rows of different lengths) for the
        bootstrap's prompt stage.
    direction: "increase" when the claim says the difference is positive, "decrease" when negative (e.g. "forgets
        less"); the Verdict's effect and interval are oriented so that positive is the claim's way.
    rule: "bootstrap", the one rule (see the module docstring). minimum: the smallest effect that counts.
        tolerance: non-inferiority: the claim is "not worse than −tolerance".
    floor, baseline: "not measured" when the mean of `baseline` (the baseline arm's values) is ≤ `floor`.
    n_prompts: prompts per task, for the description (taken from the arrays when they are per-prompt).
    resamples, seed: the bootstrap's size and generator seed.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    for name, value in (("minimum", minimum), ("tolerance", tolerance)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if minimum and tolerance:
        raise ValueError("give minimum (a superiority claim: the effect must exceed it) or tolerance (a "
                         "non-inferiority claim: not worse than −tolerance), not both")
    if (floor is None) != (baseline is None):
        raise ValueError("floor and baseline go together: give both (not measured when mean(baseline) <= floor)")
    sign = 1.0 if direction == "increase" else -1.0
    arrays = [_oriented(e, sign) for e in _effects(effects_by_seed)]
    per_prompt = bool(arrays) and not isinstance(arrays[0], float)
    if per_prompt and n_prompts is None:
        n_prompts = min(r.size for e in arrays for r in e)
    diffs = np.array([_seed_effect(e) for e in arrays])
    n = len(diffs)
    nan2 = (math.nan, math.nan)

    def decided(effect: float, interval: tuple[float, float], word: str) -> Verdict:
        return Verdict(float(effect), (float(interval[0]), float(interval[1])), n, n_prompts, rule, word, minimum,
                       tolerance)

    if n == 0:
        return decided(math.nan, nan2, "not measured")
    mean = diffs.mean()
    unmeasured = False
    if floor is not None:
        base = np.asarray(baseline, dtype=float)
        if base.size == 0 or not np.isfinite(base).all():
            raise ValueError("baseline must hold finite values (the baseline arm's own scores or forgetting)")
        unmeasured = bool(base.mean() <= floor)
    # bootstrap: one seed given as a number has no spread to resample; 2–3 have too little (reaches_level)
    if n < 2 and not per_prompt:
        return decided(mean, nan2, "not measured" if unmeasured else "mixed")
    if not per_prompt and not reaches_level(n):
        return decided(mean, (diffs.min(), diffs.max()), "not measured" if unmeasured else "mixed")
    lo, hi = hierarchical_bootstrap(arrays, resamples=resamples, seed=seed)
    zero, needed = -tolerance, minimum - tolerance    # the lines the interval is read against
    word = ("not measured" if unmeasured else "supported" if lo > zero and mean > needed
            else "not supported" if hi < needed else "mixed")
    return decided(mean, (lo, hi), word)

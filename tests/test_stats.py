"""The one verdict rule (epi.analysis.stats): the bootstrap's decisions on constructed effects (clear, tiny,
ruled below the minimum, negative, floor, non-inferiority, too few seeds), hand-computed intervals, determinism
and calibration, edge cases (one seed, zero variance, nan, no pairs), and the two legacy rules still named."""
import math

import numpy as np
import pandas as pd
import pytest

from epi.analysis import stats
from epi.analysis.stats import Verdict, verdict


# ---------------------------------------------------------------- noise levels

def test_score_se_is_agresti_coull_and_never_zero():
    # p̃ = (0.5·98 + 1)/100 = 0.5 → √(0.25/100) = 0.05
    assert stats.score_se(0.5, 98) == pytest.approx(0.05, abs=1e-12)
    # a score of 0 on 8 prompts: p̃ = 1/10 → √(0.09/10)
    assert stats.score_se(0.0, 8) == pytest.approx(math.sqrt(0.009), abs=1e-12)
    # negative control: the plain binomial formula claims no noise at all at a score of 0
    assert math.sqrt(0.0 * 1.0 / 8) == 0.0 < stats.score_se(0.0, 8)
    with pytest.raises(ValueError, match="n"):
        stats.score_se(0.5, 0)


def test_mean_score_se_and_difference_se_combine_independent_errors():
    # three tasks at p̃ = 0.5 on 98 prompts: √(3 · 0.05²)/3 = 0.05/√3
    assert stats.mean_score_se([0.5, 0.5, 0.5], 98) == pytest.approx(0.05 / math.sqrt(3), abs=1e-12)
    assert stats.difference_se(0.03, 0.04) == pytest.approx(0.05, abs=1e-12)
    assert stats.difference_se(0.02) == pytest.approx(0.02)
    assert stats.seed_se([1.0, 2.0, 3.0]) == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(stats.seed_se([1.0]))
    with pytest.raises(ValueError, match="at least one"):
        stats.mean_score_se([], 80)


# ---------------------------------------------------------------- the one rule: decisions on constructed effects

def _prompts(mean, n=200, sd=0.3, seed=0):
    # per-prompt differences with a given mean (a seed's paired evaluation), reproducible
    rng = np.random.default_rng(seed)
    d = rng.normal(0, sd, n)
    return d - d.mean() + mean


def test_the_default_rule_is_the_bootstrap():
    assert stats.DEFAULT_RULE == "bootstrap" and verdict([0.1, 0.2, 0.3, 0.2]).rule == "bootstrap"
    assert set(stats.RULES) == {"bootstrap"}  # one rule: seed_2se, every_pair, evaluation_2se, within_margin are gone
    with pytest.raises(ValueError, match="rule must be one of"):
        verdict([0.1, 0.2], rule="seed_2se")


def test_a_clear_positive_effect_is_supported():
    v = verdict([_prompts(0.10, seed=s) for s in range(4)], minimum=0.02)
    assert v.verdict == "supported" and v.interval[0] > 0 and v.effect == pytest.approx(0.10)
    assert v.n_seeds == 4 and v.n_prompts == 200


def test_a_tiny_positive_effect_under_the_minimum_is_mixed():
    # the interval excludes 0 (a real effect) and reaches above the minimum, but the effect is below it
    v = verdict([_prompts(0.025, sd=0.15, seed=s) for s in range(4)], minimum=0.03)
    assert v.interval[0] > 0 and v.interval[1] > 0.03 and v.effect < 0.03
    assert v.verdict == "mixed"


def test_an_effect_ruled_smaller_than_the_minimum_is_not_supported():
    # the documented reading of "excludes the minimum in the other direction": the whole interval lies below
    # +minimum, even though it also lies above 0 (real, but smaller than the claim needs)
    v = verdict([_prompts(0.01, n=2000, sd=0.05, seed=s) for s in range(4)], minimum=0.03)
    assert 0 < v.interval[0] and v.interval[1] < 0.03
    assert v.verdict == "not supported"
    # negative control: with no minimum the same data support the claim
    assert verdict([_prompts(0.01, n=2000, sd=0.05, seed=s) for s in range(4)]).verdict == "supported"


def test_a_clearly_negative_effect_is_not_supported_and_direction_flips_it():
    effects = [_prompts(-0.10, seed=s) for s in range(4)]
    assert verdict(effects).verdict == "not supported"
    v = verdict(effects, direction="decrease")
    assert v.verdict == "supported" and v.effect == pytest.approx(0.10) and v.interval[0] > 0


def test_no_effect_at_all_is_mixed():
    v = verdict([_prompts(0.0, seed=s) for s in range(4)])
    assert v.interval[0] < 0 < v.interval[1] and v.verdict == "mixed"


def test_a_baseline_below_the_floor_is_not_measured_whatever_the_effect():
    effects = [_prompts(0.10, seed=s) for s in range(4)]
    v = verdict(effects, floor=0.03, baseline=[0.004, 0.004, 0.0, 0.01])   # nb06: full SFT forgot 0.004
    assert v.verdict == "not measured" and v.interval[0] > 0               # the interval is still shown
    assert verdict(effects, floor=0.03, baseline=[0.2, 0.3, 0.2, 0.3]).verdict == "supported"
    with pytest.raises(ValueError, match="floor and baseline"):
        verdict([0.1], floor=0.03)


def test_non_inferiority_moves_the_zero_line_to_minus_the_tolerance():
    near = [_prompts(-0.01, n=1000, sd=0.1, seed=s) for s in range(4)]     # a small loss, well inside 0.05
    assert verdict(near, tolerance=0.05).verdict == "supported"
    assert verdict(near).verdict == "not supported"                         # negative control: as a superiority claim
    far = [_prompts(-0.10, n=1000, sd=0.1, seed=s) for s in range(4)]
    assert verdict(far, tolerance=0.05).verdict == "not supported"
    assert "tolerance 0.05" in verdict(near, tolerance=0.05).describe()
    with pytest.raises(ValueError, match="not both"):
        verdict(near, tolerance=0.05, minimum=0.01)


def test_few_seeds_without_prompts_cannot_reach_the_level():
    # 2 or 3 seeds as numbers: the bootstrap "interval" is the seed range, so the rule does not decide
    assert [stats.reaches_level(n) for n in range(1, 6)] == [False, False, False, True, True]
    v = verdict([0.1, 0.3])
    assert v.verdict == "mixed" and v.interval == pytest.approx((0.1, 0.3))
    assert "range of 2 seed(s)" in v.describe() and "prompts: not recorded" in v.describe()
    assert verdict([0.14, 0.10, 0.12]).verdict == "mixed"
    # four seeds, all well above 0: the seeds-only bootstrap now decides
    assert verdict([0.14, 0.10, 0.12, 0.13]).verdict == "supported"
    # the same two seeds with their prompts: the prompt stage makes an interval
    assert verdict([_prompts(0.1, seed=0), _prompts(0.3, seed=1)]).verdict == "supported"


def test_one_seed_is_mixed_at_best_and_has_no_interval():
    one = verdict([0.05])
    assert one.verdict == "mixed" and all(math.isnan(x) for x in one.interval)
    assert verdict([-0.05]).verdict == "mixed"                  # one number cannot be ruled either way


def test_zero_variance_over_four_seeds_collapses_the_interval():
    b = verdict([0.02] * 4, minimum=0.01)
    assert b.interval == pytest.approx((0.02, 0.02)) and b.verdict == "supported"
    assert verdict([0.02] * 4, minimum=0.03).verdict == "not supported"


# ---------------------------------------------------------------- one rule: the old ones are gone

def test_the_retired_rules_are_refused_by_name():
    for old in ("seed_2se", "every_pair", "evaluation_2se", "within_margin"):
        with pytest.raises(ValueError, match="rule must be one of"):
            verdict([0.1, 0.2, 0.3, 0.4], rule=old)


# ---------------------------------------------------------------- the calibrated rule: hierarchical bootstrap

def test_bootstrap_of_four_seeds_by_hand():
    # resampled mean of {0, 0, 0, 0.4} = 0.1·k, k ~ Binomial(4, 1/4) draws of 0.4: the 2.5 % quantile is 0
    # (P(k = 0) = 81/256 = 0.32); the 97.5 % one is 0.3 (P(k ≤ 2) = 243/256 = 0.949, P(k ≤ 3) = 0.996)
    v = verdict([0.0, 0.0, 0.0, 0.4], resamples=200_000)
    assert v.effect == pytest.approx(0.1) and v.interval[0] == pytest.approx(0.0)
    assert v.interval[1] == pytest.approx(0.3) and v.verdict == "mixed"


def test_bootstrap_resamples_prompts_inside_seeds():
    # one seed, two prompts with differences 0 and 1: means 0, 0.5, 1 → interval (0, 1), touching 0: mixed
    v = verdict([np.array([0.0, 1.0])])
    assert v.interval == pytest.approx((0.0, 1.0)) and v.verdict == "mixed" and v.n_prompts == 2
    # four seeds with the same mean: seeds alone show no spread, their prompts do
    prompts = [np.tile([0.0, 1.0], 40), np.tile([1.0, 0.0], 40)] * 2
    seeds_only = verdict([p.mean() for p in prompts])
    both = verdict(prompts)
    assert seeds_only.interval == pytest.approx((0.5, 0.5))
    assert both.interval[0] < 0.45 and both.interval[1] > 0.55 and both.n_prompts == 80


def test_bootstrap_interval_matches_the_normal_approximation_for_one_seed():
    # 400 prompt differences in {−1, 0, 1}: half-width ≈ 1.96·sd/√400
    rng = np.random.default_rng(3)
    d = rng.choice([-1.0, 0.0, 1.0], size=400, p=[0.2, 0.5, 0.3])
    lo, hi = stats.hierarchical_bootstrap([d], resamples=20_000, seed=1)
    expected = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert (hi - lo) / 2 == pytest.approx(expected, rel=0.08)
    assert lo < d.mean() < hi


def test_bootstrap_handles_tasks_by_prompts_and_ragged_rows():
    # per-seed effect = mean over tasks of each task's mean; tasks are resampled separately
    a = np.array([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])      # task means 0.5 and 1.0 → 0.75
    v = verdict([a, a + 0.0])
    assert v.effect == pytest.approx(0.75) and v.n_prompts == 4
    lo, hi = v.interval
    assert 0.5 <= lo < 0.75 < hi <= 1.0                             # only the first task's prompts vary
    # rows of different lengths (two orders whose first tasks have different prompt counts)
    ragged = [[0.0, 0.0, 1.0, 1.0], [1.0, 1.0]]
    r = verdict([ragged, ragged])
    assert r.effect == pytest.approx(0.75) and r.n_prompts == 2 and r.interval == pytest.approx(v.interval, abs=0.01)


def test_bootstrap_is_deterministic_under_its_seed():
    effects = [np.linspace(-0.2, 0.4, 50), np.linspace(-0.1, 0.3, 50), np.linspace(0.0, 0.2, 50)]
    first = stats.hierarchical_bootstrap(effects, seed=7)
    assert stats.hierarchical_bootstrap(effects, seed=7) == first
    assert stats.hierarchical_bootstrap(effects, seed=8) != first   # negative control: the seed is what fixes it


def test_bootstrap_false_support_rate_under_no_effect_is_near_its_level():
    # 200 claims with no true effect (4 seeds × 100 prompts, seed-level and prompt-level noise): about 2.5 %
    # should be marked supported; a generous bound keeps the test stable
    rng = np.random.default_rng(11)
    supported = 0
    for i in range(200):
        effects = [rng.normal(rng.normal(0, 0.02), 0.3, 100) for _ in range(4)]
        supported += verdict(effects, resamples=1000, seed=i).verdict == "supported"
    assert supported <= 12                                           # ≤ 6 % (expected ≈ 2.5–5 %)


# ---------------------------------------------------------------- refusals and empty input

def test_nan_and_bad_arguments_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match=r"effects_by_seed\[1\].*non-finite"):
        verdict([0.1, float("nan")])
    with pytest.raises(ValueError, match=r"effects_by_seed\[0\]"):
        verdict([np.array([0.1, np.inf])], rule="bootstrap")
    with pytest.raises(ValueError, match="mixes kinds"):
        verdict([0.1, np.array([0.1, 0.2])])
    with pytest.raises(ValueError, match="rule must be one of"):
        verdict([0.1], rule="t_test")
    with pytest.raises(ValueError, match="direction"):
        verdict([0.1], direction="up")
    with pytest.raises(ValueError, match="minimum"):
        verdict([0.1], minimum=-0.1)
    with pytest.raises(ValueError, match="baseline"):
        verdict([0.1], floor=0.0, baseline=[float("nan")])


def test_no_pairs_is_not_measured():
    v = verdict([])
    assert v.verdict == "not measured" and v.n_seeds == 0 and math.isnan(v.effect)
    assert v.describe() == "no pairs · rule: bootstrap → not measured"


# ---------------------------------------------------------------- what a verdict line says

def test_describe_names_effect_interval_seeds_prompts_and_rule():
    v = verdict([np.array([0.1, 0.2, 0.3])] * 4, n_prompts=80, resamples=100)
    line = v.describe()
    assert line.startswith("effect +0.200 [95% hierarchical bootstrap: +")
    assert line.endswith("] over 4 seed(s), 80 prompts per task · rule: bootstrap → supported")
    assert "minimum 0.03" in verdict([0.1, 0.05, 0.1, 0.08], minimum=0.03).describe()
    assert "prompts: not recorded" in verdict([0.1, 0.05, 0.1, 0.08]).describe()
    one_seed = verdict([np.array([0.1, 0.2, 0.3] * 40)], n_prompts=120, resamples=100).describe()
    assert "(one seed: the interval covers evaluation noise, not seed-to-seed variation)" in one_seed
    assert "one seed" not in line
    d = verdict([0.05]).to_dict()
    assert d["interval"] == [None, None] and d["verdict"] == "mixed" and d["rule"] == "bootstrap"
    assert set(d) == set(Verdict.__dataclass_fields__)
    assert verdict([]).to_dict()["effect"] is None                   # strict JSON: no nan


def test_pairs_match_runs_by_seed_and_direction():
    df = pd.DataFrame({"method": ["full_sft", "epi", "full_sft", "epi", "epi"],
                       "seed": [0, 0, 0, 0, 1], "direction": ["a→b", "a→b", "b→a", "b→a", "a→b"],
                       "forgetting_A": [0.5, 0.2, 0.4, 0.45, 0.1]})
    p = stats.pairs(df, "forgetting_A", "epi", "full_sft")
    assert len(p) == 2                                               # seed 1 has no baseline: unpaired
    assert sorted((p.forgetting_A_base - p.forgetting_A_m).round(3)) == [-0.05, 0.3]
    with pytest.raises(ValueError, match="no column 'loss'"):
        stats.pairs(df, "loss", "epi", "full_sft")

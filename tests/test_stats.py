"""The one verdict rule (epi.analysis.stats): hand-computed cases for every rule, the bootstrap's determinism
and coverage, edge cases (one seed, zero variance, nan, no pairs), and equality with the four rules it replaced."""
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


# ---------------------------------------------------------------- the legacy rules, now parameters

def test_seed_2se_on_three_seeds_by_hand():
    # notebook 04's EPI-per-task vs random gains: mean 0.015667, sd 0.013429, se 0.007753 → 2 se = 0.015506
    v = verdict([0.031, 0.006, 0.010])
    assert v.rule == "seed_2se" and v.n_seeds == 3
    assert v.effect == pytest.approx(0.0156667, abs=1e-6)
    assert v.interval[0] == pytest.approx(0.0156667 - 0.0155064, abs=1e-6)
    assert v.verdict == "supported"
    # a slightly weaker third seed drops it below 2 se
    assert verdict([0.031, 0.006, 0.002]).verdict == "mixed"
    assert verdict([0.01, -0.02]).verdict == "not supported"
    assert verdict([0.0, 0.0]).verdict == "not supported"  # no effect is not an effect


def test_one_seed_is_mixed_at_best_and_has_no_interval():
    one = verdict([0.05])
    assert one.verdict == "mixed" and all(math.isnan(x) for x in one.interval)
    assert verdict([-0.05]).verdict == "not supported"
    assert verdict([0.05], rule="bootstrap").verdict == "mixed"  # nothing to resample


def test_zero_variance_over_seeds():
    # every seed agrees: the seed-level se is 0, so any positive mean clears 2 se (the seed rule's known
    # leniency); the seed-only bootstrap interval collapses to the point as well
    v = verdict([0.02, 0.02, 0.02])
    assert v.verdict == "supported" and v.interval == pytest.approx((0.02, 0.02))
    b = verdict([0.02, 0.02, 0.02], rule="bootstrap", minimum=0.01)
    assert b.interval == pytest.approx((0.02, 0.02)) and b.verdict == "supported"
    assert verdict([0.02, 0.02, 0.02], rule="bootstrap", minimum=0.03).verdict == "not supported"


def test_direction_decrease_orients_effect_and_interval():
    v = verdict([-0.1, -0.2], direction="decrease", rule="every_pair")
    assert v.effect == pytest.approx(0.15) and v.interval == pytest.approx((0.1, 0.2))
    assert v.verdict == "supported"
    assert verdict([-0.1, -0.2], rule="every_pair").verdict == "not supported"  # the same data, claimed upward


def test_every_pair_rule_with_minimum_and_floor():
    assert verdict([0.1, 0.05], rule="every_pair", minimum=0.03).verdict == "supported"
    assert verdict([0.1, -0.01], rule="every_pair", minimum=0.03).verdict == "mixed"   # one pair against
    assert verdict([0.01, 0.02], rule="every_pair", minimum=0.03).verdict == "mixed"   # below the minimum
    assert verdict([-0.1, 0.05], rule="every_pair", minimum=0.03).verdict == "not supported"
    # the baseline forgot 0.025 on average: nothing to reduce, whatever the effect
    v = verdict([0.1, 0.05], rule="every_pair", minimum=0.03, floor=0.03, baseline=[0.02, 0.03])
    assert v.verdict == "not measured" and v.effect == pytest.approx(0.075)
    assert verdict([0.1, 0.05], rule="every_pair", minimum=0.03, floor=0.03,
                   baseline=[0.02, 0.05]).verdict == "supported"
    with pytest.raises(ValueError, match="floor and baseline"):
        verdict([0.1], floor=0.03)


def test_within_margin_is_non_inferiority():
    # effects = method − baseline learning; the claim: no pair loses more than 0.03
    assert verdict([-0.01, -0.02], rule="within_margin", minimum=0.03).verdict == "supported"
    assert verdict([-0.05, 0.0], rule="within_margin", minimum=0.03).verdict == "mixed"
    assert verdict([-0.05, -0.04], rule="within_margin", minimum=0.03).verdict == "not supported"
    assert verdict([-0.03], rule="within_margin", minimum=0.03).verdict == "supported"  # at the margin: within


def test_evaluation_2se_reads_the_given_noise():
    assert verdict([0.1], rule="evaluation_2se", noise=0.077).verdict == "supported"
    assert verdict([0.05], rule="evaluation_2se", noise=0.077).verdict == "mixed"
    assert verdict([-0.01], rule="evaluation_2se", noise=0.077).verdict == "not supported"
    assert verdict([0.05], rule="evaluation_2se", noise=0.077).interval == pytest.approx((0.05 - 0.077, 0.127))
    with pytest.raises(ValueError, match="noise"):
        verdict([0.1], rule="evaluation_2se")


# ---------------------------------------------------------------- the calibrated rule: hierarchical bootstrap

def test_bootstrap_of_two_seeds_by_hand():
    # resampled means of {0.1, 0.3}: 0.1, 0.2, 0.3 with probability 1/4, 1/2, 1/4 → 95 % interval (0.1, 0.3)
    v = verdict([0.1, 0.3], rule="bootstrap", minimum=0.05)
    assert v.interval == pytest.approx((0.1, 0.3)) and v.effect == pytest.approx(0.2)
    assert v.verdict == "supported" and v.n_prompts is None
    assert verdict([0.1, 0.3], rule="bootstrap", minimum=0.25).verdict == "mixed"   # effect below the minimum
    assert verdict([-0.1, -0.3], rule="bootstrap").verdict == "not supported"       # interval below 0


def test_bootstrap_resamples_prompts_inside_seeds():
    # one seed, two prompts with differences 0 and 1: means 0, 0.5, 1 → interval (0, 1), touching 0: mixed
    v = verdict([np.array([0.0, 1.0])], rule="bootstrap")
    assert v.interval == pytest.approx((0.0, 1.0)) and v.verdict == "mixed" and v.n_prompts == 2
    # two seeds with the same mean: seeds alone show no spread, their prompts do
    prompts = [np.tile([0.0, 1.0], 40), np.tile([1.0, 0.0], 40)]
    seeds_only = verdict([p.mean() for p in prompts], rule="bootstrap")
    both = verdict(prompts, rule="bootstrap")
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


def test_bootstrap_handles_tasks_by_prompts():
    # per-seed effect = mean over tasks of each task's mean; tasks are resampled separately
    a = np.array([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])      # task means 0.5 and 1.0 → 0.75
    v = verdict([a, a + 0.0], rule="bootstrap")
    assert v.effect == pytest.approx(0.75) and v.n_prompts == 4
    lo, hi = v.interval
    assert 0.5 <= lo < 0.75 < hi <= 1.0                             # only the first task's prompts vary


def test_bootstrap_is_deterministic_under_its_seed():
    effects = [np.linspace(-0.2, 0.4, 50), np.linspace(-0.1, 0.3, 50), np.linspace(0.0, 0.2, 50)]
    first = stats.hierarchical_bootstrap(effects, seed=7)
    assert stats.hierarchical_bootstrap(effects, seed=7) == first
    assert stats.hierarchical_bootstrap(effects, seed=8) != first   # negative control: the seed is what fixes it


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
    assert v.describe() == "no pairs · rule: seed_2se → not measured"


# ---------------------------------------------------------------- what a verdict line says

def test_describe_names_effect_interval_seeds_prompts_and_rule():
    v = verdict([0.1, 0.3], rule="every_pair", n_prompts=80)
    assert v.describe() == ("effect +0.200 [range of pairs: +0.100, +0.300] over 2 seed(s), 80 prompts per task · "
                            "rule: every_pair → supported")
    assert verdict([0.05]).describe() == ("effect +0.050 [mean ± 2 se over seeds: not estimable] over 1 seed(s) · "
                                          "rule: seed_2se → mixed")
    assert "minimum 0.03" in verdict([0.1, 0.05], rule="every_pair", minimum=0.03).describe()
    d = verdict([0.05]).to_dict()
    assert d["interval"] == [None, None] and d["verdict"] == "mixed" and d["rule"] == "seed_2se"
    assert set(d) == set(Verdict.__dataclass_fields__)


def test_pairs_match_runs_by_seed_and_direction():
    df = pd.DataFrame({"method": ["full_sft", "epi", "full_sft", "epi", "epi"],
                       "seed": [0, 0, 0, 0, 1], "direction": ["a→b", "a→b", "b→a", "b→a", "a→b"],
                       "forgetting_A": [0.5, 0.2, 0.4, 0.45, 0.1]})
    p = stats.pairs(df, "forgetting_A", "epi", "full_sft")
    assert len(p) == 2                                               # seed 1 has no baseline: unpaired
    assert sorted((p.forgetting_A_base - p.forgetting_A_m).round(3)) == [-0.05, 0.3]
    with pytest.raises(ValueError, match="no column 'loss'"):
        stats.pairs(df, "loss", "epi", "full_sft")


# ---------------------------------------------------------------- the rules it replaced decide the same

def _notebook_verdict(diffs):           # notebooks 02/04 and 07 before issue 13
    diffs = np.asarray(diffs, dtype=float)
    if diffs.mean() <= 0:
        return "not supported"
    if len(diffs) < 2:
        return "mixed"
    se = diffs.std(ddof=1) / np.sqrt(len(diffs))
    return "supported" if diffs.mean() > 2 * se else "mixed"


def _notebook_06_call(d, noise):
    return "supported" if d > noise else ("mixed" if d > 0 else "not supported")


def _reduction(diffs, base_mean, margin):   # epi.report.reduction_claim before issue 13
    mean_diff = sum(diffs) / len(diffs)
    if base_mean <= margin:
        return "not measured"
    if min(diffs) > 0 and mean_diff > margin:
        return "supported"
    return "not supported" if mean_diff <= 0 else "mixed"


def _learning_cost(cost, base_mean, margin):  # notebook 05's learning claim before issue 13
    return ("not measured" if base_mean <= margin else "supported" if max(cost) <= margin
            else "not supported" if sum(cost) / len(cost) > margin else "mixed")


def test_the_legacy_rules_are_parameters_of_the_one_verdict():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 7))
        diffs = list(np.round(rng.normal(rng.uniform(-0.05, 0.08), rng.uniform(0, 0.06), n), 3))
        base = list(np.round(rng.uniform(0, 0.1, n), 3))
        assert verdict(diffs).verdict == _notebook_verdict(diffs)
        if n == 1:
            assert verdict(diffs, rule="evaluation_2se", noise=0.04).verdict == _notebook_06_call(diffs[0], 0.04)
        assert verdict(diffs, rule="every_pair", minimum=0.03, floor=0.03, baseline=base).verdict == \
            _reduction(diffs, sum(base) / n, 0.03)
        cost = [-d for d in diffs]
        assert verdict(diffs, rule="within_margin", minimum=0.03, floor=0.03, baseline=base).verdict == \
            _learning_cost(cost, sum(base) / n, 0.03)

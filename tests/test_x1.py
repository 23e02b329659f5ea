"""X1's design (epi.experiments.x1): every arm at every seed on its block's base, distinct run folders, the
claims it decides, and the detectable-effect formula."""
import math

import numpy as np
import pytest
from test_evidence import mix_record

from epi.experiments import x1
from epi.experiments.profiles import NEVER_REFRESH


def test_design_has_every_arm_at_eight_seeds_on_two_bases():
    cs = x1.configs()
    assert len(cs) == 9 * 8
    assert len({c.run_name for c in cs}) == len(cs)                     # no two runs share a folder
    assert {c.seed for c in cs} == set(range(8))
    assert {(c.seed, c.start_seed) for c in cs} == {(s, s // 4) for s in range(8)}
    labels = {c.arm for c in cs}
    assert {"full_sft", "full_sft@lr=0.00077", "epi_per_task@refresh_every=0", "random_per_task", "hft"} <= labels
    static = [c for c in cs if c.arm == "epi_per_task@refresh_every=0"]
    assert all(c.refresh_every == NEVER_REFRESH and c.epi_config().refresh_every is None for c in static)
    assert x1.low_lr(1e-3) == pytest.approx(0.77e-3)


def test_detectable_effect_is_2_8_standard_errors():
    se = 0.01
    d = {"interval": [-1.959964 * se, 1.959964 * se]}
    assert x1.detectable(d) == pytest.approx((1.959964 + 0.841621) * se, rel=1e-4)
    assert math.isnan(x1.detectable(None)) and math.isnan(x1.detectable({"interval": [None, None]}))


def test_claims_are_decided_for_present_arms_and_not_measured_otherwise():
    rng = np.random.default_rng(0)
    recs = []
    for s in range(4):
        base = {t: (rng.random(200) < 0.4).astype(float) for t in ("math", "code")}
        better = {t: np.where((a == 0) & (rng.random(200) < 0.2), 1.0, a) for t, a in base.items()}
        recs += [mix_record("random_per_task", s, base), mix_record("epi_per_task", s, better)]
    claims = x1.decide_claims(recs)
    by = {(c["method"], c["baseline"]): c for c in claims}
    main = by[("epi_per_task", "random_per_task")]
    assert main["verdict"] == "supported" and main["question"] == "importance vs structure"
    assert 0 < main["detectable"] < main["decision"]["effect"]
    assert by[("epi", "random_global")]["verdict"] == "not measured"
    frame = x1.claims_frame(claims)
    assert list(frame.columns)[:4] == ["question", "claim", "method", "baseline"]
    assert frame.loc[frame.method.eq("epi_per_task") & frame.baseline.eq("random_per_task"), "seeds"].item() == 4


def test_select_keeps_the_designs_runs_only():
    good = mix_record("epi", 5, {"math": [1.0, 0.0]}, base_seed=1, profile="cpu")
    wrong_base = mix_record("epi", 5, {"math": [1.0, 0.0]}, base_seed=0, profile="cpu")
    other_arm = mix_record("ewc", 0, {"math": [1.0]}, base_seed=0, profile="cpu")
    smoke = mix_record("epi", 0, {"math": [1.0]})
    assert x1.select([good, wrong_base, other_arm, smoke]) == [good]


def test_effects_figure_draws_each_decided_claim_with_its_interval(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from epi.analysis import plots
    claims = [{"claim": "a", "method": "epi", "baseline": "full_sft", "verdict": "supported",
               "decision": {"effect": 0.04, "interval": [0.02, 0.06]}},
              {"claim": "b", "method": "epi", "baseline": "hft", "verdict": "not supported",
               "decision": {"effect": 0.0, "interval": [-0.01, 0.01]}},
              {"claim": "c", "method": "x", "baseline": "y", "verdict": "not measured"}]
    fig, ax = plt.subplots()
    plots.effect_intervals(claims, ax=ax, minimum=0.02)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["epi vs hft", "epi vs full_sft"]
    assert "95% interval" in ax.get_legend().get_title().get_text()
    assert "method − baseline" in ax.get_xlabel()
    lines = [l for l in ax.get_lines() if len(l.get_xdata()) == 2 and l.get_xdata()[0] != l.get_xdata()[1]]
    assert sorted(tuple(l.get_xdata()) for l in lines) == [(-0.01, 0.01), (0.02, 0.06)]
    plt.close(fig)
    assert x1.figure(claims, tmp_path, "t").is_file()

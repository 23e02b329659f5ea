"""Every figure function renders on a fixture with labelled axes, and a method keeps its colour in every figure."""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

import epi.methods  # noqa: E402
from epi.analysis import plots, stats  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _frame():
    rows = []
    for m in ("epi", "full_sft", "full_sft@lr=0.00077", "random"):
        for s in range(3):
            rows.append({"method": m, "seed": s, "score_math": 0.4 + 0.01 * s, "score_code": 0.5, "mean_score": 0.45})
    return pd.DataFrame(rows)


def _history():
    return [{"step": s, "scope_key": "global", "jaccard_prev": None if s == 10 else 0.7, "jaccard_first": 0.6,
             "spearman_prev": 0.8, "per_layer": {"model.layers.0.mlp.up_proj.weight": 0.1,
                                                 "model.layers.0.self_attn.q_proj.weight": 0.05}}
            for s in (10, 20, 30)]


def test_every_method_has_its_own_colour_and_arms_keep_the_hue():
    assert set(epi.methods.METHODS) <= set(plots.METHOD_COLOURS)
    colours = [plots.METHOD_COLOURS[m] for m in epi.methods.METHODS]
    assert len(set(colours)) == len(colours)
    arm = plots.method_colour("full_sft@lr=0.00077")
    assert arm != plots.method_colour("full_sft") and arm.startswith("#")
    assert plots.method_colour("no_such_method") == "#999999"
    assert sorted(["random", "full_sft@lr=1", "epi", "full_sft"], key=plots.method_sort_key) == \
        ["full_sft", "full_sft@lr=1", "epi", "random"]


def test_method_bars_colour_each_method_and_say_what_the_lines_are():
    ax = plots.method_bars(_frame(), ["score_math", "score_code", "mean_score"], title="t")
    legend = ax.get_legend()
    names = [t.get_text() for t in legend.get_texts()]
    assert names == ["full_sft", "full_sft@lr=0.00077", "epi", "random"]          # the suite's order
    for handle, name in zip(legend.legend_handles, names):
        assert to_hex(handle.get_facecolor()) == plots.method_colour(name)
    assert ax.get_ylabel() == "score"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["math", "code", "mean of tasks"]   # words, not columns
    # the lines are the one rule's intervals (seed range with <= 3 seeds), said so in the legend
    assert "3 seed(s)" in legend.get_title().get_text() and "range of the seeds" in legend.get_title().get_text()
    frame = _frame()
    lo, hi = stats.arm_interval(frame[frame.method == "epi"]["score_math"].tolist())
    ends = {round(float(y), 9) for line in ax.get_lines() for y in line.get_ydata()}
    assert (lo, hi) == pytest.approx((0.4, 0.42)) and {round(lo, 9), round(hi, 9)} <= ends


def test_arm_interval_is_the_seed_range_below_four_seeds_and_the_bootstrap_above():
    assert stats.arm_interval([0.2, 0.5, 0.3]) == (0.2, 0.5)
    assert all(math.isnan(v) for v in stats.arm_interval([0.4]))
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    lo, hi = stats.arm_interval(values)
    assert (lo, hi) == stats.hierarchical_bootstrap(values) and 0.1 < lo < 0.45 < hi < 0.8
    # per-prompt scores widen it by the evaluation noise
    prompts = [(np.arange(50) < round(50 * v)).astype(float) for v in values]   # each seed's mean is its value
    plo, phi = stats.arm_interval(prompts)
    assert phi - plo > hi - lo


def test_lines_keep_a_methods_colour_and_band_it_alike():
    ax = plots.lines([1, 2, 3], {"epi": [0.1, 0.2, 0.3], "other": [0.3, 0.2, 0.1]}, xlabel="p", ylabel="forgetting",
                     errors={"epi": [0.01, 0.01, 0.01]})
    line = {l.get_label(): l for l in ax.get_lines()}
    assert to_hex(line["epi"].get_color()) == plots.METHOD_COLOURS["epi"]
    band = ax.collections[0]
    assert to_hex(band.get_facecolor()[0][:3]) == plots.METHOD_COLOURS["epi"]
    assert ax.get_xlabel() == "p" and ax.get_ylabel() == "forgetting"


def test_drift_and_heatmaps_render_with_labels():
    ax = plots.drift_curves(_history())
    assert ax.get_xlabel() == "optimizer step" and len(ax.get_legend().get_texts()) == 3
    ax = plots.per_layer_heatmap(_history())
    assert ax.get_xlabel() == "refresh step" and [t.get_text() for t in ax.get_yticklabels()] == ["L0.up_proj", "L0.q_proj"]
    ax = plots.matrix_heatmap(np.eye(3), ["a", "b", "c"], title="J")
    assert ax.get_title() == "J" and [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_savefig_writes_png(tmp_path):
    fig, _ = plt.subplots()
    path = plots.savefig(fig, "x", tmp_path)
    assert path == tmp_path / "figures" / "x.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_drift_readings_keep_their_colours_and_shares_their_scale():
    ax = plots.drift_curves(_history())
    by_label = {l.get_label(): to_hex(l.get_color()) for l in ax.get_lines()}
    assert by_label["Jaccard vs previous mask"] == plots.DRIFT_COLOURS["jaccard_prev"]
    assert by_label["Jaccard vs first mask"] == plots.DRIFT_COLOURS["jaccard_first"]
    ax = plots.per_layer_heatmap(_history(), ratio=0.1)
    mesh = ax.collections[0]
    assert mesh.norm.vmin == 0.0 and mesh.norm.vmax == pytest.approx(0.2)     # 0 to 2p: p mid-scale
    assert "protected share" in mesh.colorbar.ax.get_ylabel()
    ax = plots.lines([1, 2], {"a": [0.1, 0.2]}, colours={"a": "#123456"})
    assert to_hex(ax.get_lines()[0].get_color()) == "#123456"


def test_seed_bands_are_the_rules_interval_per_point_and_say_so():
    values = np.array([[0.1, np.nan, 0.5], [0.3, 0.2, 0.6], [0.2, 0.4, 0.7]])   # 3 seeds × 3 points
    lo, hi = plots.seed_bands(values)
    assert np.allclose(lo, [0.1, np.nan, 0.5], equal_nan=True) and np.allclose(hi, [0.3, np.nan, 0.7], equal_nan=True)
    assert plots.band_label(3) == "range of the 3 seeds" and plots.band_label(8) == "95% bootstrap interval over seeds"
    ax = plots.lines([1, 2, 3], {"epi": values[1]}, bands={"epi": (lo, hi)}, xlabel="step", ylabel="Jaccard")
    (band,) = ax.collections
    assert to_hex(band.get_facecolor()[0][:3]) == plots.method_colour("epi")

"""The mask, drawn (epi.analysis.maskviz): classes, pooling, figures and the GIF on masks whose answer is known."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from epi.analysis import maskviz  # noqa: E402
from epi.analysis.maskviz import FREE, KEPT, NEW, RELEASED  # noqa: E402


def known_masks():
    """Three refreshes of an 8×8 tensor: (masks by step, expected counts per step vs the step before)."""
    a = np.zeros((8, 8), dtype=bool)
    a[0, :4] = True                                     # 4 protected
    b = a.copy()
    b[0, 3] = False                                     # released 1, kept 3
    b[5, 5:7] = True                                    # newly protected 2
    c = b.copy()
    c[0, :3] = False                                    # released 3
    c[7, 0] = True                                      # new 1; kept: (5,5), (5,6)
    expected = {10: {"kept": 0, "newly protected": 4, "released": 0},
                20: {"kept": 3, "newly protected": 2, "released": 1},
                30: {"kept": 2, "newly protected": 1, "released": 3}}
    return {10: a, 20: b, 30: c}, expected


def test_transition_classes_count_kept_new_and_released():
    masks, expected = known_masks()
    frames = maskviz.evolution(masks, max_side=64)
    assert [f["step"] for f in frames] == [10, 20, 30]
    assert {f["step"]: f["counts"] for f in frames} == expected
    # unpooled: the frame's class map is the coordinates' classes themselves
    assert frames[1]["codes"][0, 3] == RELEASED and frames[1]["codes"][5, 5] == NEW
    assert frames[1]["codes"][0, 0] == KEPT and frames[1]["codes"][3, 3] == FREE
    # negative control: a mask compared with itself has only kept coordinates
    same = maskviz.transition_counts(maskviz.transition_codes(masks[20], masks[20]))
    assert same == {"kept": 5, "newly protected": 0, "released": 0}


def test_torch_masks_give_the_same_classes_as_numpy():
    masks, expected = known_masks()
    frames = maskviz.evolution({s: torch.from_numpy(m) for s, m in masks.items()})
    assert {f["step"]: f["counts"] for f in frames} == expected


def test_class_pooling_keeps_every_block_that_holds_a_protected_coordinate():
    rng = np.random.default_rng(0)
    before, now = rng.random((100, 60)) < 0.02, rng.random((100, 60)) < 0.02
    codes = maskviz.transition_codes(before, now)
    factor = maskviz.block_factor(codes.shape, 16)
    assert factor == 7                                   # ceil(100 / 16)
    pooled = maskviz.pool_codes(codes, factor)
    assert pooled.shape == (15, 9)                       # ceil(100/7) × ceil(60/7): the ragged edge is padded
    touched = np.zeros(pooled.shape, dtype=bool)
    for i, j in zip(*np.nonzero(before | now)):
        touched[i // factor, j // factor] = True
    assert ((pooled != FREE) == touched).all()           # blank exactly where nothing was protected before or now
    # a block's class is one that occurs in it
    for i, j in zip(*np.nonzero(pooled)):
        assert pooled[i, j] in codes[i * factor:(i + 1) * factor, j * factor:(j + 1) * factor]


def test_class_pooling_breaks_ties_towards_change():
    codes = np.array([[KEPT, NEW], [FREE, FREE]], dtype=np.int8)
    assert maskviz.pool_codes(codes, 2)[0, 0] == NEW
    codes = np.array([[KEPT, RELEASED], [FREE, FREE]], dtype=np.int8)
    assert maskviz.pool_codes(codes, 2)[0, 0] == RELEASED
    codes = np.array([[KEPT, KEPT], [RELEASED, FREE]], dtype=np.int8)
    assert maskviz.pool_codes(codes, 2)[0, 0] == KEPT    # a majority wins over the tie order


def test_share_pooling_is_the_block_mean_without_padding():
    mask = np.zeros((3, 5), dtype=bool)
    mask[0, 0] = mask[2, 4] = True
    share = maskviz.pool_share(mask, 2)
    assert share.shape == (2, 3)
    assert share[0, 0] == pytest.approx(1 / 4) and share[1, 2] == pytest.approx(1.0)  # (2, 4) is alone in its block
    assert share[0, 1] == 0.0


def test_different_shapes_or_non_bool_masks_are_refused_with_a_clear_error():
    masks, _ = known_masks()
    with pytest.raises(ValueError, match="same shape"):
        maskviz.evolution({1: masks[10], 2: np.zeros((8, 9), dtype=bool)})
    with pytest.raises(ValueError, match="same shape"):
        maskviz.transition_codes(np.zeros((4, 4), dtype=bool), np.zeros((2, 8), dtype=bool))
    with pytest.raises(ValueError, match="bools"):
        maskviz.transition_codes(None, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="no masks"):
        maskviz.evolution({})


def test_evolution_figure_has_counts_in_titles_a_legend_and_the_pooled_data():
    masks, _ = known_masks()
    frames = maskviz.evolution(masks)
    fig = maskviz.plot_evolution({"math's set": frames, "code's set": frames}, tensor="L0.q")
    try:
        axes = [ax for ax in fig.axes if ax.images]
        assert len(axes) == 6                            # 2 rows × 3 refreshes
        assert "kept 3 · new 2" in axes[1].get_title() and "released 1" in axes[1].get_title()
        assert np.array_equal(axes[2].images[0].get_array(), frames[2]["codes"])
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["kept", "newly protected", "released"]
        assert "L0.q" in fig._suptitle.get_text()
        assert axes[0].get_ylabel() == "math's set" and axes[3].get_ylabel() == "code's set"
    finally:
        plt.close(fig)


def test_evolution_figure_shows_at_most_max_panels_with_first_and_last():
    masks = {s: np.eye(4, dtype=bool) for s in range(0, 100, 10)}
    fig = maskviz.plot_evolution(maskviz.evolution(masks), max_panels=4)
    try:
        titles = [ax.get_title().splitlines()[0] for ax in fig.axes if ax.images]
        assert titles[0] == "step 0" and titles[-1] == "step 90" and len(titles) == 4
    finally:
        plt.close(fig)


def test_gif_has_one_frame_per_refresh(tmp_path):
    masks, _ = known_masks()
    frames = maskviz.evolution(masks)
    path = maskviz.animate_evolution({"global": frames, "math's set": frames}, tmp_path / "figures" / "evo.gif",
                                     tensor="L0.q", dpi=40)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3
    with pytest.raises(ValueError, match="same refresh steps"):
        maskviz.animate_evolution({"a": frames, "b": frames[:2]}, tmp_path / "bad.gif")


def test_layer_maps_one_panel_per_tensor_with_share_titles():
    masks = {"model.layers.0.self_attn.q_proj.weight": np.eye(16, dtype=bool),
             "model.layers.0.mlp.up_proj.weight": np.zeros((64, 16), dtype=bool)}
    fig = maskviz.plot_layer_maps(masks, step=5, max_side=8, ncols=2)
    try:
        axes = [ax for ax in fig.axes if ax.images and ax.get_title()]
        assert [ax.get_title() for ax in axes] == ["L0.q · 6.2%", "L0.up · 0.0%"]
        assert axes[0].images[0].get_array().shape == (2, 2)   # one factor for all: 64 / 8 = 8
        assert "step 5" in fig._suptitle.get_text()
        assert any("protected share of the block" in ax.get_ylabel() for ax in fig.axes)
    finally:
        plt.close(fig)


def test_share_table_and_heatmap_rows_are_tensors_and_columns_refreshes():
    masks, _ = known_masks()
    by_step = {s: {"model.layers.0.self_attn.q_proj.weight": m, "model.layers.1.mlp.up_proj.weight": ~m}
               for s, m in masks.items()}
    table = maskviz.protected_shares(by_step)
    assert list(table.columns) == [10, 20, 30] and table.shape == (2, 3)
    assert table.iloc[0, 0] == pytest.approx(4 / 64) and table.iloc[1, 0] == pytest.approx(60 / 64)
    fig = maskviz.plot_share_heatmap({"math's set": table, "code's set": table}, ratio=0.05)
    try:
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title() for ax in panels] == ["math's set", "code's set"]
        assert panels[0].get_xlabel().startswith("refresh step")
        assert [t.get_text() for t in panels[0].get_yticklabels()] == ["L0.q", "L1.up"]
        assert any("p = 5 %" in ax.get_ylabel() for ax in fig.axes)   # the colour bar says where p sits
    finally:
        plt.close(fig)


def test_recorder_copies_the_engines_sets_at_each_refresh():
    from epi import EPIConfig, EvolvingIsolation
    from tests.helpers import small_llama
    torch.manual_seed(0)
    model = small_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    iso = EvolvingIsolation(model, EPIConfig(ratio=0.1, warmup_steps=2, refresh_every=2)).attach(opt)
    rec = maskviz.RefreshRecorder(iso)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    for _ in range(6):
        model(input_ids=ids, labels=ids).loss.backward()
        iso.observe(None)
        opt.step()
        opt.zero_grad()
        rec()
    assert sorted(rec.masks["global"]) == [2, 4, 6]
    last = rec.masks["global"][6]
    assert all(np.array_equal(last[n], m.numpy()) for n, m in iso.masks.items())
    assert sorted(rec.tensor(iso.names[0])) == [2, 4, 6]
    with pytest.raises(KeyError, match="math"):
        rec.tensor(iso.names[0], key="math")

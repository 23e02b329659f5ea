"""The explorer replays EPI's importance and refreshes on recorded gradients: exactly the engine's first mask when
the recording is float32, nearly so in float16; its settings move the mask as they should; bad settings are
refused with the setting's name; the static frame draws without widgets."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from epi import EPIConfig, EvolvingIsolation  # noqa: E402
from epi.analysis import explorer  # noqa: E402
from epi.engine.masks import mask_overlap  # noqa: E402
from epi.models import load_model  # noqa: E402
from epi.training.data import StepData, balanced_schedule, make_batchers  # noqa: E402
from epi.training.loop import train_steps  # noqa: E402
from helpers import one_thread  # noqa: E402,F401  (every test on one thread)

STEPS = 10


def _setup(seed=0):
    torch.manual_seed(seed)
    model, tok = load_model("tiny", seed=seed)
    batchers = make_batchers(tok, ["math", "code"], n=32, seed=seed, batch_size=4, max_length=64)
    return model, StepData(batchers, balanced_schedule(["math", "code"], STEPS // 2, seed=seed))


@pytest.fixture(scope="module")
def recordings():
    torch.set_num_threads(1)
    model, data = _setup()
    rec32 = explorer.record(model, data, STEPS, dtype=torch.float32)
    model, data = _setup()
    rec16 = explorer.record(model, data, STEPS)
    return rec32, rec16


def test_float32_replay_draws_the_engines_first_mask(recordings):
    rec32, rec16 = recordings
    model, data = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    iso = EvolvingIsolation(model, EPIConfig(ratio=0.05, warmup_steps=STEPS, refresh_every=None)).attach(opt)
    train_steps(model, opt, data, steps=STEPS, engine=iso, clip=1.0)
    engine_mask = iso.protected_for(None)
    ours = explorer.replay(rec32, ratio=0.05, refresh_every=0, warmup_steps=STEPS)
    assert ours["steps"] == [STEPS]
    assert all(torch.equal(a, b) for a, b in zip(ours["masks"][0], engine_mask))
    half = explorer.replay(rec16, ratio=0.05, refresh_every=0, warmup_steps=STEPS)
    assert mask_overlap(half["masks"][0], engine_mask)["jaccard"] > 0.9     # float16 moves only the boundary


def test_settings_move_the_mask_as_they_should(recordings):
    rec = recordings[1]
    a = explorer.replay(rec, ratio=0.05, refresh_every=2)
    assert a["steps"] == [2, 4, 6, 8, 10] and a["jaccard_prev"][0] is None and a["jaccard_first"][0] is None
    shares = [sum(int(m.sum()) for m in ms) / sum(m.numel() for m in ms) for ms in a["masks"]]
    assert all(abs(s - 0.05) < 0.002 for s in shares)
    b = explorer.replay(rec, ratio=0.2, refresh_every=2)
    assert all(sum(int(m.sum()) for m in mb) > sum(int(m.sum()) for m in ma) for ma, mb in zip(a["masks"], b["masks"]))
    static = explorer.replay(rec, ratio=0.05, refresh_every=0, warmup_steps=2)
    assert static["steps"] == [2]
    # β = 0: the mask is the last step's score alone, so consecutive masks agree less than under β = 0.99
    fast = explorer.replay(rec, ratio=0.05, beta=0.0, refresh_every=2)
    assert sum(fast["jaccard_prev"][1:]) < sum(a["jaccard_prev"][1:])
    for score in explorer.SCORES:
        assert explorer.replay(rec, score=score, refresh_every=5)["steps"] == [5, 10]


@pytest.mark.parametrize("kwargs, word", [({"score": "hessian"}, "score"), ({"normalize": "z"}, "normalize"),
                                          ({"ratio": 1.5}, "ratio"), ({"beta": 1.0}, "beta"),
                                          ({"refresh_every": -1}, "refresh_every"),
                                          ({"refresh_every": 0, "warmup_steps": 99}, "warm-up")])
def test_bad_settings_are_refused_by_name(recordings, kwargs, word):
    with pytest.raises(ValueError, match=word):
        explorer.replay(recordings[1], **kwargs)


def test_static_frame_draws_three_labelled_panels(recordings):
    fig = explorer.explore(recordings[1], interactive=False, refresh_every=2)
    axes = fig.axes
    assert axes[0].get_ylabel() == "Jaccard of protected sets" and "Protected share" in axes[1].get_title()
    assert [t.get_text() for t in axes[2].get_legend().get_texts()] == ["kept", "newly protected", "released"]
    assert "static frame" in fig._suptitle.get_text()
    plt.close(fig)


def test_interactive_explorer_has_the_five_knobs_and_redraws(recordings):
    pytest.importorskip("ipywidgets")
    box = explorer.explore(recordings[1], interactive=True, refresh_every=2)
    controls = [c for row in box.children[:2] for c in row.children]
    assert [c.description for c in controls] == ["p", "β", "T", "score", "normaliser"]
    out = box.children[2]
    controls[2].value = 3                 # T: a redraw into the output area, no error and no figure left open
    controls[3].value = "taylor"
    assert not plt.get_fignums()
    assert not any("Error" in str(o) for o in out.outputs)

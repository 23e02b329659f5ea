"""X3: drift against the estimation noise floor — the Jaccard arithmetic, a planted drift found while pure
estimation noise is not (negative control), and the smoke run end to end."""
import json
import math

import pandas as pd
import pytest
import torch

from epi.analysis import metrics
from epi.analysis import noise_floor as nf
from epi.experiments import x3

SHAPES = [(100, 200), (50, 400)]


def _truth(gen, shapes=SHAPES):
    return [torch.rand(s, generator=gen) ** 3 * (10.0 ** i) for i, s in enumerate(shapes)]


def _redraw(truth, share, gen):
    """Return `truth` with a `share` of its coordinates given fresh random importance (a planted drift)."""
    out = []
    for t in truth:
        fresh = torch.rand(t.shape, generator=gen) ** 3 * float(t.mean() / 0.25)
        out.append(torch.where(torch.rand(t.shape, generator=gen) < share, fresh, t))
    return out


def _noisy(truth, gen, sigma=0.6):
    return [t * torch.exp(sigma * torch.randn(t.shape, generator=gen)) for t in truth]


def _estimates(truths, replicates=6, seed=0):
    """Two noisy estimates per replicate of each checkpoint's true importance (two tasks: a, b)."""
    gen = torch.Generator().manual_seed(seed)
    est = nf.Estimates()
    for step, truth in truths:
        for r in range(replicates):
            for half in "AB":
                est.add(step, r, half, nf.scope_masks({"a": _noisy(truth, gen), "b": _noisy(truth, gen)}, 0.1))
    return est


def test_packed_jaccard_equals_the_library_jaccard_on_bool_masks():
    gen = torch.Generator().manual_seed(1)
    a = [torch.rand(s, generator=gen) < 0.1 for s in SHAPES]
    b = [torch.rand(s, generator=gen) < 0.1 for s in SHAPES]
    assert nf.jaccard(nf.pack(a), nf.pack(b)) == pytest.approx(metrics.jaccard(a, b), abs=1e-12)
    assert nf.jaccard(nf.pack(a), nf.pack(a)) == 1.0
    assert nf.jaccard(nf.pack(a), nf.pack(b), [1]) == pytest.approx(metrics.jaccard(a[1:], b[1:]), abs=1e-12)


def test_identical_estimates_give_j_same_one_and_no_excess_drift():
    gen = torch.Generator().manual_seed(2)
    truth = _truth(gen)
    masks = nf.scope_masks({"a": truth, "b": truth}, 0.1)
    est = nf.Estimates()
    for step in (0, 10):
        for r in range(4):
            for half in "AB":
                est.add(step, r, half, masks)
    frame = nf.drift_frame(est)
    assert (frame["j_same_t"] == 1.0).all() and (frame["j_cross"] == 1.0).all()
    assert (frame["excess"] == 0.0).all()
    assert set(frame["scope"]) == {"global", "a", "b"}


def test_a_planted_drift_is_supported_and_pure_noise_is_not():
    gen = torch.Generator().manual_seed(3)
    truth = _truth(gen)
    drifted = _redraw(truth, 0.5, gen)
    planted = nf.drift_frame(_estimates([(0, truth), (100, drifted)]))
    noise = nf.drift_frame(_estimates([(0, truth), (100, truth)], seed=1))
    (yes, *_), (no, *_) = nf.decide(planted), nf.decide(noise)
    assert yes["verdict"] == "supported" and yes["decision"]["effect"] > 0.1
    # the negative control: the same estimation noise, no drift — J(first, last) is well below 1 ...
    fl = noise[(noise["scope"] == "global") & (noise["lag"] == 1)]
    assert fl["j_cross"].mean() < 0.9
    # ... yet it sits at the noise floor, and the rule rules out an excess drift of the minimum
    assert no["verdict"] == "not supported" and abs(no["decision"]["effect"]) < 0.01
    assert "ONE training trajectory" in yes["evidence"]


def _claim(claims, start):
    return next(c for c in claims if c["claim"].startswith(start))


def test_drift_that_accumulates_grows_with_lag_and_a_fluctuating_one_does_not():
    gen = torch.Generator().manual_seed(4)
    t0 = _truth(gen)
    t1 = _redraw(t0, 0.3, gen)
    t2 = _redraw(t1, 0.3, gen)
    t3 = _redraw(t2, 0.3, gen)
    frame = nf.drift_frame(_estimates([(0, t0), (50, t1), (100, t2), (150, t3)]))
    claims = nf.decide(frame)
    assert _claim(claims, "Drift grows")["verdict"] == "supported"
    assert _claim(claims, "Drift keeps growing")["verdict"] == "supported"
    assert nf.lag_effects(frame).gt(0).all()
    # negative control: the importance moves as much at every checkpoint, around one centre (each checkpoint an
    # independent redraw of the same share): real drift beyond the noise floor, but it does not accumulate
    moves = [(s, _redraw(t0, 0.4, gen)) for s in (0, 50, 100, 150)]
    claims = nf.decide(nf.drift_frame(_estimates(moves, seed=2)))
    assert claims[0]["verdict"] == "supported"
    for start in ("Drift grows", "Drift keeps growing"):
        assert _claim(claims, start)["verdict"] != "supported"
        assert abs(_claim(claims, start)["decision"]["effect"]) < 0.02


def test_one_early_jump_grows_with_lag_but_does_not_keep_growing():
    # all the drift in the first interval: the lag-one mean averages one big pair with unchanged ones, so the
    # plain lag claim comes out positive; the claim on the later checkpoints tells the two stories apart
    gen = torch.Generator().manual_seed(5)
    t0 = _truth(gen)
    t1 = _redraw(t0, 0.5, gen)
    claims = nf.decide(nf.drift_frame(_estimates([(0, t0), (50, t1), (100, t1), (150, t1)], seed=3)))
    assert _claim(claims, "Drift grows")["verdict"] == "supported"
    assert _claim(claims, "Drift keeps growing")["verdict"] == "not supported"


def test_checkpoint_steps_are_even_and_include_both_ends():
    assert x3.checkpoint_steps(500, 6) == [0, 100, 200, 300, 400, 500]
    assert x3.checkpoint_steps(60, 3) == [0, 30, 60]
    with pytest.raises(ValueError, match="checkpoints"):
        x3.checkpoint_steps(500, 1)


def _no_nan(constant):
    raise AssertionError(f"summary.json holds {constant}")


def test_the_smoke_run_writes_every_file_and_decides_every_claim(tmp_path):
    res = x3.run("smoke", seed=0, out=tmp_path)
    for name in ("drift.csv", "per_layer.csv", "scopes.csv", "claims.md", "summary.json", "README.md",
                 "figures/x3_drift.png"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=_no_nan)
    assert summary["checkpoints"] == [0, 30, 60] and summary["replicates"] == 4
    drift = pd.read_csv(tmp_path / "drift.csv")
    assert set(drift["scope"]) == {"global", *summary["tasks"]}
    assert drift[["j_same_t", "j_cross", "excess"]].notna().all().all()
    assert drift["j_cross"].between(0, 1).all()
    assert (drift.loc[drift["lag"] == 0, "excess"].abs() < 1e-12).all()
    layers = pd.read_csv(tmp_path / "per_layer.csv")
    assert layers["tensor"].nunique() == 28 and layers["replicate"].nunique() == 4
    assert len(res.claims) == 3
    for c in summary["claims"]:
        assert c["verdict"] in ("supported", "not supported", "mixed", "not measured")
        assert c["decision"]["n_seeds"] == 4 and all(math.isfinite(v) for v in c["decision"]["interval"])
    assert "python -m epi.experiments.x3" in (tmp_path / "README.md").read_text()
    # a rerun with reuse reads the folder back instead of training
    again = x3.run("smoke", seed=0, out=tmp_path, reuse=True)
    assert again.claims == summary["claims"] and again.drift.equals(drift)
    assert x3.load(tmp_path / "nowhere") is None
    redone = x3.analyse(tmp_path)
    assert [c["verdict"] for c in redone.claims] == [c["verdict"] for c in summary["claims"]]
    with pytest.raises(FileNotFoundError, match="x3 run"):
        x3.analyse(tmp_path / "nowhere")


def test_too_many_estimation_batches_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="lower replicates/batches or raise train_records"):
        x3.run("smoke", seed=0, out=tmp_path, replicates=20, batches=1)

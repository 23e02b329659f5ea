"""What each isolation mode does to Adam's moments, the release burst, and per-task scope in a sequential run.

A toy tensor with a constant gradient (loss = Σ W·C) makes every Adam quantity computable by hand: a free
coordinate's step is lr·C/|C| at every step, so moments and first steps after a release can be checked
against closed forms (epi.engine.burst.release_step_ratio).
"""
import pytest
import torch

from helpers import one_thread, small_llama  # noqa: F401 (one_thread: an autouse fixture)
from epi import EPIConfig, EvolvingIsolation
from epi.engine.burst import ReleaseBurstMeter, release_step_ratio
from epi.training.loop import train_steps

LR = 1e-2
NEVER = 10 ** 9  # warm-up that never ends: the toy's masks are set by hand


class Toy(torch.nn.Module):
    """One 4×8 weight with a constant gradient C (magnitudes 0.5 … 2, both signs)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 8))
        g = torch.Generator().manual_seed(0)
        sign = torch.where(torch.rand(4, 8, generator=g) < 0.5, -1.0, 1.0)
        self.register_buffer("c", sign * (0.5 + 1.5 * torch.rand(4, 8, generator=g)))

    def step(self, engine, opt):
        opt.zero_grad(set_to_none=True)
        (self.w * self.c).sum().backward()
        engine.observe(None)
        opt.step()


def toy_run(mode, *, betas=(0.9, 0.98), free=5, protected=20, release_moments="keep", optimizer=None):
    """Train the toy `free` steps, protect the first row for `protected` steps, release it for one step.

    Return (toy, optimizer, engine, meter, weight before the release step)."""
    toy = Toy()
    opt = optimizer(toy) if optimizer else torch.optim.AdamW(toy.parameters(), lr=LR, betas=betas, weight_decay=0.0)
    kw = {"mode": mode} if mode != "restore_unmasked" else {"mode": "restore", "mask_grads": False}
    engine = EvolvingIsolation(toy, EPIConfig(targets="all", warmup_steps=NEVER, release_moments=release_moments,
                                              **kw)).attach(opt)
    meter = ReleaseBurstMeter(engine)
    row = torch.zeros(4, 8, dtype=torch.bool)
    row[0] = True
    for _ in range(free):
        toy.step(engine, opt)
    engine.set_masks([row])
    for _ in range(protected):
        toy.step(engine, opt)
    engine.set_masks([torch.zeros_like(row)])
    before = toy.w.detach().clone()
    toy.step(engine, opt)
    return toy, opt, engine, meter, before


# ---- the literal mode by name ----------------------------------------------------------------------------
def test_literal_mode_is_restore_with_unmasked_gradients_and_refuses_masked_ones():
    assert EPIConfig().mask_grads is True and EPIConfig(mode="restore").mask_grads is True  # defaults unchanged
    assert EPIConfig().mode == "auto" and EPIConfig().release_moments == "keep"
    literal = EPIConfig(mode="literal")
    assert literal.mask_grads is False
    assert EPIConfig.from_dict(literal.to_dict()) == literal
    assert EPIConfig(mode="literal", mask_grads=False).mask_grads is False
    with pytest.raises(ValueError, match="mode='literal'.*mask_grads"):
        EPIConfig(mode="literal", mask_grads=True)
    with pytest.raises(ValueError, match="release_moments"):
        EPIConfig(release_moments="reset")


def test_literal_mode_trains_bit_identically_to_restore_without_gradient_masking():
    runs = {}
    for mode in ("literal", "restore_unmasked"):
        model = small_llama()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        kw = {"mode": "literal"} if mode == "literal" else {"mode": "restore", "mask_grads": False}
        eng = EvolvingIsolation(model, EPIConfig(ratio=0.1, warmup_steps=2, refresh_every=2, **kw)).attach(opt)
        batches = [torch.randint(0, 48, (4, 10), generator=torch.Generator().manual_seed(s)) for s in range(6)]
        train_steps(model, opt, lambda s: ("t", {"input_ids": batches[s], "labels": batches[s]}), steps=6, engine=eng)
        runs[mode] = (model.state_dict(), eng)
    (a, ea), (b, eb) = runs["literal"], runs["restore_unmasked"]
    assert ea.isolator.mode == eb.isolator.mode == "restore"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ea.mask_digest() == eb.mask_digest() and len(ea.history) == 3


@pytest.mark.parametrize("mode", ["grad", "restore", "literal"])
def test_each_mode_keeps_protected_weights_exact_and_treats_their_moments_as_documented(mode):
    free, protected = 5, 20
    b1, b2 = 0.9, 0.98
    toy = Toy()
    opt = torch.optim.AdamW(toy.parameters(), lr=LR, betas=(b1, b2), weight_decay=0.1)
    engine = EvolvingIsolation(toy, EPIConfig(targets="all", warmup_steps=NEVER, mode=mode)).attach(opt)
    row = torch.zeros(4, 8, dtype=torch.bool)
    row[0] = True
    for _ in range(free):
        toy.step(engine, opt)
    engine.set_masks([row])
    held = toy.w.detach()[0].clone()
    for _ in range(protected):
        toy.step(engine, opt)
    assert torch.equal(toy.w.detach()[0], held)  # exact in every mode, weight decay included
    assert not torch.equal(toy.w.detach()[1], torch.zeros(8))  # the free rows train
    m, v, c = opt.state[toy.w]["exp_avg"][0], opt.state[toy.w]["exp_avg_sq"][0], toy.c[0]
    t = free + protected
    if mode == "grad":  # m reset to 0 on protection; v decays on the zeroed gradient
        assert torch.equal(m, torch.zeros(8))
        torch.testing.assert_close(v, (1 - b2 ** free) * b2 ** protected * c ** 2)
    elif mode == "restore":  # fed zeroed gradients: m and v decay, nothing is reset
        torch.testing.assert_close(m, (1 - b1 ** free) * b1 ** protected * c)
        torch.testing.assert_close(v, (1 - b2 ** free) * b2 ** protected * c ** 2)
    else:  # literal: the moments keep running on the true gradient, as if the row were free
        torch.testing.assert_close(m, (1 - b1 ** t) * c)
        torch.testing.assert_close(v, (1 - b2 ** t) * c ** 2)


# ---- the release burst ------------------------------------------------------------------------------------
def test_release_step_ratio_closed_form_limits():
    # long protection: the first step approaches (1 − β₁)/√(1 − β₂) of a normal step
    assert release_step_ratio(0.9, 0.98, 2000, 50) == pytest.approx(0.1 / 0.02 ** 0.5, rel=1e-6)
    assert release_step_ratio(0.9, 0.999, 20000, 50) == pytest.approx(0.1 / 0.001 ** 0.5, rel=1e-3)
    # short protection at β₂ = 0.999: v still remembers g, m has decayed: a damped step, not a burst
    assert release_step_ratio(0.9, 0.999, 50, 50) < 0.2
    assert release_step_ratio(0.9, 0.999, 50, 50, "literal") == pytest.approx(1.0)
    assert release_step_ratio(0.9, 0.999, 50, 50, release="fresh") == 1.0
    # floor_v: v̂ = g², so the step is m̂/g — (1 − β₁)/(1 − β₁ᵗ) once m is 0 (grad mode)
    assert release_step_ratio(0.9, 0.999, 50, 50, "grad", "floor_v") == pytest.approx(0.1 / (1 - 0.9 ** 101))
    with pytest.raises(ValueError, match="mode"):
        release_step_ratio(0.9, 0.999, 5, 5, "reset")
    with pytest.raises(ValueError, match="release"):
        release_step_ratio(0.9, 0.999, 5, 5, "grad", "reset")


@pytest.mark.parametrize("mode", ["grad", "restore"])
@pytest.mark.parametrize("beta2", [0.98, 0.999])
@pytest.mark.parametrize("protected", [1, 10, 100, 10000])
def test_floor_v_never_enlarges_the_first_step_and_fresh_is_a_sign_step(mode, beta2, protected):
    keep = release_step_ratio(0.9, beta2, protected, 20, mode)
    assert release_step_ratio(0.9, beta2, protected, 20, mode, "floor_v") <= keep + 1e-12
    assert release_step_ratio(0.9, beta2, protected, 20, mode, "fresh") == 1.0


@pytest.mark.parametrize("betas", [(0.9, 0.98), (0.9, 0.999)])
@pytest.mark.parametrize("mode,release", [("grad", "keep"), ("restore", "keep"), ("literal", "keep"),
                                          ("grad", "floor_v"), ("restore", "floor_v"), ("restore", "fresh")])
def test_measured_first_step_after_release_matches_the_closed_form(mode, release, betas):
    free, protected = 5, 30
    _, _, _, meter, _ = toy_run(mode, betas=betas, free=free, protected=protected, release_moments=release)
    res = meter.result()
    assert res["releases"] == 1 and res["released"] == res["paired"] == 8 and res["protected_steps"] == protected
    expected = release_step_ratio(*betas, protected, free, mode, release)
    assert res["ratio"] == pytest.approx(expected, rel=1e-4)
    # the rows that stayed free take normal (lr-sized) steps: the same ratio against them
    assert res["ratio_to_free"] == pytest.approx(expected, rel=1e-4)
    if mode != "literal" and release == "keep":
        assert expected < 0.75  # 30 protected steps: damped at both β₂ (v still remembers the gradient)


def test_release_burst_after_a_long_protection_at_hf_beta2_and_the_release_options_temper_it():
    betas, free, protected = (0.9, 0.999), 1, 3000
    expected = release_step_ratio(*betas, protected, free, "restore")
    assert expected > 2.9  # 3000 steps at β₂ = 0.999: v has decayed to ~5 %, m to 0
    _, _, _, keep, _ = toy_run("restore", betas=betas, free=free, protected=protected)
    assert keep.result()["ratio"] == pytest.approx(expected, rel=1e-3)
    _, _, _, floor, _ = toy_run("restore", betas=betas, free=free, protected=protected, release_moments="floor_v")
    assert floor.result()["ratio"] == pytest.approx(0.1, rel=1e-3)  # m̂/g: (1 − β₁) once m has decayed
    toy, opt, _, fresh, before = toy_run("restore", betas=betas, free=free, protected=protected,
                                         release_moments="fresh")
    assert fresh.result()["ratio"] == pytest.approx(1.0, rel=1e-4)  # Adam's first step on a new coordinate
    torch.testing.assert_close(toy.w.detach()[0] - before[0], -LR * torch.sign(toy.c[0]), rtol=1e-5, atol=0)
    t = free + protected + 1
    torch.testing.assert_close(opt.state[toy.w]["exp_avg"][0], (1 - betas[0] ** t) * toy.c[0])


@pytest.mark.parametrize("release", ["floor_v", "fresh"])
def test_release_options_leave_coordinates_that_were_never_released_alone(release):
    _, opt_keep, _, _, _ = toy_run("grad", free=5, protected=10)
    _, opt_other, _, _, _ = toy_run("grad", free=5, protected=10, release_moments=release)
    keep, other = opt_keep.state, opt_other.state
    (pk,), (po,) = list(keep), list(other)
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(keep[pk][name][1:], other[po][name][1:])  # free rows: identical moments
    assert not torch.equal(keep[pk]["exp_avg_sq"][0], other[po]["exp_avg_sq"][0])  # the released row: v raised
    assert torch.equal(keep[pk]["exp_avg"][0], other[po]["exp_avg"][0]) == (release == "floor_v")  # m kept?


@pytest.mark.parametrize("release", ["floor_v", "fresh"])
def test_release_options_refuse_an_optimizer_without_adam_moments(release):
    with pytest.raises(ValueError, match=f"release_moments='{release}'.*Adam"):
        toy_run("restore", release_moments=release, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=LR))


def test_meter_counts_the_coordinates_each_refresh_releases_on_a_small_model():
    model = small_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    eng = EvolvingIsolation(model, EPIConfig(ratio=0.1, warmup_steps=3, refresh_every=3)).attach(opt)
    meter = ReleaseBurstMeter(eng)
    batches = [torch.randint(0, 48, (4, 10), generator=torch.Generator().manual_seed(s)) for s in range(16)]
    train_steps(model, opt, lambda s: ("t", {"input_ids": batches[s], "labels": batches[s]}), steps=16, engine=eng)
    res = meter.result()
    # refreshes after steps 6, 9, 12, 15; each one's released coordinates take their first step on the next step
    released = {h["step"]: h["released_fraction"] for h in eng.history if h["released_fraction"]}
    assert res["releases"] == len(released) >= 2
    # released at a refresh after step s = history's released share of the previous set; first step on step s
    sizes = {h["step"]: h["protected_fraction"] * sum(eng.numels) for h in eng.history}
    steps = sorted(sizes)
    for e in res["events"]:
        prev = steps[steps.index(e["step"]) - 1]
        assert e["released"] == round(released[e["step"]] * sizes[prev])
        assert e["protected_steps"] >= 3 and e["first_step"] > 0
    assert 0 < res["ratio"] < float("inf") and 0 < res["ratio_to_free"] < float("inf")


def test_meter_refuses_an_engine_that_protects_nothing():
    model = small_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match="attach"):
        ReleaseBurstMeter(EvolvingIsolation(model, EPIConfig()))
    with pytest.raises(ValueError, match="isolate=True"):
        ReleaseBurstMeter(EvolvingIsolation(model, EPIConfig(isolate=False)).attach(opt))


# ---- per-task scope in a sequential run --------------------------------------------------------------------
def sequential_run(scope: str, steps_a: int = 6, steps_b: int = 12):
    """Train A then B with refreshes every 2 steps; return (engine, masks in force for B at each refresh in B,
    A's EMA at the end of A)."""
    model = small_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    eng = EvolvingIsolation(model, EPIConfig(ratio=0.1, warmup_steps=2, refresh_every=2, scope=scope)).attach(opt)
    lo = {"A": 0, "B": 24}
    task = lambda s: "A" if s < steps_a else "B"  # noqa: E731

    def batch_fn(s):
        x = torch.randint(lo[task(s)], lo[task(s)] + 24, (4, 10), generator=torch.Generator().manual_seed(s))
        return task(s), {"input_ids": x, "labels": x}
    train_steps(model, opt, batch_fn, steps=steps_a, engine=eng)
    key = "A" if scope == "per_task" else "global"
    ema_a = [b.clone() for b in eng.tracker.buffers[key]]
    masks_b = []
    for end in range(steps_a + 2, steps_a + steps_b + 1, 2):  # one refresh after each 2-step chunk of B
        train_steps(model, opt, batch_fn, steps=end, engine=eng, state=_at(end - 2))
        masks_b.append([m.clone() for m in eng.protected_for("B")])
    return eng, masks_b, ema_a


def _at(step):
    from epi.training.loop import LoopState
    return LoopState(step=step)


def test_per_task_scope_in_a_sequential_run_rebuilds_the_same_mask_at_every_refresh():
    eng, masks_b, ema_a = sequential_run("per_task")
    refreshed = [h for h in eng.history if h["scope_key"] == "A" and h["step"] > 6]
    assert len(refreshed) == len(masks_b) == 6  # the engine did refresh A's set during B
    assert all(h["jaccard_prev"] == 1.0 and h["churn"] == 0.0 for h in refreshed)
    assert all(all(torch.equal(a, b) for a, b in zip(masks_b[0], m)) for m in masks_b)  # a static mask
    assert all(torch.equal(a, b) for a, b in zip(ema_a, eng.tracker.buffers["A"]))  # A's EMA never moved in B
    assert eng.tracker.updates["A"] == 6
    assert all(torch.equal(a, b) for a, b in zip(masks_b[0], eng._bools(eng.sets["A"])))  # B is held by A's set


def test_global_scope_in_the_same_sequential_run_keeps_changing_its_mask():
    # negative control: the global EMA follows the live stream, so B's refreshes move the mask
    eng, masks_b, _ = sequential_run("global")
    assert any(not all(torch.equal(a, b) for a, b in zip(masks_b[0], m)) for m in masks_b[1:])
    assert any(h["jaccard_prev"] is not None and h["jaccard_prev"] < 1.0 for h in eng.history if h["step"] > 6)

"""Device and precision: the automatic choice per GPU class, early refusal of a missing CUDA device, the fp16
GradScaler path of the loop (exact isolation, overflow steps skipped by optimizer and engine alike), records
that state where they ran, and notebook profiles on a GPU runtime (faked CUDA: this machine has none)."""
import copy

import pytest
import torch

from epi import EPIConfig, EvolvingIsolation
from epi.experiments.profiles import resolve
from epi.experiments.runner import check_same_settings, run_experiment
from epi.training.checkpoints import load_checkpoint, save_checkpoint
from epi.training.device import (autocast_training_forward, choose_precision, make_scaler, needs_scaler,
                                 record_precision, resolve_device, resolve_precision)
from epi.training.loop import LoopState, TrainConfig, make_optimizer, train_steps
from helpers import small_llama

SMALL = dict(tasks=["math", "chat"], steps_per_task=6, eval_records=4, eval_every=3)


# ---- the choice --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device_type, capability, precision, scaler", [
    ("cpu", None, "fp32", False),
    ("cuda", (7, 5), "fp16", True),    # T4: no native bf16
    ("cuda", (7, 0), "fp16", True),    # V100
    ("cuda", (8, 0), "bf16", False),   # A100
    ("cuda", (8, 9), "bf16", False),   # L4
    ("cuda", (9, 0), "bf16", False),   # H100
])
def test_automatic_precision_follows_the_device_class(device_type, capability, precision, scaler):
    assert choose_precision(device_type, capability) == precision
    assert needs_scaler(precision) is scaler


def test_explicit_precisions_are_kept_and_unknown_ones_refused():
    cpu = torch.device("cpu")
    assert [resolve_precision(p, cpu) for p in ("auto", "fp32", "bf16", "fp16")] == ["fp32", "fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve("smoke", precision="fp8")
    assert make_scaler("fp32", cpu) is None and make_scaler("bf16", cpu) is None
    assert make_scaler("fp16", cpu) is not None


# ---- the device setting ------------------------------------------------------------------------------
def test_auto_device_is_the_cpu_on_a_machine_without_cuda():
    assert not torch.cuda.is_available()  # this test documents the CI machine
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve("smoke").device == "auto"


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_asking_for_cuda_without_cuda_fails_before_anything_is_built(device, tmp_path, monkeypatch):
    import epi.experiments.base_build
    monkeypatch.setattr(epi.experiments.base_build, "build_base", lambda *a, **k: pytest.fail("built a base model"))
    with pytest.raises(ValueError, match=rf"device='{device}' but this machine has no CUDA device"):
        resolve("smoke", device=device)
    from epi.__main__ import main
    assert main(["run", "--profile", "smoke", "--set", f"device={device}", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_a_misspelt_device_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        resolve("smoke", device="gpu")


# ---- bf16_autocast folded into precision ---------------------------------------------------------------
def test_real_cpu_keeps_bf16_autocast_of_train_mode_forwards_only():
    assert resolve("real_cpu").precision == "bf16"
    assert resolve("smoke", bf16_autocast=True).precision == "bf16"       # the old override still works
    assert resolve("real_cpu", bf16_autocast=False).precision == "auto"   # fp32 on CPU, as before
    with pytest.raises(ValueError, match="contradicts"):
        resolve("smoke", bf16_autocast=True, precision="fp16")
    model = small_llama()
    autocast_training_forward(model, "bf16")
    ids = torch.randint(0, 48, (2, 8))
    assert model.train()(input_ids=ids).logits.dtype == torch.bfloat16
    assert model.eval()(input_ids=ids).logits.dtype == torch.float32  # evaluations stay fp32
    assert copy.deepcopy(model).train()(input_ids=ids).logits.dtype == torch.bfloat16  # CPI-FT probes


def test_the_settings_check_compares_the_resolved_precision():
    old_cpu = {k: v for k, v in resolve("smoke").to_dict().items() if k not in ("device", "precision")}
    old_cpu["bf16_autocast"] = False  # a record written before the settings existed
    check_same_settings(old_cpu, resolve("smoke"))                           # auto on CPU == fp32
    check_same_settings(old_cpu, resolve("smoke", device="cpu", precision="fp32"))  # device: how, not what
    with pytest.raises(ValueError, match="precision='fp32' vs 'bf16'"):
        check_same_settings(old_cpu, resolve("smoke", precision="bf16"))
    old_real = {k: v for k, v in resolve("real_cpu").to_dict().items() if k not in ("device", "precision")}
    old_real["bf16_autocast"] = True
    check_same_settings(old_real, resolve("real_cpu"))
    assert record_precision(old_real) == "bf16" and record_precision(old_cpu) == "fp32"
    new = resolve("smoke", precision="fp16").to_dict()
    check_same_settings(new, resolve("smoke", precision="fp16"), "fp16")
    with pytest.raises(ValueError, match="precision='bf16' vs 'fp32'"):  # a GPU run's auto was bf16
        check_same_settings(resolve("smoke").to_dict(), resolve("smoke"), "bf16")


# ---- the fp16 GradScaler path (CPU autocast fp16 + torch.amp.GradScaler("cpu")) --------------------------
def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 48, (4, 12), generator=g)
        out.append(("a", {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}))
    return out


def _setup(seed=0, warmup=2, **engine):
    model = small_llama(seed)
    autocast_training_forward(model, "fp16")
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    iso = EvolvingIsolation(model, EPIConfig(ratio=0.2, beta=0.9, warmup_steps=warmup, refresh_every=2, **engine))
    iso.attach(opt)
    return model, opt, iso


def test_fp16_training_keeps_protected_weights_exact():
    model, opt, iso = _setup()
    scaler = make_scaler("fp16", torch.device("cpu"))
    data = _batches(10)
    state, checked = LoopState(), 0
    for step in range(len(data)):
        protected = [m.clone() for m in iso.protected_for(None)] if iso.sets else None
        before = [p.detach().clone() for p in iso.params]
        state = train_steps(model, opt, lambda s: data[s], steps=step + 1, state=state, engine=iso, scaler=scaler)
        if protected is None:
            continue
        for p, b, m in zip(iso.params, before, protected):
            assert torch.equal(p.detach()[m], b[m]), "a protected coordinate moved"
        assert any(not torch.equal(p.detach()[~m], b[~m]) for p, b, m in zip(iso.params, before, protected))
        checked += 1
    assert checked >= 6 and state.skipped == 0 and all(torch.isfinite(torch.tensor(state.losses)))
    # negative control: the same masks with gradients zeroed only (no isolator) move protected weights
    control, _, _ = _setup()
    opt_c = make_optimizer(control, TrainConfig(lr=1e-2, weight_decay=0.1))
    naive = EvolvingIsolation(control, EPIConfig(ratio=0.2, warmup_steps=0, mask_grads=True))
    naive.set_masks(protected)
    before = [p.detach().clone() for p in naive.params]
    train_steps(control, opt_c, lambda s: data[s], steps=3, engine=naive, scaler=make_scaler("fp16", "cpu"))
    assert any(not torch.equal(p.detach()[m], b[m]) for p, b, m in zip(naive.params, before, protected))


def test_an_overflow_step_is_skipped_by_the_optimizer_and_the_engine():
    data = _batches(6)
    poison = {"step": 3}
    model, opt, iso = _setup()
    target = iso.params[0]
    target.register_hook(lambda g: torch.full_like(g, float("inf")) if poison["now"] else None)

    def batch_fn(step):
        poison["now"] = step == poison["step"]
        return data[step]
    scaler = make_scaler("fp16", torch.device("cpu"))
    state = train_steps(model, opt, batch_fn, steps=3, engine=iso, scaler=scaler)
    weights = [p.detach().clone() for p in model.parameters()]
    adam_steps = [float(opt.state[p]["step"]) for p in iso.params]
    importance = [b.clone() for b in iso.tracker.buffers["global"]]
    engine_step, skipped, scale = iso.step, iso.tracker.skipped_steps, scaler.get_scale()

    state = train_steps(model, opt, batch_fn, steps=4, state=state, engine=iso, scaler=scaler)
    assert state.skipped == 1 and len(state.losses) == 4
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights)), "the optimizer stepped"
    assert [float(opt.state[p]["step"]) for p in iso.params] == adam_steps
    assert iso.step == engine_step and iso.tracker.skipped_steps == skipped + 1  # not counted, not scored
    assert all(torch.equal(b, c) for b, c in zip(iso.tracker.buffers["global"], importance))
    assert scaler.get_scale() == scale / 2

    state = train_steps(model, opt, batch_fn, steps=5, state=state, engine=iso, scaler=scaler)  # recovers
    assert iso.step == engine_step + 1 and state.skipped == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # negative control: the same poisoned step without a scaler reaches optimizer.step(), where the engine's
    # pre-step hook refuses it (EPIConfig.nonfinite="raise"): only the scaler keeps it from the optimizer
    model_c, opt_c, iso_c = _setup()
    iso_c.params[0].register_hook(lambda g: torch.full_like(g, float("inf")) if poison["now"] else None)
    with pytest.raises(RuntimeError, match="non-finite gradient"):
        train_steps(model_c, opt_c, batch_fn, steps=4, engine=iso_c)
    assert iso_c.step == 3


def test_the_importance_sees_unscaled_gradients():
    data = _batches(1)
    ref, opt_r, iso_r = _setup(warmup=50)
    model = copy.deepcopy(ref)
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    iso = EvolvingIsolation(model, EPIConfig(ratio=0.2, beta=0.9, warmup_steps=50)).attach(opt)
    train_steps(ref, opt_r, lambda s: data[s], steps=1, engine=iso_r)  # fp16 autocast, no scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    train_steps(model, opt, lambda s: data[s], steps=1, engine=iso, scaler=scaler)
    total = sum(float(b.sum()) for b in iso.tracker.buffers["global"])
    expected = sum(float(b.sum()) for b in iso_r.tracker.buffers["global"])
    assert total == pytest.approx(expected, rel=1e-2)
    # negative control: observing before unscale_ would score gradients scale² too large
    naive = copy.deepcopy(ref)
    for p in naive.parameters():
        p.grad = None
    iso_n = EvolvingIsolation(naive, EPIConfig(ratio=0.2, beta=0.9, warmup_steps=50))
    naive.train()
    torch.amp.GradScaler("cpu", init_scale=2.0 ** 12).scale(naive(**data[0][1]).loss).backward()
    iso_n.observe("a")
    assert sum(float(b.sum()) for b in iso_n.tracker.buffers["global"]) > 1e6 * expected


def test_the_grad_scaler_state_travels_with_the_checkpoint(tmp_path):
    model, opt, iso = _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 9)
    state = train_steps(model, opt, lambda s: _batches(2)[s], steps=2, engine=iso, scaler=scaler)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, state=state, engine=iso, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu")
    m2, o2, i2 = _setup()
    load_checkpoint(tmp_path / "c.pt", model=m2, optimizer=o2, engine=i2, scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 2.0 ** 9


# ---- runs state where they ran -------------------------------------------------------------------------
def test_an_auto_run_records_the_cpu_and_fp32(tmp_path):
    rec = run_experiment(resolve("smoke", method="full_sft", **SMALL), tmp_path)
    assert rec["device"] == "cpu" and rec["precision"] == "fp32" and rec["config"]["device"] == "auto"
    assert "skipped_steps" not in rec


def test_an_fp16_run_trains_through_the_scaler(tmp_path):
    # static: the engine and CPI-FT's probes both train through a scaler (fp16 backward is slow on CPU: short)
    tiny = dict(SMALL, steps_per_task=3, eval_records=2, eval_every=0, probe_steps=2, warmup_steps=1)
    rec = run_experiment(resolve("smoke", method="static", device="cpu", precision="fp16", **tiny), tmp_path)
    assert rec["device"] == "cpu" and rec["precision"] == "fp16"
    assert isinstance(rec["skipped_steps"], int) and rec["skipped_steps"] < len(rec["losses"])
    assert all(l == l and l < 1e4 for l in rec["losses"])  # finite
    assert rec["mask_digest"]


# ---- notebooks on a GPU runtime -------------------------------------------------------------------------
@pytest.fixture
def gpu_runtime(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("EPI_SMOKE", raising=False)
    monkeypatch.delenv("CI", raising=False)


def test_notebooks_01_to_06_run_their_cpu_lessons_on_a_gpu_runtime(gpu_runtime):
    from epi.nb import resolve_profile
    assert resolve_profile("auto") == "cpu"
    assert resolve_profile("cpu") == "cpu"


def test_notebook_07_asks_for_the_gpu_profile(gpu_runtime):
    from epi.nb import resolve_profile
    assert resolve_profile("auto", gpu_profile="gpu", serves=("smoke", "cpu", "gpu", "full")) == "gpu"


def test_ci_and_machines_without_cuda_resolve_as_before(monkeypatch):
    from epi.nb import resolve_profile
    monkeypatch.setenv("EPI_SMOKE", "1")
    assert resolve_profile("auto") == "smoke"
    monkeypatch.delenv("EPI_SMOKE")
    monkeypatch.delenv("CI", raising=False)
    assert resolve_profile("auto", gpu_profile="gpu", serves=("smoke", "cpu", "gpu")) == "cpu"


def test_a_notebook_refuses_a_profile_it_does_not_serve(gpu_runtime, tmp_path):
    from epi.nb import resolve_profile, setup_notebook
    with pytest.raises(ValueError, match=r"serves the profiles \('smoke', 'cpu'\), not PROFILE='gpu'"):
        resolve_profile("gpu")
    with pytest.raises(ValueError, match=r"resolved to 'gpu'"):
        resolve_profile("auto", gpu_profile="gpu")
    with pytest.raises(ValueError, match="serves the profiles"):
        setup_notebook(0, str(tmp_path / "out"), "full")
    assert not (tmp_path / "out").exists()  # refused before any work
    with pytest.raises(ValueError, match="PROFILE must be 'auto' or one of"):
        resolve_profile("gpux")


def test_setup_notebook_reports_the_device_and_precision_runs_use(tmp_path):
    from epi.nb import setup_notebook
    info = setup_notebook(0, str(tmp_path / "{profile}"), "smoke")
    assert info["device"].startswith("cpu (") and info["precision"] == "fp32"

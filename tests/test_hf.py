"""EPI inside an unmodified transformers.Trainer (EPICallback) and with EPITrainerMixin.

Every exactness test measures, at every optimizer step, the isolatable weights before and after the step
(a spy callback) against the mask in force during that step.
"""
import pytest
import torch
import transformers
from accelerate.utils import AutocastKwargs
from transformers import Trainer, TrainerCallback, TrainingArguments

from helpers import one_thread, small_llama  # noqa: F401 (one_thread: an autouse fixture)
from epi import EPIConfig
from epi.integrations.hf import EPICallback, EPITrainerMixin, TaskCollator, base_optimizer, task_blocks
from epi.integrations.recipe import SEQUENTIAL_ARG, trainer_class

STEPS = 8
# transformers 5 clips in Trainer._clip_grad_norm, which EPITrainerMixin overrides; 4.x clips inline, so the
# mixin warns and takes the callback route (masks after clipping)
MIXIN_CLIPS = hasattr(Trainer, "_clip_grad_norm")


@pytest.fixture(autouse=True)
def no_inherited_mixed_precision(monkeypatch):
    """transformers 4.x writes a run's precision into ACCELERATE_MIXED_PRECISION, which the next fp32
    TrainingArguments read: a bf16 test would leave bf16 autocast on for the tests after it."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


CFG = dict(ratio=0.1, refresh_every=2, warmup_steps=2, beta=0.5)


class EPITrainer(EPITrainerMixin, Trainer):
    pass


def reading(sequential: bool) -> dict:
    """TrainingArguments kwargs for in-order or random reading (transformers 4.x: see in_order)."""
    return {"train_sampling_strategy": "sequential" if sequential else "random"} if SEQUENTIAL_ARG else {}


def in_order(route: str = "callback"):
    """Return the Trainer class that reads in order: the Trainer itself on 5.x, InOrderTrainer on 4.x."""
    return trainer_class(route)


def examples(n=64, seq=10, tasks=("a", "b")):
    """Deterministic LM examples with a task field; per task, a distinct token range (so tasks differ)."""
    out = {t: [] for t in tasks}
    for i in range(n):
        t = tasks[i % len(tasks)]
        g = torch.Generator().manual_seed(i)
        lo = 24 * (i % len(tasks))
        x = torch.randint(lo, lo + 24, (seq,), generator=g)
        out[t].append({"input_ids": x, "labels": x.clone(), "task": t})
    return out


class Spy(TrainerCallback):
    """Snapshots weights and the active mask at on_pre_optimizer_step, compares at on_optimizer_step."""

    def __init__(self, epi: EPICallback):
        self.epi = epi
        self.drift, self.protected, self.released_moved, self.tasks, self.grads = [], [], 0, [], []
        self.ever = None

    def on_pre_optimizer_step(self, args, state, control, **kw):
        eng = self.epi.engine
        self.masks = [m.clone() for m in eng.masks.values()]
        self.before = [p.detach().clone() for p in eng.params]
        self.tasks.append(eng.current_task)
        prot = [p.grad[m] for p, m in zip(eng.params, self.masks) if p.grad is not None]
        total = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in eng.model.parameters() if p.grad is not None))
        self.grads.append((bool(prot) and all(bool((g == 0).all()) for g in prot), float(total)))

    def on_optimizer_step(self, args, state, control, **kw):
        eng = self.epi.engine
        if self.ever is None:
            self.ever = [torch.zeros_like(m) for m in self.masks]
        n = sum(int(m.sum()) for m in self.masks)
        self.protected.append(n)
        if n:
            self.drift.append(max(float((p.detach() - b)[m].abs().max()) if m.any() else 0.0
                                  for p, b, m in zip(eng.params, self.before, self.masks)))
            for p, b, m, e in zip(eng.params, self.before, self.masks, self.ever):
                self.released_moved += int(((p.detach() != b) & e & ~m).sum())
        for e, m in zip(self.ever, self.masks):
            e |= m


def run(tmp_path, *, route="callback", scope="global", bf16=False, ga=2, bs=2, steps=STEPS, clip=1.0,
        scaler=None, save_steps=None, resume=None, max_steps=None, out=None, sampling=None, cfg=None,
        clip_point="before"):
    """Train the small Llama with EPI through the Trainer; return (trainer, epi callback, spy)."""
    epi = EPICallback(EPIConfig(scope=scope, **(cfg or CFG)), clip=clip_point)
    spy = Spy(epi)
    data = examples()
    blocks = scope == "per_task" or sampling == "sequential"  # single-task optimizer steps, read in order
    train = task_blocks(data, bs * ga) if blocks else [x for v in data.values() for x in v]
    args = TrainingArguments(
        output_dir=str(out or tmp_path / "out"), max_steps=max_steps or steps, per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga, learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant",
        max_grad_norm=clip, use_cpu=True, bf16=bf16, fp16=scaler is not None, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_steps=1,
        disable_tqdm=True, remove_unused_columns=False, seed=0, data_seed=0,
        **reading(blocks))
    cls = in_order(route) if blocks else EPITrainer if route == "mixin" else Trainer
    trainer = cls(model=small_llama(), args=args, train_dataset=train, data_collator=TaskCollator(),
                  callbacks=[epi, spy])
    if scaler is not None:  # accelerate has no fp16 AMP on CPU: install a CPU GradScaler, autocast off
        acc = trainer.accelerator
        acc.scaler, acc.native_amp = scaler, True
        acc.autocast_handler = AutocastKwargs(enabled=False)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, epi, spy


def assert_exact(spy, epi, steps=STEPS):
    iso_steps = [n for n in spy.protected if n]
    assert len(iso_steps) >= steps - 3, spy.protected  # warm-up 2 steps, then isolating
    assert spy.drift and max(spy.drift) == 0.0, spy.drift
    assert spy.released_moved > 0  # coordinates released by a refresh train again


@pytest.mark.parametrize("route,bf16", [("callback", False), ("callback", True), ("mixin", False), ("mixin", True)])
def test_protected_coordinates_move_exactly_zero_under_trainer_with_accumulation(tmp_path, route, bf16):
    trainer, epi, spy = run(tmp_path, route=route, bf16=bf16, ga=2)
    assert_exact(spy, epi)
    eng = epi.engine
    assert eng.isolator.optimizer is base_optimizer(trainer.optimizer)
    assert isinstance(eng.isolator.optimizer, torch.optim.AdamW) and eng.isolator.mode == "grad"
    # observed once per optimizer step (not per micro-batch): one EMA update and one engine step each
    assert eng.step == STEPS and eng.tracker.updates["global"] == STEPS
    assert [h["step"] for h in eng.history] == [2, 4, 6, 8]


def test_per_task_scope_reads_the_task_column_and_strips_it_before_the_forward(tmp_path):
    seen = []

    class Probe(TrainerCallback):  # a forward pre-hook registered after EPICallback's sees what the model gets
        def on_train_begin(self, args, state, control, model=None, **kw):
            model.register_forward_pre_hook(lambda m, a, k: seen.append(sorted(k)), with_kwargs=True)

    epi = EPICallback(EPIConfig(scope="per_task", **CFG))
    spy = Spy(epi)
    data = examples()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False, **reading(True))
    train = task_blocks(data, 4, seed=3)
    in_order()(model=small_llama(), args=args, train_dataset=train, data_collator=TaskCollator(),
            callbacks=[epi, spy, Probe()]).train()
    assert seen and all("task" not in keys for keys in seen)
    assert spy.tasks == [train[4 * s]["task"] for s in range(STEPS)]  # the engine ran each step's task
    assert set(epi.engine.sets) == {"a", "b"} and epi.engine.isolator.mode == "restore"
    assert_exact(spy, epi)


def test_per_task_scope_refuses_optimizer_steps_that_mix_tasks(tmp_path):
    epi = EPICallback(EPIConfig(scope="per_task", **CFG))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                             **reading(True))
    data = examples()
    mixed = [x for pair in zip(data["a"], data["b"]) for x in pair]  # a, b, a, b, ...
    trainer = in_order()(model=small_llama(), args=args, train_dataset=mixed, data_collator=TaskCollator(),
                      callbacks=[epi])
    with pytest.raises(ValueError, match="one task per optimizer step"):
        trainer.train()


def test_accumulated_gradient_gives_the_importance_of_the_full_batch(tmp_path):
    _, accum, _ = run(tmp_path / "a", ga=2, bs=2, sampling="sequential")
    _, full, _ = run(tmp_path / "b", ga=1, bs=4, sampling="sequential")
    a, b = accum.engine.tracker.buffers["global"], full.engine.tracker.buffers["global"]
    # Up to one scale for all tensors: transformers 4.47 leaves the accumulated loss GA× the full batch's on this
    # model (its gradient 2×, importance 4×), which a clip before the mask used to hide; 5.x gives scale 1.
    scale = sum(float(y.sum()) for y in b) / sum(float(x.sum()) for x in a)
    assert scale == pytest.approx(1.0 if MIXIN_CLIPS else scale, rel=1e-3)
    for x, y in zip(a, b):
        # equal up to float rounding, which 8 steps of training amplify (summation order differs between
        # transformers versions): a tolerance relative to the tensor's largest importance
        torch.testing.assert_close(x * scale, y, rtol=1e-3, atol=1e-4 * float(y.abs().max()))
    assert accum.engine.mask_digest() == full.engine.mask_digest()


@pytest.mark.parametrize("route,clip_point", [("callback", "before"), ("mixin", "before"), ("callback", "after"),
                                              ("mixin", "after")])
def test_both_routes_mask_before_clipping_by_default_and_clip_after_masks_after(tmp_path, route, clip_point):
    trainer, epi, spy = run(tmp_path, route=route, clip=1e-3, steps=5, clip_point=clip_point)
    iso = [g for g, n in zip(spy.grads, spy.protected) if n]
    assert iso
    if clip_point == "before":  # masked, then clipped: protected gradients 0, total norm = max_grad_norm
        assert all(zero for zero, _ in iso)
        assert all(abs(norm - 1e-3) < 1e-6 for _, norm in iso)
    else:  # clipped first; the engine masks inside optimizer.step()
        assert not any(zero for zero, _ in iso)
        assert all(abs(norm - 1e-3) < 1e-6 for _, norm in iso)
    assert trainer.args.max_grad_norm == 1e-3  # the callback hands the Trainer its clip back after every step
    assert "_clip_grad_norm" in EPITrainerMixin.__dict__
    assert MIXIN_CLIPS == (int(transformers.__version__.split(".")[0]) >= 5)  # where the seam exists


@pytest.mark.parametrize("route", ["callback", "mixin"])
def test_grad_scaler_importance_comes_from_unscaled_gradients(tmp_path, route):
    def scaler(scale):
        return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10 ** 6)
    _, scaled, spy = run(tmp_path / "s", route=route, scaler=scaler(2.0 ** 12), steps=5)
    _, plain, _ = run(tmp_path / "p", route=route, scaler=scaler(1.0), steps=5)
    # Scaling by a power of two is exact, so unscaled gradients are bit-identical to the unscaled run's.
    for x, y in zip(scaled.engine.tracker.buffers["global"], plain.engine.tracker.buffers["global"]):
        assert torch.equal(x, y)
    assert max(spy.drift) == 0.0


@pytest.mark.parametrize("route", ["callback", "mixin"])
def test_grad_scaler_overflow_steps_are_skipped_by_the_engine(tmp_path, route):
    # init scale 2**127 overflows: the scaler halves it at every skipped step until gradients are finite
    trainer, epi, spy = run(tmp_path, route=route, steps=8, ga=1,
                            scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -40,
                                                        growth_interval=10 ** 6))
    eng = epi.engine
    skipped = 8 - eng.step
    assert 1 <= skipped <= 4  # overflow steps never reached the optimizer, nor the engine's step count
    assert eng.tracker.updates["global"] == eng.step  # nor the importance
    assert eng.tracker.skipped_steps == skipped  # masking before the clip sees the inf, and skips folding it
    assert all(torch.isfinite(b).all() for b in eng.tracker.buffers["global"])
    assert max(spy.drift) == 0.0


@pytest.mark.parametrize("route,scope", [("callback", "global"), ("mixin", "per_task")])
def test_resumed_trainer_run_is_bit_identical_to_uninterrupted(tmp_path, route, scope):
    full_trainer, full, _ = run(tmp_path, route=route, scope=scope, steps=8, save_steps=3, out=tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "epi_state.pt").is_file()
    # the callback clips inside the step (args.max_grad_norm held at 0): the checkpoint keeps the user's value
    assert torch.load(ckpt / "training_args.bin", weights_only=False).max_grad_norm == 1.0
    # callback: resume in place (looks in output_dir/checkpoint-3); mixin: from another run's folder
    out = tmp_path / "full" if route == "callback" else tmp_path / "resumed"
    resumed_trainer, resumed, _ = run(tmp_path, route=route, scope=scope, steps=8, save_steps=3, out=out,
                                      resume=str(ckpt))
    a, b = full_trainer.model.state_dict(), resumed_trainer.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.engine.mask_digest() == resumed.engine.mask_digest()
    assert full.engine.step == resumed.engine.step == 8
    assert [h["step"] for h in full.engine.history] == [h["step"] for h in resumed.engine.history]
    for k in full.engine.tracker.buffers:
        assert all(torch.equal(x, y) for x, y in zip(full.engine.tracker.buffers[k], resumed.engine.tracker.buffers[k]))


def test_resume_without_engine_state_names_the_missing_file(tmp_path):
    run(tmp_path, steps=3, save_steps=3, out=tmp_path / "o")
    (tmp_path / "o" / "checkpoint-3" / "epi_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="epi_state.pt"):
        run(tmp_path, steps=4, out=tmp_path / "o", resume=str(tmp_path / "o" / "checkpoint-3"))


def test_callback_given_no_optimizer_attaches_at_the_first_optimizer_step():
    from types import SimpleNamespace

    model = small_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args, state = SimpleNamespace(deepspeed=None, output_dir="unused"), SimpleNamespace(global_step=0)
    cb = EPICallback(EPIConfig(**CFG))
    cb.on_train_begin(args, state, None, model=model, optimizer=None)  # the path huggingface/transformers#38181
    assert cb.engine is not None and cb.engine.isolator is None
    cb.on_pre_optimizer_step(args, state, None, optimizer=opt)
    assert cb.engine.isolator.optimizer is opt
    lost = EPICallback(EPIConfig(**CFG))
    lost.on_train_begin(args, state, None, model=small_llama(), optimizer=None)
    with pytest.raises(RuntimeError, match="EPITrainerMixin"):
        lost.on_pre_optimizer_step(args, state, None, optimizer=None)


def test_callback_reused_with_a_new_optimizer_moves_the_engine_to_it():
    from types import SimpleNamespace

    model = small_llama()
    args, state = SimpleNamespace(deepspeed=None, output_dir="unused"), SimpleNamespace(global_step=0)
    cb = EPICallback(EPIConfig(**CFG))
    first, second = (torch.optim.AdamW(model.parameters(), lr=1e-2) for _ in range(2))
    cb.on_train_begin(args, state, None, model=model, optimizer=first)
    assert cb.engine.isolator.optimizer is first
    cb.on_train_begin(args, state, None, model=model, optimizer=second)  # a second Trainer on the same model
    assert cb.engine.isolator.optimizer is second
    assert not first._optimizer_step_pre_hooks and not first._optimizer_step_post_hooks  # the old one is unhooked


def hf_and_loop_weights(tmp_path, clip_point: str, *, scope: str = "global", steps: int = 8, clip: float = 0.05,
                        route: str = "callback"):
    """Train one init through the Trainer (EPICallback) and through the suite's loop (train_steps) on the same
    batches, optimizer and engine config; return the two models' weights, engines and the loop's losses."""
    from transformers import default_data_collator

    from epi import EvolvingIsolation
    from epi.training.loop import TrainConfig, make_optimizer, train_steps

    bs = 4
    data = examples()
    train = task_blocks(data, bs)  # single-task batches, read in order by both paths
    cfg = EPIConfig(scope=scope, **CFG)
    opt_cfg = TrainConfig(lr=1e-2, weight_decay=0.1)

    loop_model = small_llama()
    opt = make_optimizer(loop_model, opt_cfg)
    engine = EvolvingIsolation(loop_model, cfg).attach(opt)

    def batch_fn(step):
        rows = train[step * bs:(step + 1) * bs]
        return rows[0]["task"], default_data_collator([{k: v for k, v in r.items() if k != "task"} for r in rows])
    state = train_steps(loop_model, opt, batch_fn, steps=steps, engine=engine, clip=clip)

    hf_model = small_llama()
    epi = EPICallback(cfg, clip=clip_point)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=bs,
                             learning_rate=opt_cfg.lr, lr_scheduler_type="constant", max_grad_norm=clip,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, seed=0, data_seed=0, **reading(True))
    # the loop's optimizer (fused AdamW, betas (0.9, 0.98), weight decay on every tensor), handed to the Trainer
    trainer = in_order(route)(model=hf_model, args=args, train_dataset=train, data_collator=TaskCollator(),
                         callbacks=[epi], optimizers=(make_optimizer(hf_model, opt_cfg), None))
    trainer.train()
    return loop_model.state_dict(), hf_model.state_dict(), engine, epi.engine, state


@pytest.mark.parametrize("route,scope", [("callback", "global"), ("callback", "per_task"), ("mixin", "global")])
def test_trainer_and_suite_loop_train_bit_identical_weights_with_clipping_active(tmp_path, route, scope):
    loop_w, hf_w, loop_eng, hf_eng, state = hf_and_loop_weights(tmp_path, "before", scope=scope, route=route)
    assert hf_eng.step == loop_eng.step == 8 and loop_eng.history  # isolating, with refreshes
    assert loop_eng.isolator.mode == hf_eng.isolator.mode == ("grad" if scope == "global" else "restore")
    assert all(torch.equal(loop_w[k], hf_w[k]) for k in loop_w), \
        max(float((loop_w[k] - hf_w[k]).abs().max()) for k in loop_w)
    assert loop_eng.mask_digest() == hf_eng.mask_digest()
    for key in loop_eng.tracker.buffers:  # the importance saw the same (unclipped) gradients
        assert all(torch.equal(a, b) for a, b in zip(loop_eng.tracker.buffers[key], hf_eng.tracker.buffers[key]))


def test_callback_masking_after_the_clip_trains_other_weights_than_the_suite_loop(tmp_path):
    # negative control: the same comparison with the Trainer's order (clip, then mask) differs
    loop_w, hf_w, loop_eng, hf_eng, _ = hf_and_loop_weights(tmp_path, "after")
    assert not all(torch.equal(loop_w[k], hf_w[k]) for k in loop_w)
    assert any(not torch.equal(a, b) for a, b in zip(loop_eng.tracker.buffers["global"],
                                                     hf_eng.tracker.buffers["global"]))

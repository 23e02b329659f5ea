"""Hugging Face Trainer integration: `EPICallback` (an unmodified Trainer) and `EPITrainerMixin`.

    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=TaskCollator(collate),
                      callbacks=[EPICallback(EPIConfig(ratio=0.05, scope="per_task"))])
    class MyTrainer(EPITrainerMixin, Trainer): ...          # the same, logging the masked grad_norm
    trainer = MyTrainer(model=model, args=args, ..., epi_config=EPIConfig(...))

Both routes run the suite loop's order by default — importance and gradient mask, *then* clipping, then
`optimizer.step()` (epi.training.loop) — so the HF and CPU paths run one algorithm (tests/test_hf.py checks
bit-identical weights against `train_steps` with clipping active). Where each piece happens in
`Trainer._run_epoch` (transformers 5.24; 4.x clips inline at the same place):

  micro-batch forward  — a forward pre-hook on the model pops the "task" entry of the batch (or calls
                         `task_fn(inputs)`) and records it; the model never sees the key;
  sync step            — `on_step_begin` (first micro-batch) … `_clip_grad_norm` → `on_pre_optimizer_step`
                         → `optimizer.step()` → `on_optimizer_step` → `on_step_end`.
    * EPICallback (clip="before", the default): the Trainer clips *before* any callback runs, so the
      callback takes clipping over for the step: `on_step_begin` sets `args.max_grad_norm` to 0 (the
      Trainer then skips its clip) and `on_step_end` puts it back; `on_pre_optimizer_step` unscales under
      a GradScaler, observes (importance + mask) and clips at the user's max_grad_norm. The Trainer's
      logged `grad_norm` is then the norm before masking and clipping. Only during a step does
      `args.max_grad_norm` read 0 (checkpoints store the user's value); an exception inside a step leaves it 0.
    * EPICallback(clip="after"): the earlier behaviour — the Trainer clips the unmasked gradients and the
      engine's optimizer pre-step hook observes inside `optimizer.step()`, after the GradScaler's check
      (an overflow step never reaches the engine). Clip scale and importance then differ from the loop's.
    * EPITrainerMixin: overrides `Trainer._clip_grad_norm` (transformers 5) to observe first (unscaling
      first under a GradScaler), so the logged `grad_norm` covers free coordinates only. Where that method
      does not exist (4.x) or `max_grad_norm=0`, its callback does the work as above.
    Every route keeps protected coordinates exact through the engine's step hooks (0.0 drift, AdamW
    included), once per optimizer step on the accumulated gradient.
  checkpoint           — `on_save` writes `epi_state.pt` (`epi_state_rank{r}.pt` when world_size > 1)
                         into `output_dir/checkpoint-{step}`; `train(resume_from_checkpoint=...)` restores it
                         at `on_train_begin` (see `EPICallback` for where it looks).

Task identity (scope="per_task"): add a "task" field to every example, wrap the collator with
`TaskCollator` and set `TrainingArguments(remove_unused_columns=False)` (else the Trainer drops the
column), or pass `task_fn(inputs) -> str`. All micro-batches of an optimizer step must share one task
(and, with several ranks, so must every rank): `task_blocks` orders examples that way for
`train_sampling_strategy="sequential"`. Global scope needs no task.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from transformers import TrainerCallback, default_data_collator
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..engine.backends import assert_same_task, check_supported, shard_group
from ..engine.config import EPIConfig
from ..engine.core import EvolvingIsolation
from ..jsonio import atomic_write

log = logging.getLogger(__name__)

__all__ = ["TASK_KEY", "EPICallback", "EPITrainerMixin", "TaskCollator", "base_optimizer", "state_file", "task_blocks",
           "unwrap_model"]

TASK_KEY = "task"
CLIP_POINTS = ("before", "after")  # where EPICallback masks, relative to the gradient clipping
TaskFn = Callable[[Mapping[str, Any]], str]


def base_optimizer(optimizer: Optional[torch.optim.Optimizer]) -> Optional[torch.optim.Optimizer]:
    """Return the torch optimizer inside accelerate's `AcceleratedOptimizer` wrappers (None stays None)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return the model inside DDP / DataParallel wrappers (FSDP2 shards in place: returned as is)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def state_file(rank: Optional[int] = None, world_size: Optional[int] = None) -> str:
    """Return the engine-state file name of this rank: epi_state.pt, or epi_state_rank{r}.pt on > 1 rank."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if world_size > 1 else 0
    return "epi_state.pt" if world_size == 1 else f"epi_state_rank{rank}.pt"


class TaskCollator:
    """Wrap a data collator so each example's "task" field travels with the batch as a list of str.

    The base collator never sees the field; `EPICallback`'s forward pre-hook strips it from the batch
    before the model's forward. Needs `TrainingArguments(remove_unused_columns=False)`.
    """

    def __init__(self, collator: Optional[Callable] = None, key: str = TASK_KEY):
        self.collator = collator or default_data_collator
        self.key = key

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        missing = [i for i, f in enumerate(features) if self.key not in f]
        if missing:
            raise KeyError(f"TaskCollator: example(s) {missing[:3]} have no {self.key!r} field; with a datasets."
                           "Dataset set TrainingArguments(remove_unused_columns=False) so the Trainer keeps it")
        batch = self.collator([{k: v for k, v in f.items() if k != self.key} for f in features])
        batch[self.key] = [str(f[self.key]) for f in features]
        return batch


def task_blocks(examples: Mapping[str, Sequence[Any]], block: int, seed: int = 0) -> List[Any]:
    """Return the examples of every task cut into single-task blocks of `block`, blocks shuffled.

    With `train_sampling_strategy="sequential"` and block = per_device_train_batch_size ×
    gradient_accumulation_steps × world_size, every optimizer step (on every rank) sees one task.
    A task's last incomplete block is dropped.
    """
    blocks = [list(items[i:i + block]) for items in examples.values()
              for i in range(0, len(items) - block + 1, block)]
    random.Random(seed).shuffle(blocks)
    return [x for b in blocks for x in b]


def _as_tasks(value: Any) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, torch.Tensor):
        return [str(v) for v in value.reshape(-1).tolist()]
    return [str(v) for v in value]


class EPICallback(TrainerCallback):
    """Runs `EvolvingIsolation` inside an unmodified `transformers.Trainer`.

    clip: "before" (default) — mask, then clip, as the suite's loop does (the callback clips, see the module
    docstring); "after" — the Trainer clips the unmasked gradients and the engine masks inside optimizer.step().
    config: the engine's `EPIConfig`. task_fn(inputs) -> str: the task of a batch (default: the batch's
    "task" entry, see `TaskCollator`). resume_from: the checkpoint folder holding the engine state on
    resume; default `args.output_dir/checkpoint-{global_step}`, which is where the Trainer resumes from
    with `resume_from_checkpoint=True` (`EPITrainerMixin.train` sets it for any path).
    The engine is `callback.engine` (built at `on_train_begin` on the model the Trainer trains).
    """

    def __init__(self, config: Optional[EPIConfig] = None, task_fn: Optional[TaskFn] = None, *,
                 task_key: str = TASK_KEY, resume_from: Optional[str] = None, clip: str = "before"):
        if clip not in CLIP_POINTS:
            raise ValueError(f"clip must be one of {', '.join(map(repr, CLIP_POINTS))}, got {clip!r}")
        self.clip = clip
        self.config = config or EPIConfig()
        self.task_fn = task_fn
        self.task_key = task_key
        self.resume_from = resume_from
        self.engine: Optional[EvolvingIsolation] = None
        self.get_optimizer: Optional[Callable[[], Any]] = None  # set by EPITrainerMixin: trainer.optimizer
        self._tasks: List[str] = []  # tasks of the micro-batches since the last optimizer step
        self._early = False  # observed before clipping this step (EPITrainerMixin)
        self._driven = False  # EPITrainerMixin observes inside Trainer._clip_grad_norm: the Trainer keeps clipping
        self._held: Optional[tuple] = None  # (args, max_grad_norm) while the callback clips a step itself
        self._handle = None

    # ---- task identity -------------------------------------------------------------------------------
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        task = self.task_fn(kwargs) if self.task_fn is not None else kwargs.get(self.task_key)
        kwargs.pop(self.task_key, None)
        if task is not None and module.training and torch.is_grad_enabled():
            self._tasks.extend(_as_tasks(task))
        return args, kwargs

    def _take_task(self) -> Optional[str]:
        """Return the task of this optimizer step (None in global scope without tasks); reset the record."""
        tasks, self._tasks = sorted(set(self._tasks)), []
        if self.config.scope == "global":
            return tasks[0] if len(tasks) == 1 else None
        if not tasks:
            raise ValueError("scope='per_task' needs the task of every batch: give each example a 'task' field, "
                             "wrap the collator with epi.hf.TaskCollator and set TrainingArguments("
                             "remove_unused_columns=False), or pass EPICallback(task_fn=...)")
        if len(tasks) > 1:
            raise ValueError(f"scope='per_task' needs one task per optimizer step, got {tasks}: order the examples "
                             "with epi.hf.task_blocks(...) and use train_sampling_strategy='sequential'")
        assert_same_task(tasks[0], self.engine.params[0].device)
        return tasks[0]

    # ---- engine wiring -------------------------------------------------------------------------------
    def _attach(self, optimizer: Any) -> bool:
        base = base_optimizer(optimizer)
        if base is None and self.get_optimizer is not None:
            base = base_optimizer(self.get_optimizer())
        if base is None:
            return False
        check_supported(self.engine.model, optimizer)
        # GradScaler.step calls optimizers that "support AMP scaling" (fused Adam/AdamW) even on overflow
        # steps, letting the kernel unscale and skip: the engine's step hooks would then see scaled gradients
        # and count (and weight-decay) a skipped step. Without the flag the scaler unscales first and skips
        # optimizer.step() on overflow. Only GradScaler reads this flag.
        if getattr(base, "_step_supports_amp_scaling", False):
            base._step_supports_amp_scaling = False
        if self.engine.isolator is not None and self.engine.isolator.optimizer is not base:
            self.engine.detach()  # the callback reused with a new Trainer: its optimizer replaces the old one
        if self.engine.isolator is None:
            self.engine.attach(base)
        return True

    def observe(self) -> None:
        """Fold this optimizer step's gradients into the importance and mask them now (before clipping)."""
        self.engine.observe(self._take_task())
        self._early = True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "deepspeed", None):
            raise NotImplementedError("EPICallback does not support DeepSpeed: ZeRO keeps gradients in flat fp32 "
                                      "partitions and every Trainer hook fires after its update; use FSDP2 "
                                      "(accelerate fsdp_version: 2) or DDP")
        if model is None:
            raise ValueError("EPICallback.on_train_begin got no model")
        check_supported(model, optimizer)
        model = unwrap_model(model)
        if self.engine is None or self.engine.model is not model:
            self.engine = EvolvingIsolation(model, self.config, group=shard_group(model))
        if self._handle is not None:
            self._handle.remove()
        self._handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._tasks, self._early = [], False
        if not self._attach(optimizer):
            log.warning("EPICallback: no optimizer at on_train_begin; attaching at the first optimizer step")
        if state.global_step > 0:
            self.load(self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"),
                      state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        # The Trainer clips right after the last backward, before any callback: hold its max_grad_norm so it
        # skips the clip, and clip after masking in on_pre_optimizer_step (the suite loop's order).
        if self.clip == "before" and not self._driven and self._held is None and (args.max_grad_norm or 0) > 0:
            self._held = (args, args.max_grad_norm)
            args.max_grad_norm = 0.0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.engine.isolator is None and not self._attach(optimizer):
            raise RuntimeError("EPICallback could not reach the optimizer (the callback got optimizer=None): "
                               "use EPITrainerMixin, which hands it trainer.optimizer")
        if self._early:  # EPITrainerMixin observed before clipping
            self._early = False
            return
        if self.clip == "after":  # the engine's step pre-hook observes inside optimizer.step() with this task
            self.engine.current_task = self._take_task()
            return
        self._unscale(optimizer)
        self.engine.observe(self._take_task())
        if self._held is not None:
            # the loop's clip: every trainable parameter (one device, DDP, or FSDP2 on one mesh)
            torch.nn.utils.clip_grad_norm_([p for p in self.engine.model.parameters() if p.requires_grad],
                                           self._held[1])

    def _unscale(self, optimizer: Any) -> None:
        """Unscale the gradients once under a GradScaler (importance and clip need true gradients)."""
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds the run's scaler
        if scaler is None or not scaler.is_enabled():
            return
        try:
            scaler.unscale_(base_optimizer(optimizer))
        except RuntimeError:  # already unscaled this step (transformers 5 computes grad_norm with an unscale)
            pass

    def on_step_end(self, args, state, control, **kwargs):
        self._release_clip()

    def _release_clip(self) -> None:
        """Give the Trainer its max_grad_norm back (before it logs, saves or evaluates)."""
        if self._held is not None:
            held_args, value = self._held
            held_args.max_grad_norm = value
            self._held = None

    def on_train_end(self, args, state, control, **kwargs):
        self._release_clip()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ---- checkpoints ---------------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if self.engine is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, state_file())
        blob = {"global_step": state.global_step, "engine": self.engine.state_dict()}
        atomic_write(path, lambda tmp: torch.save(blob, tmp))

    def load(self, folder: str, global_step: Optional[int] = None) -> None:
        """Restore the engine state saved by `on_save` in checkpoint `folder` (this rank's file)."""
        path = os.path.join(folder, state_file())
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no EPI engine state at {path}: resume from a checkpoint written with "
                                    "EPICallback, or pass EPICallback(resume_from=<checkpoint folder>)")
        # tensors and plain values only: a planted pickle cannot run code
        from ..training.checkpoints import safe_load
        blob = safe_load(path, "delete that checkpoint folder or resume from another one")
        if global_step is not None and blob["global_step"] != global_step:
            raise ValueError(f"{path} holds the engine at step {blob['global_step']}, the Trainer resumes at "
                             f"step {global_step}")
        self.engine.load_state_dict(blob["engine"])


class EPITrainerMixin:
    """`class MyTrainer(EPITrainerMixin, Trainer)`: EPI with gradients masked *before* clipping.

    Overrides `Trainer._clip_grad_norm` (transformers 5; in 5.24 `_run_epoch` calls it on every sync step
    when max_grad_norm > 0) to observe first, so the Trainer clips the masked gradients and logs their norm.
    Transformers 4.x clips inline: its callback then takes the clip over (EPICallback, clip="before"), the
    same algorithm. Extra constructor arguments: `epi_config`, `task_fn`; an `EPICallback` passed in
    `callbacks` is used instead (one made with clip="after" keeps masking after the Trainer's clip).
    The engine is `trainer.epi`.
    """

    def __init__(self, *args, epi_config: Optional[EPIConfig] = None, task_fn: Optional[TaskFn] = None, **kwargs):
        super().__init__(*args, **kwargs)
        found = [c for c in self.callback_handler.callbacks if isinstance(c, EPICallback)]
        self.epi_callback: EPICallback = found[0] if found else EPICallback(epi_config, task_fn)
        if not found:
            self.add_callback(self.epi_callback)
        self.epi_callback.get_optimizer = lambda: self.optimizer
        # transformers 5: the mixin observes inside _clip_grad_norm; 4.x: its callback clips (same algorithm)
        self.epi_callback._driven = hasattr(super(), "_clip_grad_norm")

    @property
    def epi(self) -> Optional[EvolvingIsolation]:
        return self.epi_callback.engine

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # the Trainer does the same
        self.epi_callback.resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _clip_grad_norm(self, model):
        cb, acc = self.epi_callback, self.accelerator
        if cb.clip == "after":  # asked for the Trainer's order: clip, then mask inside optimizer.step()
            return super()._clip_grad_norm(model)
        if cb.engine.isolator is None:
            cb._attach(self.optimizer)
        if getattr(acc, "scaler", None) is None:
            cb.observe()
            return super()._clip_grad_norm(model)
        # GradScaler.unscale_ may run once per step: unscale here so the importance sees true gradients,
        # then keep accelerate's clip from unscaling a second time.
        acc.unscale_gradients()
        cb.observe()
        acc.unscale_gradients = lambda optimizer=None: None
        try:
            return super()._clip_grad_norm(model)
        finally:
            del acc.unscale_gradients

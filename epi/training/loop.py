"""One training loop for every method: batches by step, optional engine, optional method plugins.

Data order is a pure function of the step (`batch_fn(step) -> (task, batch)`), so every method sees
the same batches in the same order, and a run resumed at step k continues exactly where it stopped.

Per step: backward (× grad_accum) → plugin.after_backward (e.g. the EWC penalty gradient) →
engine.observe(task) (importance + gradient mask, before clipping) → clip → optimizer.step() (the
engine's hooks keep protected coordinates exact) → zero_grad.

Batches come from the CPU and are placed on the model's device once per step. With a GradScaler (fp16,
epi.training.device) the loss is scaled for backward and the gradients are unscaled right after it, so plugins,
the importance and clipping see true gradients; a step with inf/NaN gradients is skipped by the scaler,
so the optimizer never runs and the engine (whose hooks sit on optimizer.step) neither counts it nor
refreshes, and its importance skips the non-finite gradients (check_finite).
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..progress import progress_disabled
from .device import to_device

log = logging.getLogger(__name__)

Batch = Dict[str, torch.Tensor]
BatchFn = Callable[[int], Tuple[str, Batch]]


@dataclass
class TrainConfig:
    """The optimiser's settings: AdamW at a constant learning rate (the loop's own settings — steps, clipping,
    accumulation — are arguments of `train_steps`)."""
    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.98)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """Return AdamW over the trainable parameters (fused kernel where torch has one)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                 fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


class Plugin:
    """A method's hooks into the loop; override what you need (all optional)."""

    def after_backward(self, model: torch.nn.Module, task: str, step: int) -> None: ...

    def after_step(self, model: torch.nn.Module, task: str, step: int) -> None: ...


class TrackImportance(Plugin):
    """Fold every step's gradients into importance trackers, protecting nothing: `tracker` over the mixed
    stream (scope key None) and, when given, `per_task` under the step's task. It runs after backward, so a
    plugin after it that adds a penalty gradient (EWC) is not tracked."""

    def __init__(self, tracker, per_task=None):
        self.tracker, self.per_task = tracker, per_task

    def after_backward(self, model: torch.nn.Module, task: str, step: int) -> None:
        self.tracker.update(None)
        if self.per_task is not None:
            self.per_task.update(task)


@dataclass
class LoopState:
    """What the loop has produced so far (per-step losses and tasks); part of a checkpoint."""
    step: int = 0
    losses: List[float] = field(default_factory=list)
    tasks: List[str] = field(default_factory=list)
    skipped: int = 0  # steps a GradScaler skipped (inf/NaN gradients in fp16)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_fn: BatchFn, *,
                steps: int, state: Optional[LoopState] = None, engine=None,
                plugins: Sequence[Plugin] = (), clip: Optional[float] = 1.0, grad_accum: int = 1,
                micro_fn: Optional[Callable[[int, int], Tuple[str, Batch]]] = None,
                callback: Optional[Callable[[LoopState], None]] = None, desc: Optional[str] = None,
                scaler=None) -> LoopState:
    """Run optimizer steps state.step .. steps-1 and return the loop state (losses per step).

    batch_fn(step) gives the (task, batch) of a step; with grad_accum > 1, micro_fn(step, i) gives the
    i-th micro-batch (default: batch_fn's batch split into grad_accum chunks). callback(state) runs after
    every step (checkpointing, evaluation). scaler: a GradScaler for fp16 training (epi.training.device.make_scaler).
    """
    state = state or LoopState()
    model.train()
    device = next(model.parameters()).device
    if scaler is not None:  # fused AdamW would take the inf check over and still run its step hooks: one skip rule
        optimizer._step_supports_amp_scaling = False
    bar = tqdm(range(state.step, steps), desc=desc, leave=False, disable=progress_disabled())
    for step in bar:
        task, batch = batch_fn(step)
        batch = to_device(batch, device)
        total = 0.0
        for i in range(grad_accum):
            if grad_accum == 1:
                micro = batch
            elif micro_fn is not None:
                micro = to_device(micro_fn(step, i)[1], device)
            else:
                micro = {k: v.chunk(grad_accum)[i] for k, v in batch.items()}
            loss = model(**micro).loss / grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += float(loss.detach())
        if scaler is not None:
            scaler.unscale_(optimizer)  # true gradients for plugins, importance and clipping
        for plugin in plugins:
            plugin.after_backward(model, task, step)
        if engine is not None:
            engine.observe(task)
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        if scaler is None:
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skips optimizer.step() when the unscaled gradients hold inf/NaN
            scaler.update()
            state.skipped += scaler.get_scale() < scale  # update() backs off only after a skipped step
        optimizer.zero_grad(set_to_none=True)
        for plugin in plugins:
            plugin.after_step(model, task, step)
        state.step = step + 1
        state.losses.append(total)
        state.tasks.append(task)
        if callback is not None:
            callback(state)
    return state

"""The runner's step hooks: what happens after every optimizer step besides the method's own plugins.

Each hook has `after_step(state)` (state: epi.training.loop.LoopState after the step); the runner composes
them (`compose`) into the loop's callback, in this order: snapshots, protected share, evaluations,
checkpoint (the checkpoint then holds what the others recorded at this step).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..engine.core import CURRENT_TASK


class StepHook:
    """Something the runner does after every optimizer step."""

    def after_step(self, state) -> None: ...


def compose(hooks: Sequence[StepHook]) -> Callable:
    """Return the loop callback that runs `hooks` in order after every step."""
    def callback(state) -> None:
        for hook in hooks:
            hook.after_step(state)
    return callback


class Snapshots(StepHook):
    """Keep the masks (bit-packed) and an importance sample of every engine refresh, for snapshots.npz."""

    def __init__(self, engine):
        self.engine = engine
        self.taken = 0  # engine history entries already kept
        self.arrays: Dict[str, object] = {}  # npz key → array

    @torch.no_grad()
    def after_step(self, state) -> None:
        import numpy as np
        eng = self.engine
        if len(eng.history) <= self.taken:
            return
        for entry in eng.history[self.taken:]:
            key, step = entry["scope_key"], entry["step"]
            for name, m in zip(eng.names, eng._bools(eng.sets[key])):
                self.arrays[f"mask/{step}/{key}/{name}"] = np.packbits(m.cpu().numpy().reshape(-1))
            self.arrays[f"sample/{step}/{key}"] = eng._sample_prev[key].numpy()
        self.taken = len(eng.history)

    def save(self, out: Path, record: dict) -> None:
        """Write out/snapshots.npz and name it (and the tensor shapes) in `record`; nothing when none were kept."""
        if not self.arrays:
            return
        import numpy as np
        np.savez_compressed(Path(out) / "snapshots.npz", **self.arrays)
        record["snapshots"] = "snapshots.npz"
        record["param_shapes"] = {n: list(p.shape) for n, p in zip(self.engine.names, self.engine.params)}


class ProtectedShare(StepHook):
    """Log the engine's protected share after every step it protects something (record["protected_fraction"])."""

    def __init__(self, engine, record: dict):
        self.engine, self.record = engine, record

    def after_step(self, state) -> None:
        eng = self.engine
        if eng.sets and eng.config.isolate:
            self.record["protected_fraction"].append(
                eng.protected_fraction(None if eng.config.scope == "per_task" else CURRENT_TASK))


class LastEvaluations(StepHook):
    """Evaluate the last stage `eval_every` steps apart before its end, `eval_last` times in all (the stage end's
    own evaluation included, added by the runner), so the final score is a mean over them."""

    def __init__(self, evaluate: Callable[[], dict], record: dict, lo: int, hi: int, every: int, last: int):
        self.evaluate, self.record = evaluate, record
        self.lo, self.hi, self.every, self.last = lo, hi, every, last

    def after_step(self, state) -> None:
        left = self.hi - state.step
        if state.step < self.hi and left % self.every == 0 and left // self.every < self.last and state.step > self.lo:
            self.record["evals"].append({"step": state.step, "scores": self.evaluate()})


class Checkpoints(StepHook):
    """Save a resumable checkpoint every `every` steps (not after the last step: the record is written then)."""

    def __init__(self, path: Path, every: int, total: int, *, model, optimizer, engine, method, record: dict,
                 scaler=None):
        self.path, self.every, self.total = Path(path), every, total
        self.model, self.optimizer, self.engine, self.method = model, optimizer, engine, method
        self.record, self.scaler = record, scaler

    def after_step(self, state) -> None:
        from ..training.checkpoints import save_checkpoint
        if state.step % self.every == 0 and state.step < self.total:
            self.record["losses"], self.record["loss_tasks"] = state.losses, state.tasks
            save_checkpoint(self.path, model=self.model, optimizer=self.optimizer, state=state, engine=self.engine,
                            extra={"method": self.method.state_dict(), "record": self.record}, scaler=self.scaler)


def step_hooks(*, snapshots: Optional[Snapshots], share: Optional[ProtectedShare],
               evaluations: Optional[LastEvaluations], checkpoints: Optional[Checkpoints]) -> List[StepHook]:
    """Return the hooks that are on, in the order they must run."""
    return [h for h in (snapshots, share, evaluations, checkpoints) if h is not None]

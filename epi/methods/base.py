"""The Method protocol: what a method tells the runner, and the defaults every method starts from.

A method answers for the runner how the protocol's tasks are staged, which engine config it runs, what it
does at stage boundaries, which loop plugins it adds and what it adds to the results record. The runner and
the loop never ask which method they run: a new method is one small class in its own file of this package,
plus one line in `registry.py`.

The runner calls the hooks in this order:
  check(config, out)                   before anything is built (refuse early: e.g. a missing matched run)
  engine_config(ctx)                   the isolation engine's config, None = no engine (ctx.engine is None here)
  prepare(ctx)                         ctx.engine built; probes, fusion, seeded importance
  stages(ctx)                          the training stages (lists of task names); then ctx.stage_list is set
  steps_per_task(ctx, k), replay_tasks(ctx, k)   for every stage k, while the step schedule is built
  plugins(ctx)                         the loop plugins (after_backward / after_step)
  per stage k: stage_start(ctx, k, tasks) → [the loop with the plugins] → stage_end(ctx, k, tasks)
  record_extra()                       method-specific fields of the results record
state_dict / load_state_dict: the method's part of a checkpoint (load_state_dict runs before prepare).

Every hook receives a `MethodContext`: what the run gives its method (model, data, config, engine, start
weights, a probe function), never the runner itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

from ..engine.config import EPIConfig
from ..training.loop import Plugin

if TYPE_CHECKING:  # pragma: no cover - the runner builds the context; methods never import it
    from ..engine.core import EvolvingIsolation
    from ..experiments.profiles import ExperimentConfig

Tensors = List[torch.Tensor]


class RunRefused(ValueError):
    """The runner will not start (or reuse) a run as asked; the message says why and what to do. (Defined
    here, below the runner, so a method's `check` can refuse too; epi.experiments.runner re-exports it.)"""


@dataclass
class MethodContext:
    """What a run gives its method: the model, data and settings, and the runner's helpers as functions."""
    config: "ExperimentConfig"                 # the run's settings
    model: torch.nn.Module                     # the model being trained (on its device)
    batchers: Dict[str, Any]                   # task → batcher (epi.training.data.make_batchers)
    base_scores: Dict[str, dict]               # the start model's evaluation, task → {"score", "loss", ...}
    out: Path                                  # the run folder
    base_importance: Callable[[str], Dict[str, Dict[str, torch.Tensor]]]  # scope → base phase's importance
    # tasks, steps[, targets] → (Δθ, θ) of probe fine-tunes on the isolatable tensors (targets "blocks") or on
    # every trainable tensor (targets "all"), in epi.engine.core.isolatable's order for that targets value
    probe: Callable[..., Tuple[Dict[str, Tensors], Dict[str, Tensors]]]
    start_isolatable: Callable[[], Tensors]    # a copy of the isolatable tensors now
    load_isolatable: Callable[[Tensors], None]  # write the isolatable tensors
    evaluate: Callable[[], Dict[str, dict]]    # the model's scores on the run's evaluation sets now
    engine: Optional["EvolvingIsolation"] = None  # set after engine_config, before prepare
    stage_list: List[List[str]] = field(default_factory=list)  # set after stages

    def epi_config(self, **changes) -> EPIConfig:
        """Return the run's engine config with `changes`."""
        return self.config.epi_config(**changes)


class Method:
    name = "method"
    mix_only = False  # True: the method defines a staging of the mix; other protocols refuse it
    reads_other_runs = False  # True: it reads other runs' results (a grid runs it after the others)

    def check(self, config: "ExperimentConfig", out: Path) -> None:
        """Raise (with what to do) when the run cannot start; runs before anything is built."""

    def stages(self, ctx: MethodContext) -> List[List[str]]:
        """Return the training stages (lists of task names) for the run's protocol."""
        cfg = ctx.config
        if cfg.protocol == "forgetting":
            return [list(cfg.train_tasks)]
        if cfg.protocol == "sequential":
            return [[t] for t in cfg.tasks]
        return [list(cfg.tasks)]

    def engine_config(self, ctx: MethodContext) -> Optional[EPIConfig]:
        """Return the isolation engine's config (None: the method runs without an engine)."""
        return None

    def prepare(self, ctx: MethodContext) -> None:
        """Set up before training (ctx.engine exists if engine_config gave one)."""

    def stage_start(self, ctx: MethodContext, k: int, tasks: List[str]) -> None:
        """Act before stage k trains (also when a run resumes inside stage k and has an engine)."""

    def stage_end(self, ctx: MethodContext, k: int, tasks: List[str]) -> None:
        """Act after stage k has trained, before it is evaluated."""

    def plugins(self, ctx: MethodContext) -> List[Plugin]:
        """Return the loop plugins this method adds (run after backward / after each step)."""
        return []

    def steps_per_task(self, ctx: MethodContext, k: int) -> int:
        """Return the optimizer steps per task of stage k (the stage trains len(tasks) × this, balanced)."""
        return ctx.config.steps_per_task

    def replay_tasks(self, ctx: MethodContext, k: int) -> List[str]:
        """Return the tasks whose batches are replayed into stage k."""
        return []

    def record_extra(self) -> dict:
        """Return method-specific fields for the results record (merged into it at the end)."""
        return {}

    def state_dict(self) -> dict:
        """Return the method's state for a checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state of `state_dict` (called before prepare when a run resumes)."""

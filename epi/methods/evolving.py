"""Evolving parameter isolation (EPI): the engine refreshing its top-p mask, global or per-task scope."""
from __future__ import annotations

from .base import Method


class EPI(Method):
    """Evolving parameter isolation, global scope: one EMA of the score over the mixed stream, layer-
    normalised, global top-p, refreshed every T steps (protect new, release outdated) — the paper's
    mechanism as the secondary sources describe it. The EMA is seeded from the base model's tracking."""
    name = "epi"
    scope = "global"

    def engine_config(self, ctx):
        return ctx.epi_config(scope=self.scope)

    def prepare(self, ctx):
        if ctx.config.score == "fisher":  # the base phase tracked g²; another score starts from zero
            ctx.engine.seed_importance(ctx.base_importance(self.scope))


class EPIPerTask(EPI):
    """EPI with one EMA per task: a batch of task t is isolated by the union of the other tasks' top-p
    sets, so a task never blocks itself (the suite's alternative reading; the paper's choice is unknown)."""
    name = "epi_per_task"
    scope = "per_task"

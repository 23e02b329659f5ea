"""Stagings without isolation: full SFT, sequential, and multi-stage SFT (random and heuristic order)."""
from __future__ import annotations

import random

from .base import Method


class FullSFT(Method):
    """Standard SFT. Mix protocol: one stage over the multi-task mix (every batch one task, balanced).
    Paper: "Full SFT (Multi-task)" baseline of CPI-FT Table 1 and EPI."""
    name = "full_sft"


class Sequential(Method):
    """Tasks one after another (mix protocol: in the order given). The classic forgetting baseline."""
    name = "sequential"
    mix_only = True

    def stages(self, ctx):
        return [[t] for t in ctx.config.tasks]


class MultiStage(Method):
    """Multi-stage SFT with random K=3 staging (CPI-FT's "Multi-Stage (Random, K=3)"): the tasks are
    shuffled with the seed and cut into K contiguous groups trained one after another."""
    name = "multi_stage"
    mix_only = True

    def stages(self, ctx):
        tasks = list(ctx.config.tasks)
        random.Random(ctx.config.seed).shuffle(tasks)
        return [g for g in (tasks[i::ctx.config.stages_k] for i in range(ctx.config.stages_k)) if g]


class MultiStageHeuristic(Method):
    """Multi-stage SFT with a heuristic order. The papers do not say which heuristic; the suite orders
    the tasks by the base model's validation loss, hardest first (so the easiest, least fragile tasks
    are trained last), cut into K contiguous groups."""
    name = "multi_stage_heuristic"
    mix_only = True

    def stages(self, ctx):
        losses = ctx.base_scores
        tasks = sorted(ctx.config.tasks, key=lambda t: -losses[t]["loss"])
        k = ctx.config.stages_k
        size = -(-len(tasks) // k)
        return [tasks[i:i + size] for i in range(0, len(tasks), size)]

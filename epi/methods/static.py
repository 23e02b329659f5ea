"""Static isolation: the CPI-FT pipeline as a method (its pieces are in cpift.py)."""
from __future__ import annotations

import random
from typing import Dict, List

import torch

from . import cpift
from .base import Method


class Static(Method):
    """Static isolation = the CPI-FT pipeline (Wang, Liang, Peng 2025; see cpift.py).

    Papers: per-task probe fine-tunes → cores = global top-p of |Δθ| (p=1%) → Jaccard grouping at τ=0.1
    → core transplant + SLERP fusion → staged training, earlier groups' cores frozen, never released.
    Suite choices: cores use the run's shared `ratio` (not 1%) so every isolating method protects the
    same p; cores, fusion and freezing act on the engine's isolatable tensors (block matrices; the rest is
    SLERP-fused only); the mix protocol runs the whole pipeline; in forgetting/sequential the cores of the
    tasks to protect (the base abilities not trained / earlier stages) are frozen while the others train.
    """
    name = "static"

    def __init__(self):
        self.cores: Dict[str, List[torch.Tensor]] = {}
        self.groups: List[List[str]] = []
        self.similarity: List[List[float]] = []

    def engine_config(self, ctx):
        return ctx.epi_config(refresh_every=None)

    def prepare(self, ctx):
        cfg = ctx.config
        probe_tasks = list(cfg.tasks)
        if not self.cores:
            deltas, probes = ctx.probe(probe_tasks, cfg.probe_steps)
            self.cores = cpift.core_regions(deltas, cfg.ratio)
            self.similarity = cpift.core_similarity(self.cores)
            groups = cpift.group_tasks(probe_tasks, self.similarity, cfg.group_tau)
            random.Random(cfg.seed).shuffle(groups)  # CPI-FT mainly evaluates random group order
            self.groups = groups
            if cfg.protocol == "mix":
                ctx.load_isolatable(cpift.fuse(ctx.start_isolatable(), probes, self.cores, cfg.slerp_weight))

    def stages(self, ctx):
        return self.groups if ctx.config.protocol == "mix" else super().stages(ctx)

    def stage_start(self, ctx, k, tasks):
        cfg = ctx.config
        if cfg.protocol == "mix":
            frozen = [t for g in self.groups[:k] for t in g]
        elif cfg.protocol == "forgetting":
            frozen = [t for t in cfg.tasks if t not in cfg.train_tasks]
        else:
            frozen = [t for g in ctx.stage_list[:k] for t in g]
        masks = [torch.zeros_like(p, dtype=torch.bool) for p in ctx.engine.params]
        for t in frozen:
            for m, c in zip(masks, self.cores[t]):
                m |= c.to(m.device)  # cores restored from a checkpoint come back on the CPU
        ctx.engine.set_masks(masks)

    def record_extra(self):
        """Return CPI-FT's groups and core similarity for the record ({} before the pipeline ran)."""
        return {"cpift": {"groups": self.groups, "similarity": self.similarity}} if self.groups else {}

    def state_dict(self):
        return {"cores": self.cores, "groups": self.groups, "similarity": self.similarity}

    def load_state_dict(self, state):
        self.cores, self.groups, self.similarity = state["cores"], state["groups"], state["similarity"]

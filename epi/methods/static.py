"""Static isolation: the CPI-FT pipeline as a method (its pieces are in cpift.py)."""
from __future__ import annotations

import random
from typing import Dict, List, Optional

import torch

from ..engine.config import EPIConfig
from ..engine.core import isolatable
from . import cpift
from .base import Method


class Static(Method):
    """Static isolation = the CPI-FT pipeline (Wang, Liang, Peng 2025; see cpift.py), mix protocol:

      Stage 1  a probe fine-tune per task from θ₀ (`probe_steps`, fresh optimizer each);
               core C_i = global top-`core_ratio` of |Δθ_i| on the isolatable tensors
      Stage 2  Jaccard S(C_i, C_j); groups = connected components of {S ≥ τ}, in a random order (the seed's)
      Stage 3  fusion from θ₀: cores transplanted from their probes, the rest SLERP-ed toward the probes;
               the fused model is evaluated (record["cpift"]["fused_scores"]) before Stage 4
      Stage 4  brief training, `stage4_fraction` × `steps_per_task` steps per task: one stage per group on a
               balanced mix of its tasks, the cores of earlier groups frozen and never released

    Stated by the paper (as its abstract and a detailed secondary write-up report it; docs/BACKGROUND.md, CPI-FT):
    p = 1% of |Δθ| globally (`core_ratio` = 0.01), τ = 0.1 on the Jaccard (`group_tau`, tau_mode "absolute"),
    connected components, random group order, core transplant + SLERP with a linear fallback under a collinearity
    threshold, and a *brief* Stage 4 ("lightweight, pipelined SFT ... using mixed-task data", "sequentially on the
    sampled data of each task group", earlier groups' cores frozen); multi-stage Stage 4 beats a single mixed stage.
    Chosen by the suite (not in the sources): the Stage-4 length (`stage4_fraction` = 0.1 of the mix's budget,
    so probes + Stage 4 cost about 1.1 × full SFT at probe_steps = steps_per_task); `stage4` = "mixed" as the
    single-stage variant (one stage on all tasks, every task's core frozen); tau_mode "chance" (τ as a multiple
    of chance Jaccard p/(2−p)); the fusion base θ_base = θ₀; fusion over every trainable tensor a probe changed,
    norms and embeddings included (`fusion_scope` "changed"; "isolatable" = the block matrices only); cores on
    the engine's isolatable tensors only (the coordinates the engine can freeze); the linear-fallback threshold
    (cpift.slerp: |cos| > 1 − 1e-4), every fallback counted in record["cpift"]["fusion"].
    Other protocols (no fusion, no Stage-4 schedule): forgetting freezes the cores of the tasks not trained,
    sequential freezes the cores of earlier stages; their stages keep the protocol's `steps_per_task`.
    """
    name = "static"

    def __init__(self):
        self.cores: Dict[str, List[torch.Tensor]] = {}
        self.groups: List[List[str]] = []
        self.similarity: List[List[float]] = []
        self.tau: Optional[float] = None             # the Jaccard threshold grouping used (after tau_mode)
        self.chance: Optional[float] = None          # chance Jaccard p/(2−p) of two random cores of that share
        self.fusion: Optional[dict] = None           # cpift.fuse_and_count's report (+ scope), mix only
        self.fused_scores: Optional[Dict[str, dict]] = None  # the fused model's evaluation, mix only
        self.stage4: Optional[dict] = None           # Stage 4's schedule, mix only

    def engine_config(self, ctx):
        return ctx.epi_config(refresh_every=None)

    def prepare(self, ctx):
        cfg = ctx.config
        if self.cores:  # resumed: the pipeline ran, the checkpoint holds the trained weights
            return
        tasks = list(cfg.tasks)
        fuses = cfg.protocol == "mix"
        # every trainable tensor: the engine's (where the cores live) are among them whatever its targets
        named = isolatable(ctx.model, EPIConfig(targets="all"))
        names, params = [n for n, _ in named], [p for _, p in named]
        start = [p.detach().clone() for p in params]  # θ₀: the probes work on copies
        deltas, probes = ctx.probe(tasks, cfg.probe_steps, "all")
        where = {n: i for i, n in enumerate(names)}
        engine_index = [where[n] for n in ctx.engine.names]  # cores live on the tensors the engine freezes
        self.cores = cpift.core_regions({t: [d[i] for i in engine_index] for t, d in deltas.items()},
                                        cfg.core_ratio)
        self.similarity = cpift.core_similarity(self.cores)
        self.tau = cpift.grouping_threshold(cfg.group_tau, cfg.tau_mode, cfg.core_ratio)
        self.chance = cpift.chance_jaccard(cfg.core_ratio)
        groups = cpift.group_tasks(tasks, self.similarity, self.tau)
        random.Random(cfg.seed).shuffle(groups)  # CPI-FT mainly evaluates random group order
        self.groups = groups
        if fuses:
            self._fuse(ctx, names, params, start, deltas, probes)
            per_task = stage4_steps_per_task(cfg)
            self.stage4 = {"mode": cfg.stage4, "fraction": cfg.stage4_fraction, "steps_per_task": per_task,
                           "steps": per_task * len(tasks)}

    @torch.no_grad()
    def _fuse(self, ctx, names, params, start, deltas, probes) -> None:
        """Write the fused model into ctx.model and evaluate it (Stage 3)."""
        cfg = ctx.config
        tasks = list(probes)
        engine_pos = {n: j for j, n in enumerate(ctx.engine.names)}
        if cfg.fusion_scope == "changed":  # a tensor no probe moved (e.g. no gradient reaches it) stays θ₀
            keep = [i for i in range(len(names)) if any(bool(deltas[t][i].any()) for t in tasks)]
        else:  # "isolatable": the engine's tensors only, norms and embeddings stay θ₀
            keep = [i for i in range(len(names)) if names[i] in engine_pos]
        cores = {t: [self.cores[t][engine_pos[names[i]]] if names[i] in engine_pos
                     else torch.zeros_like(start[i], dtype=torch.bool) for i in keep] for t in tasks}
        fused, report = cpift.fuse_and_count([start[i] for i in keep], {t: [probes[t][i] for i in keep] for t in tasks},
                                             cores, cfg.slerp_weight, names=[names[i] for i in keep])
        for i, f in zip(keep, fused):
            params[i].copy_(f)
        outside = [names[i] for i in keep if names[i] not in engine_pos]
        self.fusion = {"scope": cfg.fusion_scope, "tensors_outside_cores": len(outside),
                       "not_fused": len(names) - len(keep), **report}
        self.fused_scores = ctx.evaluate()

    def stages(self, ctx):
        cfg = ctx.config
        if cfg.protocol != "mix":
            return super().stages(ctx)
        return self.groups if cfg.stage4 == "groups" else [list(cfg.tasks)]

    def steps_per_task(self, ctx, k):
        cfg = ctx.config
        return stage4_steps_per_task(cfg) if cfg.protocol == "mix" else cfg.steps_per_task

    def stage_start(self, ctx, k, tasks):
        cfg = ctx.config
        if cfg.protocol == "mix":  # "mixed": one stage after every task's probe, so every core is an earlier one
            frozen = [t for g in self.groups[:k] for t in g] if cfg.stage4 == "groups" else list(cfg.tasks)
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
        """Return CPI-FT's record fields ({} before the pipeline ran): groups, similarity, the threshold used,
        and in the mix the fusion report, the fused model's scores and Stage 4's length."""
        if not self.groups:
            return {}
        sizes = {t: int(sum(int(m.sum()) for m in c)) for t, c in self.cores.items()}
        return {"cpift": {"groups": self.groups, "similarity": self.similarity, "tau": self.tau,
                          "chance_jaccard": self.chance, "core_sizes": sizes, "fusion": self.fusion,
                          "fused_scores": self.fused_scores, "stage4": self.stage4}}

    def state_dict(self):
        return {"cores": self.cores, "groups": self.groups, "similarity": self.similarity, "tau": self.tau,
                "chance_jaccard": self.chance, "fusion": self.fusion, "fused_scores": self.fused_scores,
                "stage4": self.stage4}

    def load_state_dict(self, state):
        self.cores, self.groups, self.similarity = state["cores"], state["groups"], state["similarity"]
        # checkpoints made before these fields existed lack them
        self.tau, self.fusion, self.fused_scores = state.get("tau"), state.get("fusion"), state.get("fused_scores")
        self.stage4, self.chance = state.get("stage4"), state.get("chance_jaccard")


def stage4_steps_per_task(config) -> int:
    """Return Stage 4's optimizer steps per task in the mix: `stage4_fraction` × `steps_per_task`, at least 1
    (so Stage 4 as a whole is that fraction of the mix's budget of len(tasks) × steps_per_task)."""
    return max(1, round(config.stage4_fraction * config.steps_per_task))

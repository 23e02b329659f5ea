"""Methods: each a thin configuration of the one engine plus a data schedule, over the one loop.

A method answers four questions for the runner: how the protocol's tasks are staged (`stages`), which
engine config it runs (`engine_config`, None = no isolation), what it does at stage boundaries
(`prepare`, `stage_start`, `stage_end`) and which loop plugins it adds (`plugins`). The runner and the
loop never ask which method they run. Adding a method touches this file only.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Dict, List, Optional

import torch

from .engine.config import EPIConfig
from .engine.core import isolatable
from .engine.importance import ImportanceTracker
from .training.loop import Plugin

if TYPE_CHECKING:  # pragma: no cover
    from .runner import Run

MIX_ONLY = ("sequential", "multi_stage", "multi_stage_heuristic")


class Method:
    name = "method"

    def stages(self, run: "Run") -> List[List[str]]:
        """Return the training stages (lists of task names) for the run's protocol."""
        cfg = run.config
        if cfg.protocol == "forgetting":
            return [list(cfg.train_tasks)]
        if cfg.protocol == "sequential":
            return [[t] for t in cfg.tasks]
        return [list(cfg.tasks)]

    def engine_config(self, run: "Run") -> Optional[EPIConfig]:
        return None

    def prepare(self, run: "Run") -> None: ...

    def stage_start(self, run: "Run", k: int, tasks: List[str]) -> None: ...

    def stage_end(self, run: "Run", k: int, tasks: List[str]) -> None: ...

    def plugins(self, run: "Run") -> List[Plugin]:
        return []

    def replay_tasks(self, run: "Run", k: int) -> List[str]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class FullSFT(Method):
    """Standard SFT. Mix protocol: one stage over the multi-task mix (every batch one task, balanced).
    Paper: "Full SFT (Multi-task)" baseline of CPI-FT Table 1 and EPI."""
    name = "full_sft"


class Sequential(Method):
    """Tasks one after another (mix protocol: in the order given). The classic forgetting baseline."""
    name = "sequential"

    def stages(self, run):
        return [[t] for t in run.config.tasks]


class MultiStage(Method):
    """Multi-stage SFT with random K=3 staging (CPI-FT's "Multi-Stage (Random, K=3)"): the tasks are
    shuffled with the seed and cut into K contiguous groups trained one after another."""
    name = "multi_stage"

    def stages(self, run):
        tasks = list(run.config.tasks)
        random.Random(run.config.seed).shuffle(tasks)
        return [g for g in (tasks[i::run.config.stages_k] for i in range(run.config.stages_k)) if g]


class MultiStageHeuristic(Method):
    """Multi-stage SFT with a heuristic order. The papers do not say which heuristic; the suite orders
    the tasks by the base model's validation loss, hardest first (so the easiest, least fragile tasks
    are trained last), cut into K contiguous groups."""
    name = "multi_stage_heuristic"

    def stages(self, run):
        losses = run.base_eval
        tasks = sorted(run.config.tasks, key=lambda t: -losses[t]["loss"])
        k = run.config.stages_k
        size = -(-len(tasks) // k)
        return [tasks[i:i + size] for i in range(0, len(tasks), size)]


class Static(Method):
    """Static isolation = the CPI-FT pipeline (Wang, Liang, Peng 2025; see epi/cpift.py).

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

    def engine_config(self, run):
        return run.epi_config(refresh_every=None)

    def prepare(self, run):
        from . import cpift
        cfg = run.config
        probe_tasks = list(cfg.tasks)
        if not self.cores:
            deltas, probes = run.probe(probe_tasks, cfg.probe_steps)
            self.cores = cpift.core_regions(deltas, cfg.ratio)
            self.similarity = cpift.jaccard_matrix(self.cores)
            groups = cpift.group_tasks(probe_tasks, self.similarity, cfg.group_tau)
            random.Random(cfg.seed).shuffle(groups)  # CPI-FT mainly evaluates random group order
            self.groups = groups
            if cfg.protocol == "mix":
                run.load_isolatable(cpift.fuse(run.start_isolatable(), probes, self.cores, cfg.slerp_weight))

    def stages(self, run):
        return self.groups if run.config.protocol == "mix" else super().stages(run)

    def stage_start(self, run, k, tasks):
        cfg = run.config
        if cfg.protocol == "mix":
            frozen = [t for g in self.groups[:k] for t in g]
        elif cfg.protocol == "forgetting":
            frozen = [t for t in cfg.tasks if t not in cfg.train_tasks]
        else:
            frozen = [t for g in run.stage_list[:k] for t in g]
        masks = [torch.zeros_like(p, dtype=torch.bool) for p in run.engine.params]
        for t in frozen:
            for m, c in zip(masks, self.cores[t]):
                m |= c.to(m.device)  # cores restored from a checkpoint come back on the CPU
        run.engine.set_masks(masks)

    def state_dict(self):
        return {"cores": self.cores, "groups": self.groups, "similarity": self.similarity}

    def load_state_dict(self, state):
        self.cores, self.groups, self.similarity = state["cores"], state["groups"], state["similarity"]


class EPI(Method):
    """Evolving parameter isolation, global scope: one EMA of the score over the mixed stream, layer-
    normalised, global top-p, refreshed every T steps (protect new, release outdated) — the paper's
    mechanism as the secondary sources describe it. The EMA is seeded from the base model's tracking."""
    name = "epi"
    scope = "global"

    def engine_config(self, run):
        return run.epi_config(scope=self.scope)

    def prepare(self, run):
        if run.config.score == "fisher":  # the base phase tracked g²; another score starts from zero
            run.engine.seed_importance(run.base_importance(self.scope))


class EPIPerTask(EPI):
    """EPI with one EMA per task: a batch of task t is isolated by the union of the other tasks' top-p
    sets, so a task never blocks itself (the suite's alternative reading; the paper's choice is unknown)."""
    name = "epi_per_task"
    scope = "per_task"


class RandomMask(Method):
    """Control: a fixed random mask of the same realised size as the method it controls for
    (`random_match`, default epi_per_task, whose per-task unions protect more than p). Without it,
    "EPI helps" cannot be told apart from "freezing anything helps"."""
    name = "random"

    def engine_config(self, run):
        return run.epi_config(refresh_every=None, seed=run.config.seed)

    def prepare(self, run):
        run.engine.random_masks(run.random_ratio())


class EWCPlugin(Plugin):
    """Online EWC: the penalty λ·Σ Ω (θ − θ*)² enters as its gradient 2λ·Ω·(θ − θ*), added with foreach
    ops after backward (no autograd graph over all weights). Ω is a Fisher estimate normalised to mean 1
    so λ is comparable across models."""

    def __init__(self, params: List[torch.Tensor], lam: float):
        self.params, self.lam = params, lam
        self.omega: Optional[List[torch.Tensor]] = None
        self.anchor: Optional[List[torch.Tensor]] = None

    @torch.no_grad()
    def consolidate(self, fisher: List[torch.Tensor], decay: float = 1.0) -> None:
        fisher = [f.to(p.device) for f, p in zip(fisher, self.params)]  # the base's Fisher is loaded on the CPU
        mean = sum(float(f.sum()) for f in fisher) / max(1, sum(f.numel() for f in fisher))
        new = [f.float() / mean if mean > 0 else torch.zeros_like(f, dtype=torch.float32) for f in fisher]
        self.omega = new if self.omega is None else [decay * o + n for o, n in zip(self.omega, new)]
        self.anchor = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_backward(self, model, task, step):
        if self.omega is None:
            return
        pairs = [(p, o, a) for p, o, a in zip(self.params, self.omega, self.anchor) if p.grad is not None]
        if pairs:
            diff = torch._foreach_sub([p.detach() for p, _, _ in pairs], [a for _, _, a in pairs])
            torch._foreach_addcmul_([p.grad for p, _, _ in pairs], [o for _, o, _ in pairs], diff,
                                    value=2 * self.lam)


class EWC(Method):
    """Online EWC (Kirkpatrick et al. 2017; Schwarz et al. 2018), a classic continual-learning baseline.
    Anchor and Fisher start from the base model (its tracked EMA of g²); after each stage the stage's
    Fisher (EMA of g² over the stage) is added and the anchor moves to the stage's end weights."""
    name = "ewc"

    def __init__(self):
        self.plugin: Optional[EWCPlugin] = None
        self.tracker: Optional[ImportanceTracker] = None
        self._restored: Optional[dict] = None

    def prepare(self, run):
        named = isolatable(run.model, EPIConfig())
        params = [p for _, p in named]
        self.plugin = EWCPlugin(params, run.config.ewc_lambda)
        self.tracker = ImportanceTracker(params, EPIConfig(score="fisher", beta=run.config.beta))
        if self._restored is not None:  # resuming: Ω, anchor and the stage's Fisher from the checkpoint
            self.plugin.omega, self.plugin.anchor = (
                None if self._restored[k] is None else [t.to(p.device) for t, p in zip(self._restored[k], params)]
                for k in ("omega", "anchor"))
            self.tracker.load_state_dict(self._restored["tracker"])
        else:
            base = run.base_importance("global").get("global")
            if base is not None:  # no tracked base importance (e.g. a hub model): the first stage sets Ω
                self.plugin.consolidate([base[n] for n, _ in named])

    def plugins(self, run):
        tracker = self.tracker

        class Track(Plugin):
            def after_backward(self, model, task, step):
                tracker.update(None)  # task-loss gradient, before the penalty is added
        return [Track(), self.plugin]

    def stage_end(self, run, k, tasks):
        if "global" in self.tracker.buffers:
            self.plugin.consolidate(self.tracker.buffers["global"])
            self.tracker.buffers.clear()

    def state_dict(self):
        return {"omega": self.plugin.omega, "anchor": self.plugin.anchor, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state):
        self._restored = state


class Replay(Method):
    """Experience replay (TRACE's past_task_ratio): a `replay_fraction` of each stage's batches come from
    tasks seen earlier — earlier stages, and in the forgetting protocol the base abilities not trained.
    In the one-stage mix there is nothing earlier, so it equals full_sft (shown, not hidden)."""
    name = "replay"

    def replay_tasks(self, run, k):
        cfg = run.config
        earlier = [t for g in run.stage_list[:k] for t in g]
        if cfg.protocol == "forgetting":
            earlier += [t for t in cfg.tasks if t not in cfg.train_tasks]
        return earlier


METHODS: Dict[str, type] = {m.name: m for m in (FullSFT, Sequential, MultiStage, MultiStageHeuristic, Static,
                                                  EPI, EPIPerTask, RandomMask, EWC, Replay)}


def make_method(name: str, protocol: str) -> Method:
    """Return a fresh method object; mix-only stagings are refused for the other protocols."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    if name in MIX_ONLY and protocol != "mix":
        raise ValueError(f"method {name!r} defines a staging of the mix; it does not apply to protocol {protocol!r}")
    return METHODS[name]()

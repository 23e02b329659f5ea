"""Online EWC: a quadratic penalty toward earlier weights, weighted by their Fisher importance."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..engine.config import EPIConfig
from ..engine.core import isolatable
from ..engine.importance import ImportanceTracker
from ..training.loop import Plugin, TrackImportance
from .base import Method


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

    def prepare(self, ctx):
        named = isolatable(ctx.model, EPIConfig())
        params = [p for _, p in named]
        self.plugin = EWCPlugin(params, ctx.config.ewc_lambda)
        self.tracker = ImportanceTracker(params, EPIConfig(score="fisher", beta=ctx.config.beta))
        if self._restored is not None:  # resuming: Ω, anchor and the stage's Fisher from the checkpoint
            self.plugin.omega, self.plugin.anchor = (
                None if self._restored[k] is None else [t.to(p.device) for t, p in zip(self._restored[k], params)]
                for k in ("omega", "anchor"))
            self.tracker.load_state_dict(self._restored["tracker"])
        else:
            base = ctx.base_importance("global").get("global")
            if base is not None:  # no tracked base importance (e.g. a hub model): the first stage sets Ω
                self.plugin.consolidate([base[n] for n, _ in named])

    def plugins(self, ctx):
        # tracking first: the stage's Fisher sees the task-loss gradient, before the penalty is added
        return [TrackImportance(self.tracker), self.plugin]

    def stage_end(self, ctx, k, tasks):
        if "global" in self.tracker.buffers:
            self.plugin.consolidate(self.tracker.buffers["global"])
            self.tracker.buffers.clear()

    def state_dict(self):
        return {"omega": self.plugin.omega, "anchor": self.plugin.anchor, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state):
        self._restored = state

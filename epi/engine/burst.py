"""The release burst: the size of a coordinate's first Adam step after a release, against a normal step.

A coordinate protected for k steps comes back with moments that protection changed: in "grad" mode m was
reset to 0, in "restore" mode (mask_grads=True) m and v decayed on zero gradients; only "literal" keeps them
running. With a constant gradient g its first free step is then m̂/√v̂ with m ≈ (1 − β₁)g and v ≈ (1 − β₂)g² +
β₂ᵏ·v_before: a *damped* step while v still remembers g (short protections), up to (1 − β₁)/√(1 − β₂) of a
normal step once v has decayed (0.71 at β₂ = 0.98, the suite's loop; 3.2 at β₂ = 0.999, torch's and the HF
Trainer's default, reached only after thousands of protected steps).

  release_step_ratio  that ratio for a constant gradient, exact (Adam's bias corrections included)
  ReleaseBurstMeter   measures it in a run: each released coordinate's first step against its own last step
                      before protection, and against the coordinates that stayed free

EPIConfig(release_moments="floor_v") tempers it: v is raised to what a new coordinate with the current gradient
holds, so the first step is at most |m̂|/|g| of a sign step and never larger than with "keep".
release_moments="fresh" makes it Adam's first step on a new coordinate (ratio 1 for a constant gradient), which
is *larger* than "keep" after short protections.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import torch

from .importance import local

if TYPE_CHECKING:  # pragma: no cover
    from .core import EvolvingIsolation

BURST_MODES = ("grad", "restore", "literal")
RELEASES = ("keep", "floor_v", "fresh")


def release_step_ratio(beta1: float, beta2: float, protected_steps: int, steps_before: int,
                       mode: str = "restore", release: str = "keep") -> float:
    """Return |first Adam step after a release| / |a normal Adam step| for a constant gradient.

    The coordinate takes `steps_before` free steps, is protected for `protected_steps` steps and is released on
    step t = steps_before + protected_steps + 1, all with the same gradient g (ε neglected). Every free step of a
    constant gradient has size lr (m̂ = g, v̂ = g²), so this is the first step's size in units of lr.
    mode: what protection did to the moments — "grad" (m reset to 0, v decays), "restore" (mask_grads=True: m
    and v decay), "literal" (both keep running: ratio 1). release: EPIConfig.release_moments — "keep", "floor_v"
    (v̂ raised to g²: the ratio is m̂/g), "fresh" (m̂ = g, v̂ = g²: ratio 1).
    """
    if mode not in BURST_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, BURST_MODES))}, got {mode!r}")
    if release not in RELEASES:
        raise ValueError(f"release must be one of {', '.join(map(repr, RELEASES))}, got {release!r}")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1!r}, {beta2!r}")
    if protected_steps < 1 or steps_before < 0:
        raise ValueError(f"protected_steps must be >= 1 and steps_before >= 0, got {protected_steps!r}, "
                         f"{steps_before!r}")
    s, k = int(steps_before), int(protected_steps)
    t = s + k + 1
    if release == "fresh":
        return 1.0
    # moments in units of g and g² after s free steps, then after k protected ones
    m, v = 1 - beta1 ** s, 1 - beta2 ** s
    if mode == "literal":
        m, v = 1 - beta1 ** (s + k), 1 - beta2 ** (s + k)
    else:
        m = 0.0 if mode == "grad" else m * beta1 ** k
        v = v * beta2 ** k
    if release == "floor_v":  # a new coordinate's v after t − 1 steps of g
        v = max(v, 1 - beta2 ** (t - 1))
    m, v = beta1 * m + (1 - beta1), beta2 * v + (1 - beta2)
    return (m / (1 - beta1 ** t)) / (v / (1 - beta2 ** t)) ** 0.5


class ReleaseBurstMeter:
    """Measure the first step of every released coordinate in a run of an attached engine.

    `meter = ReleaseBurstMeter(engine)` after `engine.attach(optimizer)`; train as usual; `meter.result()`.
    Its optimizer hooks run after the engine's: at each counted step they note the mask in force and the
    isolatable weights, and after the step each coordinate's |Δθ|. A coordinate is *released* on a step when
    it was protected at the previous counted step and is free now (per-task scope: a switch of task releases
    too). Its first step is compared with
      - its own last step before that protection (`ratio`; coordinates never stepped before are left out), and
      - the mean step, on the same optimizer step, of the coordinates free on both steps (`ratio_to_free`).
    It keeps one float32 and one int32 per isolatable coordinate and clones the weights every step: a tool for
    small models (notebook 03), not for production runs.
    """

    def __init__(self, engine: "EvolvingIsolation"):
        if engine.isolator is None:
            raise ValueError("ReleaseBurstMeter needs an attached engine: call engine.attach(optimizer) first")
        if engine.isolator.mode == "monitor":
            raise ValueError("ReleaseBurstMeter needs an isolating engine (EPIConfig(isolate=True)): a monitoring "
                             "engine protects nothing, so nothing is ever released")
        self.engine = engine
        self.events: List[dict] = []
        self._last = [torch.zeros_like(local(p), dtype=torch.float32) for p in engine.params]
        self._since = [torch.zeros_like(local(p), dtype=torch.int32) for p in engine.params]
        self._prev: Optional[List[torch.Tensor]] = None  # bool masks in force at the last counted step
        self._now: Optional[List[torch.Tensor]] = None
        self._before: Optional[List[torch.Tensor]] = None
        self._step = -1
        opt = engine.isolator.optimizer
        self._handles = [opt.register_step_pre_hook(self._pre), opt.register_step_post_hook(self._post)]

    def detach(self) -> None:
        """Remove the meter's optimizer hooks (the engine keeps isolating)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def _pre(self, optimizer, args, kwargs) -> None:
        eng = self.engine
        active = eng.active()  # the engine's own pre-hook has observed this step already
        if active is None:
            self._now = [torch.zeros_like(local(p), dtype=torch.bool) for p in eng.params]
        else:
            self._now = active.protected if active.protected is not None else eng._bools(active.index)
        self._before = [local(p).detach().clone() for p in eng.params]
        self._step = eng.step

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        eng = self.engine
        if self._before is None or eng.step == self._step:  # a skipped step (nonfinite="skip") is not counted
            self._before = None
            return
        delta = [(local(p).detach().float() - b.float()).abs() for p, b in zip(eng.params, self._before)]
        self._before = None
        prev, now = self._prev, self._now
        if prev is not None:
            self._record(prev, now, delta)
        for d, n, last, since, p0 in zip(delta, now, self._last, self._since, prev or [None] * len(now)):
            free = ~n
            last[free] = d[free]  # each free coordinate's latest step
            started = n if p0 is None else n & ~p0
            since[started] = self._step  # protection began on this step
        self._prev = now

    def _record(self, prev: List[torch.Tensor], now: List[torch.Tensor], delta: List[torch.Tensor]) -> None:
        n = stepped = 0
        first = first_paired = last = free_sum = free_n = held = 0.0
        for d, p0, n1, l0, since in zip(delta, prev, now, self._last, self._since):
            released = p0 & ~n1
            free = ~p0 & ~n1
            free_sum += float(d[free].sum())
            free_n += int(free.sum())
            count = int(released.sum())
            if not count:
                continue
            n += count
            first += float(d[released].sum())
            held += float((self._step - since[released]).sum())
            paired = released & (l0 > 0)
            stepped += int(paired.sum())
            first_paired += float(d[paired].sum())
            last += float(l0[paired].sum())
        if not n:
            return
        free_mean = free_sum / free_n if free_n else float("nan")
        self.events.append({
            "step": self._step, "released": n, "protected_steps": held / n,
            "first_step": first / n, "last_free_step": last / stepped if stepped else float("nan"),
            "free_step": free_mean,
            "ratio": first_paired / last if last > 0 else float("nan"),
            "ratio_to_free": (first / n) / free_mean if free_mean > 0 else float("nan"),
            "_sums": (first_paired, last, first, n * free_mean, stepped),
        })

    def result(self) -> dict:
        """Return the burst pooled over every release so far, and the events without their raw sums.

        ratio: Σ first step / Σ own last free step over the released coordinates that had stepped before;
        ratio_to_free: Σ first step / Σ (mean step of the coordinates free on both steps), per release event;
        protected_steps: the mean number of steps the released coordinates had been protected.
        """
        sums = [e["_sums"] for e in self.events]
        paired_first, last = sum(s[0] for s in sums), sum(s[1] for s in sums)
        first, free = sum(s[2] for s in sums), sum(s[3] for s in sums)
        released = sum(e["released"] for e in self.events)
        held = sum(e["protected_steps"] * e["released"] for e in self.events)
        return {
            "releases": len(self.events), "released": released,
            "paired": sum(s[4] for s in sums),
            "protected_steps": held / released if released else float("nan"),
            "ratio": paired_first / last if last > 0 else float("nan"),
            "ratio_to_free": first / free if free > 0 else float("nan"),
            "events": [{k: v for k, v in e.items() if k != "_sums"} for e in self.events],
        }

"""Isolator: exact isolation around optimizer.step() — protected coordinates move exactly 0.0.

Zeroing a gradient does not freeze a weight under AdamW: the old momentum and the decoupled weight decay
still move it. Two exact recipes (docs/EXACTNESS.md):

* "grad" mode (torch Adam/AdamW): gradients of protected coordinates are zero, `exp_avg` is zeroed when a
  coordinate becomes protected (then m stays 0, so the Adam update is exactly 0). What is left is weight
  decay. AdamW decays inside its own (fused) step, every coordinate alike; the isolator then writes the
  protected values back (below), so free coordinates get exactly torch's AdamW step and protected ones
  move 0.0. Adam's coupled L2 would enter the moments through the gradient, so for Adam the isolator takes
  the decay over and adds it to free coordinates only (the group's weight_decay is set to 0 and the
  original kept under "epi_weight_decay", so optimizer.state_dict() round-trips).
* "restore" mode (any optimizer): protected values are written back after step().
  The moments see what observe() left: zeros with mask_grads=True (restore's default), so m and v decay;
  the true gradient with mask_grads=False.
* "literal" = restore with mask_grads=False: the moments keep running on the true gradient and only the final
  update, weight decay included, is masked — the literal reading of the paper's write-up. The isolator runs
  it as "restore" (its `mode`); the config keeps the name.

Grad mode with AdamW and no weight decay on the isolated tensors writes nothing back: m = 0 and a zero
gradient make Adam's update exactly 0 there. Writing back is cheap because protected values do not change while the mask holds: they are gathered once
when the mask in force changes (or when something outside the optimizer wrote the tensor, seen by its version
counter) and scattered by index after every step — about 3 ns per protected coordinate on this CPU, where a
masked pass over every coordinate costs more below p ≈ 0.5 (`python -m epi bench`). The held values cost
4 bytes per protected coordinate (fp32 weights), counted in EvolvingIsolation.memory_bytes().

release_moments (Adam/AdamW) changes the moments of a coordinate on its first step after a release:
"floor_v" raises v to what a new coordinate with this gradient would hold (v̂ ≥ g², m kept), which can only
shrink that step; "fresh" sets m and v as a new coordinate's (m̂ = g, v̂ = g²: a step of lr·g/(|g| + ε)).
docs/EXACTNESS.md, "The release burst".
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import torch

from .importance import local, put_flat, zero_coordinates

if TYPE_CHECKING:  # pragma: no cover
    from .core import EvolvingIsolation

_ADAM = (torch.optim.Adam, torch.optim.AdamW)


def resolve_mode(mode: str, optimizer: torch.optim.Optimizer, scope: str, mask_format: str,
                 isolate: bool = True) -> str:
    """Return the concrete isolation mode ("grad", "restore", or "monitor" when not isolating)."""
    if not isolate:
        return "monitor"
    if mode == "grad" and not isinstance(optimizer, _ADAM):
        raise ValueError(f"mode='grad' is exact only for torch.optim.Adam/AdamW, got {type(optimizer).__name__}; "
                         "use mode='restore' (exact for any optimizer)")
    if mode == "literal":  # restore's mechanism; observe() leaves the gradients unmasked (mask_grads=False)
        return "restore"
    if mode != "auto":
        return mode
    if isinstance(optimizer, _ADAM) and scope == "global" and mask_format == "bool":
        return "grad"
    return "restore"


class Isolator:
    """Registers step pre/post hooks on an optimizer and keeps protected coordinates fixed."""

    def __init__(self, engine: "EvolvingIsolation", optimizer: torch.optim.Optimizer):
        for hook in optimizer._optimizer_step_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, Isolator) and owner.optimizer is optimizer:
                # Two engines would both mask, both apply weight decay and both count the step.
                raise ValueError("this optimizer is already isolated by another EvolvingIsolation: call that engine's "
                                 "detach() first (one engine per optimizer; per-task sets live in one engine with "
                                 "scope='per_task')")
        self.engine = engine
        self.optimizer = optimizer
        cfg = engine.config
        self.mode = resolve_mode(cfg.mode, optimizer, cfg.scope, cfg.mask_format, cfg.isolate)
        if cfg.release_moments != "keep" and cfg.isolate and not isinstance(optimizer, _ADAM):
            raise ValueError(f"release_moments={cfg.release_moments!r} sets Adam's moments, so it needs "
                             f"torch.optim.Adam/AdamW, got {type(optimizer).__name__}; use release_moments='keep'")
        self._released_from: Optional[list] = None  # bool masks protected at the last step (release_moments)
        self.coupled_decay = isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
        self._held: Optional[List[Optional[torch.Tensor]]] = None  # protected values, written back after step()
        self._held_for = None            # the ActiveMask they were gathered for
        self._stamps: List[int] = []     # each tensor's version after the last write-back
        self._restoring = False          # this step writes the held values back
        self._skipped = False  # this step's gradients were dropped (nonfinite="skip"): the step did not happen
        self.stepped = list({id(p): p for g in optimizer.param_groups for p in g["params"]}.values())
        self._applied_version = None  # which active mask the moments were last cleaned for
        ids = {id(p): i for i, p in enumerate(engine.params)}
        self._slot = ids
        if self.mode == "grad" and self.coupled_decay:  # Adam's L2 would reach the moments: take it over
            for group in optimizer.param_groups:
                group.setdefault("epi_weight_decay", group.get("weight_decay", 0.0))
                group["weight_decay"] = 0.0
        # Fused Adam/AdamW tell GradScaler they handle inf checks themselves, so the scaler calls step()
        # even on overflow steps; the engine would then count, score and decay on a skipped step.
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer._step_supports_amp_scaling = False
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]

    def detach(self) -> None:
        """Remove the hooks and give weight decay back to the optimizer."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for group in self.optimizer.param_groups:
            if "epi_weight_decay" in group:
                group["weight_decay"] = group.pop("epi_weight_decay")

    # ---- hooks ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs) -> None:
        eng = self.engine
        if not eng._observed:
            eng.observe(eng.current_task)
        if self.mode == "monitor":  # protects nothing, so it leaves every step (finite or not) to the optimizer
            return
        if not eng._step_finite:
            self._refuse_nonfinite()
            return
        active = eng.active()
        if self.mode == "grad" and not eng.config.check_finite and eng.config.isolate:
            # Unchecked steps may carry NaN into protected gradients after observe() (a clip multiplies every
            # gradient by a NaN norm): zero them again, so their Adam update and decay stay exactly 0.
            eng.mask_gradients()
        if self.mode == "grad":
            if active is not None and self._applied_version != eng._active_version:
                self._clean_moments(active)
                self._applied_version = eng._active_version
            if self.coupled_decay:
                self._weight_decay(active)
        if active is not None and self._moves_protected():
            self._hold(active)
        if eng.config.release_moments != "keep":  # after grad mode's decay: Adam's L2 term is in the gradient
            self._on_release(active)

    def _refuse_nonfinite(self) -> None:
        """Raise (nonfinite="raise") or drop every gradient so that step() changes nothing ("skip")."""
        eng = self.engine
        if eng.config.nonfinite == "raise":
            raise RuntimeError(f"non-finite gradient (NaN or inf) at step {eng.step}: the optimizer step was refused "
                               "before any weight moved. Lower the learning rate or check the loss and data; to skip "
                               "such steps as torch.amp.GradScaler does, set EPIConfig(nonfinite='skip')")
        # A zero gradient would still move weights (momentum, weight decay); torch optimizers skip a parameter
        # whose grad is None entirely: no update, no decay, no moment or step-count change.
        for p in self.stepped:
            p.grad = None
        self._skipped = True

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        eng = self.engine
        if self._skipped:  # like a step GradScaler skipped: not counted, no refresh
            self._skipped = False
            eng._observed = False
            return
        if self._restoring:
            self._write_back()
        eng._after_step()

    # ---- held values ----------------------------------------------------------------------------------
    def _moves_protected(self) -> bool:
        """Return True when step() would move protected coordinates, so their values are written back.

        Restore mode: always. Grad mode with AdamW: a protected coordinate has m = 0 and gradient 0, so Adam's
        update there is exactly 0 (0 / (√v̂ + ε) with ε > 0); only the decoupled weight decay moves it. Without
        decay on the isolated tensors (HF Trainer's default) there is nothing to write back. Coupled Adam: the
        isolator applies the decay itself, to free coordinates only.
        """
        if self.mode == "restore":
            return True
        if self.coupled_decay:
            return False
        return any(group.get("weight_decay", 0.0) != 0.0 or not group.get("eps", 1e-8) > 0
                   for group in self.optimizer.param_groups
                   if any(id(p) in self._slot for p in group["params"]))

    def _hold(self, active) -> None:
        """Gather the protected values to write back after this step: all of them when the mask in force is
        another one than last step's, else only those of tensors written since the last write-back."""
        params = self.engine.params
        if active is not self._held_for:
            self._held, self._held_for, self._stamps = [None] * len(params), active, [-1] * len(params)
        for i, (p, idx) in enumerate(zip(params, active.index)):
            x = local(p)
            if idx.numel() and (self._held[i] is None or x._version != self._stamps[i]):
                self._held[i] = x.reshape(-1).index_select(0, idx)
        self._restoring = True

    def _write_back(self) -> None:
        """Write the held values over whatever step() did to the protected coordinates (exactly 0.0 moved)."""
        for i, (p, idx, vals) in enumerate(zip(self.engine.params, self._held_for.index, self._held)):
            x = local(p)
            if vals is not None:
                put_flat(x, idx, vals)
            self._stamps[i] = x._version
        self._restoring = False

    def held_tensors(self) -> List[torch.Tensor]:
        """Return the held protected values (for memory accounting)."""
        return [v for v in self._held or [] if v is not None]

    # ---- release_moments ------------------------------------------------------------------------------
    def _on_release(self, active) -> None:
        """Set Adam's moments of the coordinates released since the last step: "fresh" — as a new coordinate's
        on its first step (m̂ = g, v̂ = g²); "floor_v" — v raised to at least that (v̂ ≥ g²), m kept."""
        eng = self.engine
        fresh = eng.config.release_moments == "fresh"
        now = None if active is None else (active.protected if active.protected is not None
                                           else eng._bools(active.index))
        before, self._released_from = self._released_from, now  # masks are replaced on change, never edited
        if before is None:
            return
        for group in self.optimizer.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                slot = self._slot.get(id(p))
                state = self.optimizer.state.get(p)
                if slot is None or p.grad is None or not state or "exp_avg" not in state:
                    continue  # no state yet: the first step is a fresh one anyway
                released = before[slot] if now is None else before[slot] & ~now[slot]
                if not bool(released.any()):
                    continue
                g = local(p.grad)
                if self.coupled_decay and self.mode == "restore" and group["weight_decay"]:
                    g = g + local(p) * group["weight_decay"]  # Adam adds its L2 term to the gradient inside step()
                if group.get("maximize", False):
                    g = -g
                t = float(state["step"]) + 1  # the step count Adam's bias correction will use in this step
                # with m = (1−β₁ᵗ⁻¹)g before it, this step leaves m = β₁·m + (1−β₁)g = (1−β₁ᵗ)g: m̂ = g (v alike)
                v = g[released].square() * (1 - b2 ** (t - 1))
                exp_avg_sq = local(state["exp_avg_sq"])
                if fresh:
                    local(state["exp_avg"])[released] = g[released] * (1 - b1 ** (t - 1))
                else:  # floor_v: only ever raises v, so the step can only shrink
                    v = torch.maximum(exp_avg_sq[released], v)
                exp_avg_sq[released] = v
                if "max_exp_avg_sq" in state:  # amsgrad: the running max restarts at (fresh) or above (floor) v
                    old = local(state["max_exp_avg_sq"])
                    old[released] = v if fresh else torch.maximum(old[released], v)

    # ---- grad-mode pieces ----------------------------------------------------------------------------
    def _clean_moments(self, active) -> None:
        """Zero exp_avg on protected coordinates so their Adam update is exactly 0 (idempotent)."""
        for p, idx in zip(self.engine.params, active.index):
            state = self.optimizer.state.get(p)
            if state and "exp_avg" in state:
                zero_coordinates([local(state["exp_avg"])], [idx])

    def _weight_decay(self, active) -> None:
        """Apply the groups' weight decay ourselves, to free coordinates only."""
        for group in self.optimizer.param_groups:
            wd = float(group.get("epi_weight_decay", 0.0))
            if wd == 0.0:
                continue
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue  # torch skips parameters without a gradient entirely
                slot = self._slot.get(id(p))
                # ~protected is a transient, one tensor at a time: the engine stores only the mask.
                keep = None if active is None or slot is None else ~active.protected[slot]
                x = local(p)
                if self.coupled_decay:  # Adam: L2 added to the gradient
                    local(p.grad).add_(x * keep if keep is not None else x, alpha=wd)
                elif keep is None:
                    x.mul_(1.0 - lr * wd)
                else:
                    x.addcmul_(x, keep, value=-lr * wd)

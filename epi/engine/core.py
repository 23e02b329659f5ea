"""EvolvingIsolation: importance tracker → mask scheduler → isolator, behind one small object.

State machine (inspectable as `iso.state`):
  "tracking"  — warm-up: the EMA is updated, nothing is protected;
  "isolating" — a mask is active and refreshed every `refresh_every` steps (protect / release);
  "static"    — refresh_every=None: the first mask stays; the EMA is no longer updated.
"""
from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .backends import check_supported
from .config import EPIConfig
from .importance import ImportanceTracker, all_finite, local, zero_coordinates
from .isolation import Isolator
from .masks import index_overlap, mask_overlap, masks_digest, random_masks, spearman, top_p_masks

log = logging.getLogger(__name__)

# the `task` argument that means "the task of the step in progress" (None already means "no task": the global
# scope key, or per_task's mean over the known tasks), so it is a string no task name can be
CURRENT_TASK = "__current__"

# How to treat a bad step, not what was learned: these may change when a saved state is loaded.
_POLICY_FIELDS = ("check_finite", "nonfinite")

_BLOCK = re.compile(r"(^|\.)(layers|h|blocks|block|decoder\.layers|encoder\.layers)\.\d+\.")
_NORM = re.compile(r"norm|ln_|layernorm", re.IGNORECASE)
_EMBED = re.compile(r"embed|wte|wpe", re.IGNORECASE)
_HEAD = re.compile(r"lm_head|output_projection|(^|\.)head\.", re.IGNORECASE)


def isolatable(model: torch.nn.Module, config: EPIConfig) -> List[Tuple[str, torch.nn.Parameter]]:
    """Return the (name, parameter) pairs the engine may protect, in model order.

    Default ("blocks"): the 2-D weights inside transformer blocks. Embeddings, the LM head and norms are
    opt-in (include_embeddings / include_head / include_norms); targets="all" takes every trainable tensor.
    Tied weights appear once.
    """
    out, seen = [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if config.targets == "all":
            out.append((name, p))
        elif _EMBED.search(name):
            if config.include_embeddings:
                out.append((name, p))
        elif _HEAD.search(name):
            if config.include_head:
                out.append((name, p))
        elif _NORM.search(name) or p.dim() < 2:
            if config.include_norms and _NORM.search(name):
                out.append((name, p))
        elif _BLOCK.search(name) and p.dim() == 2:
            out.append((name, p))
    if not out:
        raise ValueError("no isolatable tensors found: check EPIConfig.targets / include_* for this model")
    return out


@dataclass
class ActiveMask:
    """The mask in force for the current batch, as bool masks and/or int32 flat indices (protected)."""
    protected: Optional[List[torch.Tensor]]
    index: Optional[List[torch.Tensor]]
    count: int


def to_index(mask: torch.Tensor) -> torch.Tensor:
    """Return the int32 flat indices of a bool mask's True coordinates."""
    return mask.reshape(-1).nonzero().reshape(-1).to(torch.int32)


def to_bool(entry: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return a bool mask shaped like `like` from a bool mask or int32 indices."""
    if entry.dtype == torch.bool:
        return entry
    out = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    out[entry.long()] = True
    return out.view(like.shape)


class EvolvingIsolation:
    """Evolving parameter isolation for a model: track importance, refresh masks, isolate exactly.

    Usage: `iso = EvolvingIsolation(model, EPIConfig(...)); iso.attach(optimizer)`; each step, after the
    last backward, `iso.observe(task)` (folds gradients into the importance and masks them, so clipping
    sees masked gradients); then `optimizer.step()`. If observe() is not called, the optimizer pre-step
    hook calls it (masking then happens after any clipping).
    """

    def __init__(self, model: torch.nn.Module, config: Optional[EPIConfig] = None, *, group=None):
        check_supported(model)  # FSDP1 / DeepSpeed: refused with what to use instead
        self.config = config or EPIConfig()
        self.model = model
        self.group = group
        named = isolatable(model, self.config)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.numels = [p.numel() for p in self.params]  # global sizes (DTensor reports the full shape)
        self.tracker = ImportanceTracker(self.params, self.config)
        self.step = 0
        self.current_task: Optional[str] = None
        self.sets: Dict[str, List[torch.Tensor]] = {}  # scope key -> protected top-p set (bool)
        self.history: List[dict] = []
        self.isolator: Optional[Isolator] = None
        self._first: Dict[str, List[torch.Tensor]] = {}  # first mask per key, as int32 indices
        self._sample_prev: Dict[str, torch.Tensor] = {}
        self._active_cache: Dict[Optional[str], ActiveMask] = {}
        self._active_version = 0
        self._observed = False  # observe() ran since the last optimizer step
        self._step_finite = True  # this step's gradients were all finite (or check_finite=False)
        self._seen: Optional[Tuple[Optional[str], list, bool]] = None  # (task, gradient stamps, finite) it saw
        self._forced = False  # masks set from outside (static from scores, random control)
        self._sample = self._make_sample()

    # ---- public API ----------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        if not self.sets:
            return "tracking"
        return "static" if self.config.static or self._forced else "isolating"

    def attach(self, optimizer: torch.optim.Optimizer) -> "EvolvingIsolation":
        """Return self after hooking `optimizer`: from then on its step() leaves protected coordinates unchanged.

        One engine isolates one optimizer (give it every parameter, in param groups if they need different
        settings). Attaching the same optimizer again is a no-op; another one is refused, because moving
        the hooks would silently let the first optimizer move protected coordinates: call detach() first.
        """
        if self.isolator is not None:
            if self.isolator.optimizer is optimizer:
                return self
            held = type(self.isolator.optimizer).__name__
            raise ValueError(f"this EvolvingIsolation is already attached to a {held}; "
                             f"attaching a {type(optimizer).__name__} as well would unhook the first (its protected "
                             "coordinates would then move). One engine isolates one optimizer: put every parameter "
                             "in one optimizer (param groups), or call detach() first to move the engine")
        self.isolator = Isolator(self, optimizer)
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (protected coordinates are no longer held) and restore weight decay."""
        if self.isolator is not None:
            self.isolator.detach()
            self.isolator = None

    @torch.no_grad()
    def observe(self, task: Optional[str] = None) -> None:
        """Fold this step's gradients into the importance of `task` and zero protected gradients.

        Call once per optimizer step, after the last micro-batch's backward and before clipping. Each gradient
        is folded once: calling again on the same gradients does nothing (another task for them is an error);
        new gradient tensors after a skipped optimizer step (GradScaler overflow, zero_grad(set_to_none=True))
        start a new step; gradients changed in place since the last observe() with no optimizer step in
        between (observe() per micro-batch under gradient accumulation) are an error.
        """
        if task is not None:
            task = str(task)
        if self._observed and self._seen is not None and self._same_gradients(task):
            return
        if task != self.current_task:
            self.current_task = task
        # Checked once per step over every gradient the optimizer will apply (the clip would spread a NaN to
        # all of them); the optimizer pre-step hook refuses or skips a non-finite step (config.nonfinite).
        self._step_finite = not self.config.check_finite or all_finite(
            [local(p.grad) if p.grad is not None else None for p in self._stepped_params()], self.group)
        masking = self.config.isolate and (self.config.mask_grads or (self.isolator is not None
                                                                      and self.isolator.mode == "grad"))
        active = self.active() if masking else None
        zeroed = False
        # A static mask no longer needs the EMA: skip that work once the mask is fixed.
        if self.state == "tracking" or (self.state == "isolating" and self.step % self.config.score_every == 0):
            # folded first (importance sees the true gradient), then zeroed in the same walk over the gradients
            zeroed = self.tracker.update(task, finite=self._step_finite,
                                         zero=None if active is None else active.index) and active is not None
        elif not self._step_finite:
            self.tracker.skipped_steps += 1
        if active is not None and not zeroed:
            self.mask_gradients()
        self._observed = True
        self._seen = (task, [(None, 0) if p.grad is None else (weakref.ref(p.grad), local(p.grad)._version)
                             for p in self.params], self._step_finite)

    def _stepped_params(self) -> List[torch.nn.Parameter]:
        """Return the parameters the attached optimizer steps (unattached: the model's trainable ones)."""
        if self.isolator is not None:
            return self.isolator.stepped
        return [p for p in self.model.parameters() if p.requires_grad]

    def _same_gradients(self, task: Optional[str]) -> bool:
        """Return True when observe() meets the gradients it already folded this step, False for new ones;
        raise when they changed in place (a second fold would count them twice)."""
        seen_task, stamps, finite = self._seen
        changed = new = 0
        for p, (ref, version) in zip(self.params, stamps):
            if p.grad is None:
                new += ref is not None
            elif ref is not None and ref() is p.grad:
                changed += local(p.grad)._version != version
            else:
                new += 1
        if not changed and not new:
            if task != seen_task:
                raise ValueError(f"observe({task!r}) after observe({seen_task!r}) on the same gradients: one optimizer "
                                 "step has one task")
            return True
        if not changed or not finite or self.isolator is None:
            return False  # new gradients: the last step was skipped (an overflow, or the loop's own choice)
        raise RuntimeError("observe() was called again in the same optimizer step after the gradients changed in "
                           "place (another backward, clipping or an edit): call observe() once per optimizer step, "
                           "after the last micro-batch's backward; a loop that skips optimizer.step() should clear "
                           "the gradients with zero_grad(set_to_none=True) before the next backward")

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of coordinates protected for the current task (idempotent)."""
        active = self.active()
        if active is None:
            return
        zero_coordinates([local(p.grad) if p.grad is not None else None for p in self.params], active.index)

    def active(self, task: Optional[str] = CURRENT_TASK) -> Optional[ActiveMask]:
        """Return the mask in force for a batch of `task` (default: the current task), or None."""
        if not self.sets:
            return None
        task = self.current_task if task == CURRENT_TASK else task
        key = None if self.config.scope == "global" else task
        if key not in self._active_cache:
            self._active_cache[key] = self._make_active(key)
            self._active_version += 1
        return self._active_cache[key]

    def protected_for(self, task: Optional[str]) -> List[torch.Tensor]:
        """Return bool masks protected for a batch of `task`: the union of the other tasks' sets.

        A task's set comes from its own EMA, which moves only on that task's batches. In a sequential run
        (A, then B) A's EMA is frozen during B, so every refresh rebuilds the same A set and B's batches are
        isolated by a static mask, however often the engine refreshes.
        """
        if not self.sets:
            return [torch.zeros_like(local(p), dtype=torch.bool) for p in self.params]
        if "global" in self.sets:
            return self._bools(self.sets["global"])
        others = [self._bools(m) for k, m in self.sets.items() if k != task]
        if not others:
            return [torch.zeros_like(local(p), dtype=torch.bool) for p in self.params]
        out = [m.clone() for m in others[0]]
        for masks in others[1:]:
            for o, m in zip(out, masks):
                o.logical_or_(m)
        return out

    def _bools(self, entries: List[torch.Tensor]) -> List[torch.Tensor]:
        return [to_bool(e, local(p)) for e, p in zip(entries, self.params)]

    def _make_active(self, key: Optional[str]) -> ActiveMask:
        if self.config.mask_format == "index":
            if key is None or "global" in self.sets:
                index = self.sets["global"]
            else:
                index = [to_index(m) for m in self.protected_for(key)]
            return ActiveMask(None, index, sum(int(i.numel()) for i in index))
        protected = self.protected_for(key)  # shares the stored masks in global scope (no copy)
        index = [to_index(m) for m in protected]  # every mode masks gradients and writes values back by index
        return ActiveMask(protected, index, sum(int(i.numel()) for i in index))

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """{param name: bool tensor of coordinates protected for the current task}."""
        if not self.sets:
            return {n: torch.zeros_like(local(p), dtype=torch.bool) for n, p in zip(self.names, self.params)}
        return dict(zip(self.names, self.protected_for(self.current_task)))

    def protected_fraction(self, task: Optional[str] = CURRENT_TASK) -> float:
        """Return the realised fraction of isolatable coordinates protected (for `task`; per_task with
        task=None: the mean over the known tasks)."""
        if not self.sets:
            return 0.0
        total = sum(self.numels)
        if self.config.scope == "per_task" and task is None:
            tasks = list(self.sets)
            return self._global_count(sum(self.active(t).count for t in tasks)) / (total * len(tasks))
        return self._global_count(self.active(task).count) / total

    def _global_count(self, count: int) -> int:
        """Return a count summed over the shard group's ranks (FSDP2), or the count itself."""
        if self.group is None:
            return count
        from .masks import _counts
        return _counts([count], self.group)[0]

    @torch.no_grad()
    def set_masks(self, masks, key: str = "global") -> None:
        """Fix the protected set from outside (static isolation from given scores, random control).

        masks: {name: bool tensor} or a list aligned with the isolatable tensors. Stops refreshing.
        """
        self.set_sets({key: masks})

    @torch.no_grad()
    def set_sets(self, sets: Dict[str, object]) -> None:
        """Fix the protected sets of several scope keys at once (per-task scope: {task: masks}).

        Each value is what set_masks takes. The sets given replace every set in force and stop refreshing; an
        empty dict protects nothing until the next call (the engine no longer refreshes from its importance).
        """
        installed = {}
        for key, masks in sets.items():
            if isinstance(masks, dict):
                missing = [n for n in self.names if n not in masks]
                if missing:
                    raise ValueError(f"set_masks: missing masks for {missing[:3]}{'...' if len(missing) > 3 else ''}")
                masks = [masks[n] for n in self.names]
            installed[key] = [m.to(dtype=torch.bool, device=local(p).device).reshape(local(p).shape)
                              for m, p in zip(masks, self.params)]
        self._install(installed)
        self._forced = True

    def set_scores(self, scores, key: str = "global") -> None:
        """Protect the top-p of externally computed scores (e.g. |θ_task − θ₀|) with this config."""
        if isinstance(scores, dict):
            scores = [scores[n] for n in self.names]
        scores = [local(s) for s in scores]
        masks = top_p_masks(scores, self.config.ratio, normalize=self.config.normalize,
                            quota=self.config.quota, numels=self.numels, group=self.group)
        self.set_masks(masks, key)
        self._report_realised(key, self._global_count(sum(int(m.sum()) for m in masks)) / sum(self.numels), scores)

    def random_masks(self, ratio: float, key: str = "global") -> None:
        """Protect a uniformly random `ratio` of the isolatable coordinates (the matched-size control)."""
        g = torch.Generator().manual_seed(self.config.seed)
        self.set_masks(random_masks([local(p).shape for p in self.params], ratio, g), key)

    def seed_importance(self, buffers: Dict[str, Sequence[torch.Tensor]]) -> None:
        """Start from importance tracked elsewhere (e.g. during the base model's pre-training)."""
        for key, bufs in buffers.items():
            if isinstance(bufs, dict):
                bufs = [bufs[n] for n in self.names]
            self.tracker._buffers(key)
            for dst, src in zip(self.tracker.buffers[key], bufs):
                dst.copy_(src)
            self.tracker.updates[key] = max(1, self.tracker.updates[key])  # holds information: refresh it

    def memory_bytes(self) -> Dict[str, int]:
        """Return the engine's persistent bytes: importance, masks (stored sets, the active mask's index and the
        protected values held for the write-back) and
        diagnostics (first mask, Spearman sample), counting shared storage once."""
        seen = set()

        def size(tensors) -> int:
            total = 0
            for t in tensors:
                if t is not None and t.data_ptr() not in seen and t.numel():
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
            return total
        imp = size(b for bufs in self.tracker.buffers.values() for b in bufs)
        imp += size(self.tracker.theta0 or [])
        masks = size(m for v in self.sets.values() for m in v)
        for a in self._active_cache.values():
            masks += size(a.protected or []) + size(a.index or [])
        if self.isolator is not None:  # the protected values held for the write-back after each step
            masks += size(self.isolator.held_tensors())
        diag = size(m for v in self._first.values() for m in v) + size(self._sample)
        return {"importance": imp, "masks": masks, "diagnostics": diag, "params": sum(self.numels)}

    def mask_digest(self) -> str:
        """Return a sha256 digest of the current protected sets (identical masks → identical digests)."""
        return masks_digest({key: self._bools(entries) for key, entries in self.sets.items()})

    # ---- refresh -------------------------------------------------------------------------------------
    def _after_step(self) -> None:
        self.step += 1
        self._observed = False
        if self._forced:
            return
        due_first = not self.sets and self.step >= self.config.warmup_steps
        due_next = (self.sets and not self.config.static
                    and (self.step - self.config.warmup_steps) % self.config.refresh_every == 0)
        if due_first or due_next:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute every scope key's top-p set from its importance; log drift statistics."""
        cfg = self.config
        new = {}
        for key, imp in self.tracker.buffers.items():
            if self.tracker.updates.get(key, 0) == 0:
                continue
            new[key] = top_p_masks(imp, cfg.ratio, normalize=cfg.normalize, quota=cfg.quota,
                                   numels=self.numels, group=self.group,
                                   previous=self._bools(self.sets[key]) if key in self.sets else None,
                                   hysteresis=cfg.hysteresis)
        if not new:
            return
        for key, masks in new.items():
            self.history.append(self._drift(key, masks))
            self._report_realised(key, self.history[-1]["protected_fraction"], self.tracker.buffers[key])
        self._install({**self.sets, **new})

    def _report_realised(self, key: str, fraction: float, importance: Sequence[torch.Tensor]) -> None:
        """Warn when the realised protected fraction is far from the asked ratio (zeros or ties)."""
        cfg = self.config
        total = sum(self.numels)
        if fraction < 0.95 * cfg.ratio:
            nonzero = self._global_count(sum(int(torch.count_nonzero(t)) for t in importance))
            hint = (": score='delta' is |θ−θ₀|, zero until the weights first move, so raise warmup_steps"
                    if cfg.score == "delta" else "")
            log.warning("step %d, %r set: protected %.4g of the isolatable coordinates, asked %s: only %d of %d "
                        "have non-zero importance, and a coordinate with zero importance is never protected%s",
                        self.step, key, fraction, cfg.ratio, nonzero, total, hint)
        elif fraction > 1.05 * (cfg.ratio + cfg.hysteresis) + 1 / total:
            bf16 = " (bfloat16 importance ties more often)" if cfg.importance_dtype == "bfloat16" else ""
            log.warning("step %d, %r set: protected %.4g of the isolatable coordinates, asked %s: importance values "
                        "tie at the threshold and every tied coordinate is protected%s", self.step, key, fraction,
                        cfg.ratio, bf16)

    def _install(self, sets: Dict[str, List[torch.Tensor]]) -> None:
        if self.config.mask_format == "index":
            sets = {k: [to_index(m) if m.dtype == torch.bool else m for m in v] for k, v in sets.items()}
        self.sets = sets
        self._active_cache.clear()
        self._active_version += 1
        if self.config.track_first:
            for key, masks in sets.items():
                self._first.setdefault(key, [to_index(m) if m.dtype == torch.bool else m.clone() for m in masks])

    def _drift(self, key: str, masks: List[torch.Tensor]) -> dict:
        prev = self._bools(self.sets[key]) if key in self.sets else None
        stats = mask_overlap(prev, masks, self.group) if prev is not None else {"jaccard": None, "churn": None,
                                                                     "released_fraction": None}
        first = self._first.get(key)
        entry = {
            "step": self.step, "scope_key": key,
            "protected_fraction": self._global_count(sum(int(m.sum()) for m in masks)) / sum(self.numels),
            "jaccard_prev": stats["jaccard"], "churn": stats["churn"],
            "released_fraction": stats["released_fraction"],
            "jaccard_first": (index_overlap(first, masks, self.group) if first is not None
                              else 1.0 if self.config.track_first else None),  # the first mask itself
            "per_layer": {n: self._global_count(int(m.sum())) / numel
                          for n, m, numel in zip(self.names, masks, self.numels)},
        }
        sample = self._sample_values(key)
        prev_sample = self._sample_prev.get(key)
        entry["spearman_prev"] = spearman(prev_sample, sample) if prev_sample is not None and len(sample) > 1 else None
        self._sample_prev[key] = sample
        return entry

    def _make_sample(self) -> List[torch.Tensor]:
        g = torch.Generator().manual_seed(self.config.seed)
        total = sum(local(p).numel() for p in self.params)
        n = min(self.config.spearman_sample, total)
        flat = torch.randperm(total, generator=g)[:n].sort().values
        out, start = [], 0
        for p in self.params:
            size = local(p).numel()
            sel = flat[(flat >= start) & (flat < start + size)] - start
            out.append(sel.to(local(p).device))
            start += size
        return out

    def _sample_values(self, key: str) -> torch.Tensor:
        imp = self.tracker.buffers[key]
        scale = [1.0] * len(imp)
        if self.config.normalize != "none":
            from .masks import layer_scales
            scale = layer_scales(imp, self.config.normalize, self.numels, self.group)
        return torch.cat([b.reshape(-1)[i].float().cpu() / s for b, i, s in zip(imp, self._sample, scale)])

    # ---- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically (config, step, importance, masks, history)."""
        return {
            "config": self.config.to_dict(), "names": list(self.names), "step": self.step,
            "current_task": self.current_task, "tracker": self.tracker.state_dict(),
            "sets": {k: [m.clone() for m in v] for k, v in self.sets.items()},
            "first": {k: [m.clone() for m in v] for k, v in self._first.items()},
            "sample_prev": {k: v.clone() for k, v in self._sample_prev.items()},
            "history": [dict(h) for h in self.history], "forced": self._forced,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict() saved by an engine over the same tensors with the same config.

        Raises ValueError naming what differs: missing entries, tensor names, shapes (by tensor name) or
        config fields. The engine keeps its own config; only the policy for bad steps (check_finite,
        nonfinite) may differ, so a run stopped by a non-finite step can resume with nonfinite="skip".
        """
        self._check_state(state)
        self.step = int(state["step"])
        self.current_task = state["current_task"]
        self.tracker.load_state_dict(state["tracker"])
        # on the parameters' device: a resume on a GPU must not index GPU masks with CPU indices
        self._first = {k: [m.to(p.device, copy=True) for m, p in zip(v, self.params)] for k, v in state["first"].items()}
        self._sample_prev = {k: v.clone() for k, v in state["sample_prev"].items()}
        self.history = [dict(h) for h in state["history"]]
        self._forced = bool(state["forced"])
        devs = [local(p).device for p in self.params]
        self.sets = {k: [m.to(d) for m, d in zip(v, devs)] for k, v in state["sets"].items()}
        self._active_cache.clear()
        self._active_version += 1

    def _check_state(self, state: dict) -> None:
        missing = [k for k in ("config", "names", "step", "current_task", "tracker", "sets", "first", "sample_prev",
                               "history", "forced") if k not in state]
        if missing:
            raise ValueError(f"load_state_dict: not an EvolvingIsolation state_dict (missing {missing})")
        if list(state["names"]) != self.names:
            extra = sorted(set(state["names"]) - set(self.names))[:3]
            absent = sorted(set(self.names) - set(state["names"]))[:3]
            raise ValueError(f"load_state_dict: the state's isolatable tensors differ from this model's (only in the "
                             f"state: {extra}, only here: {absent}, or another order): it comes from another model or "
                             "another targets/include_* setting")
        saved = {f.name: f.default for f in fields(EPIConfig)}
        unknown = sorted(set(state["config"]) - set(saved))
        if unknown:
            raise ValueError(f"load_state_dict: the state's config has field(s) {unknown} this version does not know")
        saved.update(state["config"])
        differ = [f"{f.name}={saved[f.name]!r} in the state, {getattr(self.config, f.name)!r} here"
                  for f in fields(EPIConfig) if f.name not in _POLICY_FIELDS
                  and saved[f.name] != getattr(self.config, f.name)]
        if differ:
            raise ValueError(f"load_state_dict: the state was saved with another EPIConfig ({'; '.join(differ)}): "
                             "build this engine with EPIConfig.from_dict(state['config']) to resume that run")
        shapes = []  # (name, shape in the state, shape here)
        for bufs in list(state["tracker"]["buffers"].values()) + [state["tracker"].get("theta0") or []]:
            shapes += [(n, tuple(b.shape), tuple(local(p).shape)) for n, b, p in zip(self.names, bufs, self.params)]
        for sets in (state["sets"], state["first"]):
            for masks in sets.values():
                for n, m, p in zip(self.names, masks, self.params):
                    here = tuple(local(p).shape)
                    if m.dtype == torch.bool:
                        shapes.append((n, tuple(m.shape), here))
                    elif m.numel() and int(m.max()) >= local(p).numel():  # int32 indices must fit the tensor
                        shapes.append((n, f"indices up to {int(m.max())}", here))
        bad = list(dict.fromkeys((n, a, b) for n, a, b in shapes if a != b))
        if bad:
            listed = ", ".join(f"{n} {a} in the state vs {b} here" for n, a, b in bad[:3])
            raise ValueError(f"load_state_dict: the state comes from a model with other tensor shapes: {listed}"
                             f"{f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''}")

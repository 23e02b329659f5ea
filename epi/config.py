"""EPIConfig: every knob of the isolation engine, validated at construction time.

The papers leave most of these open (docs/BACKGROUND.md, EPI): the score, β, the ratio p, the refresh interval T,
the warm-up, the per-layer normaliser and global vs per-task masks. They are all options here so that
notebooks and ablations can measure them instead of guessing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

SCORES = ("fisher", "taylor", "grad", "delta")
SCOPES = ("global", "per_task")
NORMALIZERS = ("none", "layer_mean", "layer_max")
QUOTAS = ("global", "per_tensor")
MODES = ("auto", "grad", "restore")
IMPORTANCE_DTYPES = ("float32", "bfloat16")
MASK_FORMATS = ("bool", "index")
TARGETS = ("blocks", "all")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass
class EPIConfig:
    """Configuration of the isolation engine (tracker → scheduler → isolator).

    score: importance signal folded into the EMA each step — "fisher" g², "taylor" |g·θ|, "grad" |g|,
        "delta" |θ−θ₀| (CPI-FT's update magnitude). The EPI write-ups say EMA of g² (fisher).
    beta: EMA decay, I ← β·I + (1−β)·score.
    ratio: isolation ratio p — fraction of isolatable coordinates in a top-p set.
    refresh_every: mask refresh interval T in optimizer steps; None = static (mask fixed at warm-up end).
    warmup_steps: steps of tracking before the first mask (no isolation before it).
    normalize: per-tensor normaliser applied before the global ranking ("layer" = one parameter tensor).
    scope: "global" — one EMA over the mixed stream; "per_task" — one EMA per task, and a batch of task t
        is isolated by the union of the *other* tasks' top-p sets, so a task never blocks itself.
    quota: "global" — one threshold across all tensors (the paper); "per_tensor" — top-p inside each tensor.
    hysteresis: h ≥ 0; a protected coordinate is released only when it leaves the top-(p+h) set.
    mode: "grad" — zero gradients, zero exp_avg on newly protected coordinates and apply decoupled
        weight decay to free coordinates only (torch Adam/AdamW); "restore" — stash protected values
        before step() and write them back after (any optimizer); "auto" — grad for torch Adam/AdamW in
        global scope, restore otherwise (per-task masks switch with the task). Closest to the paper's
        write-up: restore with mask_grads=False (moments run on the true gradient; docs/EXACTNESS.md).
    mask_grads: zero protected gradients in observe() (so clipping and the moments see masked gradients).
    importance_dtype / mask_format: "float32" + "bool" (default) or "bfloat16" + "index" (lean memory).
    targets: which tensors are isolatable — "blocks" = 2-D weights inside transformer blocks, "all" =
        every trainable tensor; include_embeddings / include_head / include_norms opt in more.
    score_every: fold gradients into the EMA every n optimizer steps (amortises the cost).
    spearman_sample: size of the fixed random sample of coordinates used for rank-correlation drift.
    track_first: keep the first mask (as indices) to report Jaccard to the first mask at every refresh.
    check_finite: skip (and count) steps whose gradients hold NaN/inf when folding importance.
    isolate: False = monitor only — track importance, refresh masks and log drift, protect nothing
        (how notebook 01 measures drift under plain SFT with the same code path).
    seed: seed of the Spearman sample and of random masks.
    """

    score: str = "fisher"
    beta: float = 0.99
    ratio: float = 0.05
    refresh_every: Optional[int] = 50
    warmup_steps: int = 20
    normalize: str = "layer_mean"
    scope: str = "global"
    quota: str = "global"
    hysteresis: float = 0.0
    mode: str = "auto"
    mask_grads: bool = True
    importance_dtype: str = "float32"
    mask_format: str = "bool"
    targets: str = "blocks"
    include_embeddings: bool = False
    include_head: bool = False
    include_norms: bool = False
    score_every: int = 1
    spearman_sample: int = 4096
    track_first: bool = True
    check_finite: bool = True
    isolate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("score", self.score, SCORES)
        _choice("scope", self.scope, SCOPES)
        _choice("normalize", self.normalize, NORMALIZERS)
        _choice("quota", self.quota, QUOTAS)
        _choice("mode", self.mode, MODES)
        _choice("importance_dtype", self.importance_dtype, IMPORTANCE_DTYPES)
        _choice("mask_format", self.mask_format, MASK_FORMATS)
        _choice("targets", self.targets, TARGETS)
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio!r}")
        if not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
        if self.refresh_every is not None and (not isinstance(self.refresh_every, int) or self.refresh_every <= 0):
            raise ValueError(f"refresh_every must be a positive int or None (static), got {self.refresh_every!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.score_every, int) or self.score_every < 1:
            raise ValueError(f"score_every must be an int >= 1, got {self.score_every!r}")
        if not isinstance(self.hysteresis, (int, float)) or self.hysteresis < 0 or self.ratio + self.hysteresis >= 1:
            raise ValueError(f"hysteresis must be >= 0 with ratio + hysteresis < 1, got {self.hysteresis!r}")
        if not isinstance(self.spearman_sample, int) or self.spearman_sample < 0:
            raise ValueError(f"spearman_sample must be an int >= 0, got {self.spearman_sample!r}")
        if self.mask_format == "index" and self.mode == "grad":
            raise ValueError("mode must be 'restore' or 'auto' when mask_format='index' (index masks isolate by restore)")

    @property
    def static(self) -> bool:
        """True when the mask is computed once (refresh_every=None)."""
        return self.refresh_every is None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EPIConfig":
        """Build a config from a dict, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown EPIConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

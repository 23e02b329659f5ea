"""EPIConfig: every knob of the isolation engine, validated at construction time.

The papers leave most of these open (docs/BACKGROUND.md, EPI): the score, β, the ratio p, the refresh interval T,
the warm-up, the per-layer normaliser and global vs per-task masks. They are all options here so that
notebooks and ablations can measure them instead of guessing.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import numpy as np

SCORES = ("fisher", "taylor", "grad", "delta")
SCOPES = ("global", "per_task")
NORMALIZERS = ("none", "layer_mean", "layer_max")
QUOTAS = ("global", "per_tensor")
MODES = ("auto", "grad", "restore", "literal")
# what Adam's moments hold on the first step after a release: as protection left them, or a fresh coordinate's
RELEASE_MOMENTS = ("keep", "floor_v", "fresh")
IMPORTANCE_DTYPES = ("float32", "bfloat16")
MASK_FORMATS = ("bool", "index")
NONFINITE = ("raise", "skip")
TARGETS = ("blocks", "all")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _flag(name: str, value: Any) -> bool:
    """Return value as a bool; only True/False (or a numpy bool) — "no" or 0 would read as a silent truth value."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def _int(name: str, value: Any, low: int, high: Optional[int] = None, extra: str = "") -> int:
    """Return value as an int in [low, high); bools and floats (even 2.0) are refused."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not ok or value < low or (high is not None and value >= high):
        span = f">= {low}" if high is None else f"in [{low}, {'2**63' if high == 2 ** 63 else high})"
        raise ValueError(f"{name} must be an int {span}{extra}, got {value!r}")
    return int(value)


def _real(name: str, value: Any, what: str, ok) -> float:
    """Return value as a finite float accepted by `ok`; bools, strings, NaN and inf are refused."""
    real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not real or not math.isfinite(float(value)) or not ok(float(value)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


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
        is isolated by the union of the *other* tasks' top-p sets, so a task never blocks itself. A task's EMA
        moves only on its own batches: in a sequential run (A, then B) A's EMA is frozen during B, so every
        refresh during B rebuilds the same A set and B trains under a *static* mask (no live variant exists
        without A's gradients; docs/EXACTNESS.md).
    quota: "global" — one threshold across all tensors (the paper); "per_tensor" — top-p inside each tensor.
    hysteresis: h ≥ 0; a protected coordinate is released only when it leaves the top-(p+h) set.
    mode: how protected coordinates stay exactly unchanged, and what Adam's moments of a protected coordinate see
        (docs/EXACTNESS.md has the table). All four are exact (a protected weight moves 0.0):
        "grad" (torch Adam/AdamW) — gradients zeroed; exp_avg set to 0 on protected coordinates whenever the
            mask changes (a moment *reset*: m = 0, then stays 0) and decoupled weight decay applied to free
            coordinates only; v decays on the zero gradient;
        "restore" (any optimizer) — protected values stashed before step() and written back after; with
            mask_grads=True (its default) the moments are fed the zeroed gradient, so m and v *decay*
            (nothing is reset) and the clip norm covers free coordinates only;
        "literal" — restore with the true gradient (mask_grads=False): the moments *keep running* and only
            the final update, weight decay included, is masked — the EPI write-up read literally; the clip norm
            covers every coordinate;
        "auto" (default) — grad for torch Adam/AdamW in global scope with bool masks, restore otherwise
            (per-task masks switch with the task). Neither default is the literal reading.
    mask_grads: zero protected gradients in observe() (so clipping and the moments see masked gradients).
        None (default) = the mode's own: True, except False for "literal" (which refuses True). mode="restore"
        with mask_grads=False runs exactly what "literal" runs.
    release_moments: Adam's moments of a coordinate on its first step after a release (torch Adam/AdamW);
        released = protected in the previous optimizer step, free in this one (per-task scope: also at a switch
        of task). "keep" (default): as protection left them. m ≈ 0 (reset or decayed) and v decayed, so the first
        step is damped after short protections and up to (1 − β₁)/√(1 − β₂) times a normal step after long ones
        (3.2× at β₂ = 0.999, after thousands of protected steps; epi.engine.burst measures it).
        "floor_v": v raised to what a new coordinate with this gradient holds (v̂ ≥ g²), m kept — tempers the
        burst and never enlarges a step. "fresh": m and v set as a new coordinate's (m̂ = g, v̂ = g²), a sign-
        sized step lr·g/(|g| + ε) — larger than "keep" after short protections.
    importance_dtype / mask_format: "float32" + "bool" (default) or "bfloat16" + "index" (lean memory).
        bfloat16 importance is stored by seeded stochastic rounding, so its EMA is unbiased at every β (rounded
        to nearest it stopped moving at β = 0.999); each coordinate carries rounding noise that grows with β
        (rms vs float32 after 3,000 steps of g = 1 and 2,000 of decay: about 1%, 4%, 10% at β = 0.9, 0.99, 0.999).
    targets: which tensors are isolatable — "blocks" = 2-D weights inside transformer blocks, "all" =
        every trainable tensor; include_embeddings / include_head / include_norms opt in more.
    score_every: fold gradients into the EMA every n optimizer steps (amortises the cost).
    spearman_sample: size of the fixed random sample of coordinates used for rank-correlation drift.
    track_first: keep the first mask (as indices) to report Jaccard to the first mask at every refresh.
    check_finite: check every gradient once per step (one host sync); a step holding NaN/inf is never folded
        into the importance (counted in tracker.skipped_steps) and is handled at optimizer.step() by `nonfinite`.
        False: no check — a NaN step reaches the optimizer (protected weights still stay exact in both modes).
    nonfinite: what optimizer.step() does with a non-finite step — "raise" (default): a RuntimeError naming the
        step, before any weight moves; "skip": drop every gradient so the step changes nothing (no update,
        decay or moment change) and is not counted, as torch.amp.GradScaler skips overflow steps.
    isolate: False = monitor only — track importance, refresh masks and log drift, protect nothing
        (how notebook 01 measures drift under plain SFT with the same code path).
    seed: seed of the Spearman sample and of random masks.
    """

    score: str = "fisher"
    beta: float = 0.99
    # the library's starting point for a real model (the papers leave p open; CPI-FT's cores are 1 %); the
    # CPU experiments run p = 0.1 (epi.experiments.profiles.ExperimentConfig.ratio, docs/CPU_FINDINGS.md)
    ratio: float = 0.05
    refresh_every: Optional[int] = 50  # None: static (the first mask stays)
    warmup_steps: int = 20
    normalize: str = "layer_mean"
    scope: str = "global"
    quota: str = "global"
    hysteresis: float = 0.0
    mode: str = "auto"
    mask_grads: Optional[bool] = None  # None: the mode's own (True; False for "literal")
    release_moments: str = "keep"
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
    nonfinite: str = "raise"
    isolate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        # Every field is checked for type, range and finiteness, and normalised to a plain Python value
        # (numpy scalars from a sweep become int/float/bool, so to_dict() stays JSON-friendly).
        for name, allowed in (("score", SCORES), ("scope", SCOPES), ("normalize", NORMALIZERS), ("quota", QUOTAS),
                              ("mode", MODES), ("release_moments", RELEASE_MOMENTS),
                              ("importance_dtype", IMPORTANCE_DTYPES),
                              ("mask_format", MASK_FORMATS), ("targets", TARGETS), ("nonfinite", NONFINITE)):
            _choice(name, getattr(self, name), allowed)
        if self.mask_grads is None:
            self.mask_grads = self.mode != "literal"
        elif self.mode == "literal" and self.mask_grads is True:
            raise ValueError("mode='literal' runs Adam's moments on the true gradient, so mask_grads must be False or "
                             "left unset; for moments fed the masked gradient use mode='restore'")
        for name in ("mask_grads", "include_embeddings", "include_head", "include_norms", "track_first",
                     "check_finite", "isolate"):
            setattr(self, name, _flag(name, getattr(self, name)))
        self.ratio = _real("ratio", self.ratio, "a finite number in (0, 1)", lambda v: 0.0 < v < 1.0)
        self.beta = _real("beta", self.beta, "a finite number in [0, 1)", lambda v: 0.0 <= v < 1.0)
        self.hysteresis = _real("hysteresis", self.hysteresis,
                                f"a finite number >= 0 with ratio + hysteresis < 1 (ratio={self.ratio})",
                                lambda v: v >= 0.0 and self.ratio + v < 1.0)
        if self.refresh_every is not None:
            self.refresh_every = _int("refresh_every", self.refresh_every, 1, extra=" or None (static)")
        self.warmup_steps = _int("warmup_steps", self.warmup_steps, 0)
        self.score_every = _int("score_every", self.score_every, 1)
        self.spearman_sample = _int("spearman_sample", self.spearman_sample, 0)
        self.seed = _int("seed", self.seed, 0, 2 ** 63)
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

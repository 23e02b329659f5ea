"""The CPI-FT pipeline pieces (Wang, Liang, Peng, EMNLP 2025): core regions, grouping, fusion.

  probe fine-tunes → core C_i = global top-p of |θ_i − θ₀| (p = 1% in the paper) → Jaccard S(C_i, C_j)
  → groups = connected components of {S ≥ τ} (τ = 0.1) → core transplant + SLERP of non-core weights
  → brief staged training with earlier groups' cores frozen (the `static` method, epi.methods.static).

What the sources state and what this module chose (docs/BACKGROUND.md, CPI-FT):
- stated: core = global top-p of |Δθ|, no normalisation, p = 1%; Jaccard similarity; connected components at
  S ≥ τ, τ = 0.1; core transplant; SLERP of non-core weights with a linear fallback below a collinearity
  threshold ε (value not given).
- chosen: the chance-relative threshold (`grouping_threshold`, tau_mode="chance": τ as a multiple of the
  Jaccard p/(2−p) of two random sets of share p, so a threshold means the same at any p; the paper's τ = 0.1 at
  p = 1% is 19.9× chance); overlapping cores: the task whose |Δθ| is larger at that coordinate wins the
  transplant; several tasks' non-core weights: θ = SLERP(θ_base, θ̄, ω) where θ̄ is the running spherical mean
  of the probes (θ̄ ← SLERP(θ̄, θ_i, 1/(i+1))), per tensor (angles only make sense on vectors, as in mergekit's
  slerp); the linear fallback applies when |cos| > 1 − eps (angle < arccos(1 − eps) = 0.81° at eps = 1e-4, or
  anti-parallel) or a tensor is zero, and every fallback is counted (`fuse_and_count`): a short probe moves a
  tensor by a tiny angle, so most of its interpolations are linear, which at such angles is SLERP to O(Ω²).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..engine.masks import mask_overlap, top_p_masks

TAU_MODES = ("absolute", "chance")      # group_tau is a Jaccard | a multiple of chance Jaccard p/(2−p)
STAGE4_MODES = ("groups", "mixed")      # Stage 4: one brief stage per group (the paper) | one brief mixed stage
FUSION_SCOPES = ("changed", "isolatable")  # fuse every trainable tensor a probe changed | the isolatable ones only


def chance_jaccard(p: float) -> float:
    """Return p / (2 − p): the expected Jaccard of two independent random sets of share p (p² / (2p − p²))."""
    return p / (2 - p)


def grouping_threshold(tau: float, tau_mode: str, core_ratio: float) -> float:
    """Return the Jaccard threshold grouping uses: `tau` itself (tau_mode "absolute", the paper's τ) or `tau` times
    the chance Jaccard of two random cores of share `core_ratio` (tau_mode "chance": 2.0 = twice chance)."""
    if tau_mode == "absolute":
        return tau
    if tau_mode == "chance":
        return tau * chance_jaccard(core_ratio)
    raise ValueError(f"tau_mode must be one of {', '.join(map(repr, TAU_MODES))}, got {tau_mode!r}")


def core_regions(deltas: Dict[str, List[torch.Tensor]], ratio: float) -> Dict[str, List[torch.Tensor]]:
    """Return each task's core region: the global top-`ratio` of |Δθ| over all tensors (no normalisation)."""
    return {task: top_p_masks([d.abs() for d in ds], ratio, normalize="none") for task, ds in deltas.items()}


def core_similarity(cores: Dict[str, List[torch.Tensor]]) -> List[List[float]]:
    """Return CPI-FT's task similarity S[i][j] = |C_i ∩ C_j| / |C_i ∪ C_j| (the Jaccard index of two tasks'
    core regions), over the tasks in `cores` order."""
    names = list(cores)
    return [[mask_overlap(cores[a], cores[b])["jaccard"] for b in names] for a in names]


def group_tasks(names: Sequence[str], similarity: List[List[float]], tau: float) -> List[List[str]]:
    """Return connected components of the graph {i—j : S[i][j] ≥ τ} (τ = 0: every task joins one group
    only if all similarities are ≥ 0, i.e. always; CPI-FT's "no grouping" is τ > 1)."""
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if similarity[i][j] >= tau:
                parent[find(i)] = find(j)
    groups: Dict[int, List[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(find(i), []).append(name)
    return list(groups.values())


def slerp_with_reason(a: torch.Tensor, b: torch.Tensor, weight: float,
                      eps: float = 1e-4) -> Tuple[torch.Tensor, Optional[str]]:
    """Return (the interpolation of `slerp`, why it fell back to linear: "zero norm", "collinear",
    "anti-parallel", or None when it is spherical)."""
    fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = fa.norm(), fb.norm()
    if na == 0 or nb == 0:
        return torch.lerp(a, b, weight), "zero norm"
    cos = torch.clamp(fa @ fb / (na * nb), -1.0, 1.0)
    if abs(float(cos)) > 1 - eps:  # sin Ω → 0: the spherical formula is ill-conditioned, the chord is exact enough
        return torch.lerp(a, b, weight), ("collinear" if float(cos) > 0 else "anti-parallel")
    omega = torch.arccos(cos)
    s = torch.sin(omega)
    out = (torch.sin((1 - weight) * omega) / s) * fa + (torch.sin(weight * omega) / s) * fb
    return out.reshape(a.shape).to(a.dtype), None


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float, eps: float = 1e-4) -> torch.Tensor:
    """Return the spherical interpolation of two tensors (flattened as vectors) at `weight` ∈ [0, 1];
    linear interpolation when they are nearly collinear (|cos| > 1 − eps) or either is zero."""
    return slerp_with_reason(a, b, weight, eps)[0]


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Return the angle between two tensors as flat vectors, in degrees (0.0 when either is zero)."""
    fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = fa.norm(), fb.norm()
    if na == 0 or nb == 0:
        return 0.0
    return math.degrees(math.acos(float(torch.clamp(fa @ fb / (na * nb), -1.0, 1.0))))


@torch.no_grad()
def fuse_and_count(base: Sequence[torch.Tensor], probes: Dict[str, List[torch.Tensor]],
                   cores: Dict[str, List[torch.Tensor]], weight: float = 0.5, eps: float = 1e-4,
                   names: Optional[Sequence[str]] = None) -> Tuple[List[torch.Tensor], dict]:
    """Return (fused tensors, fusion report): each core coordinate from its task's probe (largest |Δθ| wins
    overlaps), every other coordinate from the SLERP of the base toward the probes' spherical mean.

    The report counts the interpolations and their linear fallbacks: "tensors"; "interpolations" (per tensor,
    T − 1 steps of the probes' mean and one base→mean step); "linear" and "reasons" ({reason: count}) over all of
    them; "tensors_linear", the tensors whose base→mean step fell back, and "fallbacks" ({tensor name: its
    reason}); "angle_deg" ({"max", "median"} angle of base vs probes' mean); "eps" and "fallback_below_deg"
    (the collinearity threshold as an angle). Names default to "0", "1", ..."""
    tasks = list(probes)
    names = [str(i) for i in range(len(base))] if names is None else list(names)
    fused, fallbacks, angles, reasons = [], {}, [], []
    for i, b in enumerate(base):
        mean = probes[tasks[0]][i].clone()
        for n, task in enumerate(tasks[1:], start=1):
            mean, why = slerp_with_reason(mean, probes[task][i], 1.0 / (n + 1), eps)
            reasons.append(why)
        angles.append(angle_deg(b, mean))
        merged, why = slerp_with_reason(b, mean, weight, eps)
        reasons.append(why)
        if why is not None:
            fallbacks[names[i]] = why
        best = torch.zeros_like(b)
        for task in tasks:
            delta = (probes[task][i] - b).abs()
            win = cores[task][i] & (delta > best)
            merged = torch.where(win, probes[task][i], merged)
            best = torch.where(win, delta, best)
        fused.append(merged)
    counts: Dict[str, int] = {}
    for r in reasons:
        if r is not None:
            counts[r] = counts.get(r, 0) + 1
    ordered = sorted(angles)
    report = {"tensors": len(base), "interpolations": len(reasons), "linear": sum(counts.values()),
              "reasons": counts, "tensors_linear": len(fallbacks), "fallbacks": fallbacks,
              "angle_deg": {"max": ordered[-1] if ordered else 0.0,
                            "median": ordered[len(ordered) // 2] if ordered else 0.0},
              "eps": eps, "fallback_below_deg": math.degrees(math.acos(1 - eps))}
    return fused, report


@torch.no_grad()
def fuse(base: Sequence[torch.Tensor], probes: Dict[str, List[torch.Tensor]],
         cores: Dict[str, List[torch.Tensor]], weight: float = 0.5) -> List[torch.Tensor]:
    """Return fused tensors: each core coordinate from its task's probe (largest |Δθ| wins overlaps),
    every other coordinate from the running SLERP of the probes toward the base (`fuse_and_count` without
    its report)."""
    return fuse_and_count(base, probes, cores, weight)[0]

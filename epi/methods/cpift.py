"""The CPI-FT pipeline pieces (Wang, Liang, Peng, EMNLP 2025): core regions, grouping, fusion.

  probe fine-tunes → core C_i = global top-p of |θ_i − θ₀| (p = 1% in the paper) → Jaccard S(C_i, C_j)
  → groups = connected components of {S ≥ τ} (τ = 0.1) → core transplant + SLERP of non-core weights
  → staged training with earlier groups' cores frozen (done by the runner with the isolation engine).

What the sources leave open and what this module chose (docs/BACKGROUND.md, CPI-FT):
- the fusion base θ_base is the run's start checkpoint (the paper's "final fine-tuning stage" is ambiguous);
- overlapping cores: the task whose |Δθ| is larger at that coordinate wins the transplant;
- several tasks' non-core weights: θ = SLERP(θ_base, θ̄, ω) where θ̄ is the running spherical average of
  the probes (θ̄ ← SLERP(θ̄, θ_i, 1/(i+1))), per tensor (angles only make sense on vectors, as mergekit's
  slerp), falling back to linear interpolation when the two tensors are nearly collinear.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..engine.masks import mask_overlap, top_p_masks


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


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float, eps: float = 1e-4) -> torch.Tensor:
    """Return the spherical interpolation of two tensors (flattened as vectors) at `weight` ∈ [0, 1];
    linear interpolation when they are nearly collinear (|cos| > 1 − eps) or either is zero."""
    fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = fa.norm(), fb.norm()
    if na == 0 or nb == 0:
        return torch.lerp(a, b, weight)
    cos = torch.clamp(fa @ fb / (na * nb), -1.0, 1.0)
    if abs(float(cos)) > 1 - eps:
        return torch.lerp(a, b, weight)
    omega = torch.arccos(cos)
    s = torch.sin(omega)
    out = (torch.sin((1 - weight) * omega) / s) * fa + (torch.sin(weight * omega) / s) * fb
    return out.reshape(a.shape).to(a.dtype)


@torch.no_grad()
def fuse(base: Sequence[torch.Tensor], probes: Dict[str, List[torch.Tensor]],
         cores: Dict[str, List[torch.Tensor]], weight: float = 0.5) -> List[torch.Tensor]:
    """Return fused tensors: each core coordinate from its task's probe (largest |Δθ| wins overlaps),
    every other coordinate from the running SLERP of the probes toward the base."""
    tasks = list(probes)
    fused = []
    for i, b in enumerate(base):
        mean = probes[tasks[0]][i].clone()
        for n, task in enumerate(tasks[1:], start=1):
            mean = slerp(mean, probes[task][i], 1.0 / (n + 1))
        merged = slerp(b, mean, weight)
        best = torch.zeros_like(b)
        for task in tasks:
            delta = (probes[task][i] - b).abs()
            win = cores[task][i] & (delta > best)
            merged = torch.where(win, probes[task][i], merged)
            best = torch.where(win, delta, best)
        fused.append(merged)
    return fused

"""Gradient-conflict diagnostics between tasks: cosines, conflict rate, GMS, per-task score (formulas per function).

Gradients are lists of tensors aligned with a model's trainable parameters, one list per task, as returned by
:func:`task_gradients`. Dot products are taken tensor by tensor over the aligned lists, never by concatenating
all parameters into one vector. Re-exported by :mod:`epi.metrics`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = ["trainable_parameter_names", "task_gradients", "conflict_scores", "conflict_score_per_task"]

Batch = Mapping[str, Any]


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Return the names of the parameters with ``requires_grad``, in the order :func:`task_gradients` uses."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _copy_grad(p: torch.nn.Parameter, dtype: torch.dtype | None) -> torch.Tensor:
    if p.grad is None:
        return torch.zeros_like(p, dtype=dtype)
    g = p.grad.detach()
    return g.clone() if dtype is None or dtype == g.dtype else g.to(dtype)


def task_gradients(
    model: torch.nn.Module,
    batches_by_task: Mapping[str, Batch | Sequence[Batch]],
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Return task -> gradient of that task's loss, as a list of tensors aligned with the trainable parameters.

    Each task's value is one batch (a dict) or a list of batches, whose gradients are averaged. The loss is
    ``model(**batch).loss`` (Hugging Face style) or ``loss_fn(model, batch)``. Gradients are computed in eval
    mode (no dropout, so the diagnostic is deterministic); the model's mode and any ``.grad`` it already held
    are restored afterwards, and no autograd graph is kept. Parameters a task does not reach get zeros.
    ``dtype`` (e.g. ``torch.bfloat16``) stores the copies in a smaller type.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    if not batches_by_task:
        raise ValueError("batches_by_task must hold at least one task")
    saved = [p.grad for p in params]
    was_training = model.training
    model.eval()
    grads: dict[str, list[torch.Tensor]] = {}
    try:
        for task, batches in batches_by_task.items():
            batches = [batches] if isinstance(batches, Mapping) else list(batches)
            if not batches:
                raise ValueError(f"batches_by_task[{task!r}] holds no batch")
            for p in params:
                p.grad = None
            device = params[0].device
            for batch in batches:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with torch.enable_grad():
                    loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
                    (loss / len(batches)).backward()
            grads[task] = [_copy_grad(p, dtype) for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        model.train(was_training)
    return grads


def _cosine(dots: np.ndarray) -> np.ndarray:
    """Return dots[a, b] / (‖g_a‖ ‖g_b‖) from a Gram matrix; nan where a gradient is zero."""
    norm = np.sqrt(np.diag(dots))
    denom = np.outer(norm, norm)
    return np.divide(dots, denom, out=np.full_like(dots, np.nan), where=denom > 0)


def conflict_score_per_task(cosine: ArrayLike) -> np.ndarray:
    """Return, for each task a, 100 · mean_{b ≠ a} max(0, −cos_ab): how much the others oppose its gradient.

    Our definition of EPI's per-task "Conflict Score" (the paper's is unknown): 0 when no other task's
    gradient points against task a's, 100 when all point exactly opposite. Needs at least two tasks.
    """
    c = np.asarray(cosine, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or len(c) < 2:
        raise ValueError(f"cosine must be a square task×task matrix with >= 2 tasks, got shape {c.shape}")
    opposed = np.maximum(0.0, -c)
    off_diagonal = ~np.eye(len(c), dtype=bool)
    return 100.0 * np.array([opposed[a, off_diagonal[a]].mean() for a in range(len(c))])


def conflict_scores(
    grads: Mapping[str, Sequence[torch.Tensor]], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Return gradient-conflict statistics between every pair of tasks.

    ``grads`` maps task -> list of gradient tensors aligned across tasks (same length, same shapes);
    ``names`` labels the tensors (default "0", "1", ...; use :func:`trainable_parameter_names`). Keys:

    - ``tasks``: task order of the matrices; ``norm``: ‖g_a‖ per task;
    - ``cosine``: task×task cos_ab = ⟨g_a, g_b⟩ / (‖g_a‖ ‖g_b‖) over all tensors (nan for a zero gradient);
    - ``per_layer``: tensor name -> task×task cosine restricted to that tensor;
    - ``conflict_rate``: fraction of (task pair a<b, tensor) combinations with cos < 0, over defined cosines;
    - ``gms``: gradient magnitude similarity Φ_ab = 2‖g_a‖‖g_b‖ / (‖g_a‖² + ‖g_b‖²), 1 = equal norms;
    - ``conflict_score_per_task``: task -> :func:`conflict_score_per_task` of ``cosine``.
    """
    tasks = list(grads)
    if len(tasks) < 2:
        raise ValueError(f"grads must hold at least 2 tasks to compare, got {tasks}")
    ref = [tuple(g.shape) for g in grads[tasks[0]]]
    if not ref:
        raise ValueError(f"grads[{tasks[0]!r}] is empty")
    for task in tasks[1:]:
        if [tuple(g.shape) for g in grads[task]] != ref:
            raise ValueError(f"grads[{task!r}] is not aligned with grads[{tasks[0]!r}] "
                             "(tensor count or shapes differ)")
    names = [str(i) for i in range(len(ref))] if names is None else list(names)
    if len(names) != len(ref):
        raise ValueError(f"names must have one entry per gradient tensor ({len(ref)}), got {len(names)}")

    T = len(tasks)
    dots = np.zeros((len(ref), T, T))  # dots[l, a, b] = <g_a, g_b> on tensor l
    with torch.no_grad():  # one dot per aligned tensor pair; fp32 accumulation even for bf16 copies
        for a in range(T):
            for b in range(a, T):
                d = torch.stack([torch.dot(x.detach().reshape(-1).float(), y.detach().reshape(-1).float())
                                 for x, y in zip(grads[tasks[a]], grads[tasks[b]])])
                dots[:, a, b] = dots[:, b, a] = d.double().cpu().numpy()

    per_layer = {name: _cosine(dots[l]) for l, name in enumerate(names)}
    upper = np.triu_indices(T, k=1)
    pair_cos = np.stack([per_layer[n][upper] for n in names])
    defined = ~np.isnan(pair_cos)
    total = dots.sum(axis=0)
    cosine = _cosine(total)
    norm = np.sqrt(np.diag(total))
    sq = norm[:, None] ** 2 + norm[None, :] ** 2
    gms = np.divide(2 * np.outer(norm, norm), sq, out=np.full((T, T), np.nan), where=sq > 0)
    return {
        "tasks": tasks, "norm": norm, "cosine": cosine, "per_layer": per_layer,
        "conflict_rate": float((pair_cos[defined] < 0).mean()) if defined.any() else float("nan"),
        "gms": gms,
        "conflict_score_per_task": dict(zip(tasks, conflict_score_per_task(cosine).tolist())),
    }

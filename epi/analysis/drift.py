"""Drift analysis of saved mask snapshots (runs with `snapshots=True`): the paper's key finding.

Snapshots hold, for every refresh, each tensor's top-p set (bit-packed) and the normalised importance on
a fixed random sample of coordinates. From them: the Jaccard matrix of top-p sets across checkpoints
(global and per layer) and the Spearman matrix of importance.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from .metrics import jaccard, spearman


def load_snapshots(run_dir: str | Path, shapes: Dict[str, List[int]], key: str = "global") -> Tuple[
        List[int], Dict[int, Dict[str, np.ndarray]], Dict[int, np.ndarray]]:
    """Return (steps, {step: {tensor: bool mask}}, {step: importance sample}) for one scope key."""
    data = np.load(Path(run_dir) / "snapshots.npz")
    masks: Dict[int, Dict[str, np.ndarray]] = {}
    samples: Dict[int, np.ndarray] = {}
    for name in data.files:
        kind, step, k, *rest = name.split("/")
        if k != key:
            continue
        step = int(step)
        if kind == "mask":
            tensor = "/".join(rest)
            n = int(np.prod(shapes[tensor]))
            masks.setdefault(step, {})[tensor] = np.unpackbits(data[name])[:n].astype(bool)
        else:
            samples[step] = data[name]
    return sorted(masks), masks, samples


def jaccard_matrix(masks: Dict[int, Dict[str, np.ndarray]], steps: List[int], tensors: List[str] | None = None) -> np.ndarray:
    """Return J[a, b] = Jaccard of the top-p sets at steps a and b (over `tensors`, default all)."""
    names = tensors or sorted(masks[steps[0]])
    out = np.ones((len(steps), len(steps)))
    for i, a in enumerate(steps):
        for j in range(i + 1, len(steps)):
            out[i, j] = out[j, i] = jaccard([masks[a][n] for n in names], [masks[steps[j]][n] for n in names])
    return out


def spearman_matrix(samples: Dict[int, np.ndarray], steps: List[int]) -> np.ndarray:
    """Return S[a, b] = Spearman correlation of the importance sample at steps a and b."""
    out = np.ones((len(steps), len(steps)))
    for i, a in enumerate(steps):
        for j in range(i + 1, len(steps)):
            out[i, j] = out[j, i] = spearman(samples[a], samples[steps[j]])
    return out


def per_layer_jaccard(masks: Dict[int, Dict[str, np.ndarray]], a: int, b: int) -> Dict[str, float]:
    """Return the Jaccard of each tensor's top-p set between steps a and b."""
    return {n: jaccard(masks[a][n], masks[b][n]) for n in sorted(masks[a])}


def random_jaccard(ratio: float) -> float:
    """Return the expected Jaccard of two independent random masks of share `ratio` (≈ p / (2 − p))."""
    return ratio / (2 - ratio)

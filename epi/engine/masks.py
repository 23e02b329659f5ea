"""Mask selection: per-tensor normalisation, the exact global top-k threshold, and drift statistics.

The global threshold is found by a two-pass radix select on the float32 bit pattern (importance ≥ 0,
so the int32 view is monotone in the value), one tensor at a time: no concatenated copy, no sort, and
only two small histograms cross ranks under torch.distributed. The result equals `kthvalue` on the
concatenated values. Ties: every coordinate whose value equals a positive threshold is protected, so the
realised count can exceed k when values tie at the boundary (more likely with bfloat16 importance, which
has 128 values per octave; the engine logs the realised fraction and warns when it is far from the ratio).
Zeros: a coordinate with zero importance is never protected, so when fewer than k coordinates have
non-zero importance the realised count is smaller than k (a threshold of 0 used to protect everything).
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

_HI_BINS = 1 << 15  # non-negative float32: bits >> 16 lies in [0, 32767]
_LO_BINS = 1 << 16


def _all_reduce(t: torch.Tensor, group, op=None) -> torch.Tensor:
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).float().contiguous().view(torch.int32)


def radix_threshold(tensors: Sequence[torch.Tensor], k: int, group=None,
                    scales: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Return the k-th largest value (float32 scalar) over all tensors, exactly, without concatenating.

    tensors: non-negative values (any shapes). scales: optional per-tensor divisors applied on the fly
    (the per-layer normalisation), so the caller need not materialise normalised copies.
    group: a torch.distributed process group; histograms are all-reduced, so every rank gets the same
    threshold over the union of the ranks' shards (k counts over that union).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = tensors[0].device if tensors else torch.device("cpu")

    def values(i: int, t: torch.Tensor) -> torch.Tensor:
        v = t.detach().float()
        return v / scales[i] if scales is not None else v

    hist = torch.zeros(_HI_BINS, dtype=torch.int64, device=device)
    for i, t in enumerate(tensors):
        hist += torch.bincount(_bits(values(i, t)) >> 16, minlength=_HI_BINS)
    hist = _all_reduce(hist, group)
    total = int(hist.sum())
    if k > total:
        raise ValueError(f"k={k} exceeds the number of values ({total})")
    # Count from the top: bucket b holds the k-th largest value.
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # above[b] = #values in buckets >= b
    bucket = int((above >= k).nonzero().max())
    k_in_bucket = k - (int(above[bucket + 1]) if bucket + 1 < _HI_BINS else 0)

    low = torch.zeros(_LO_BINS + 1, dtype=torch.int64, device=device)
    for i, t in enumerate(tensors):
        b = _bits(values(i, t))
        low += torch.bincount(torch.where((b >> 16) == bucket, b & 0xFFFF, _LO_BINS), minlength=_LO_BINS + 1)
    low = _all_reduce(low[:_LO_BINS].contiguous(), group)
    above_low = torch.flip(torch.cumsum(torch.flip(low, [0]), 0), [0])
    low_bits = int((above_low >= k_in_bucket).nonzero().max())
    bits = torch.tensor([(bucket << 16) | low_bits], dtype=torch.int32)
    return bits.view(torch.float32)[0].to(device)


def layer_scales(importance: Sequence[torch.Tensor], normalize: str, numels: Sequence[int],
                 group=None) -> Optional[list]:
    """Return per-tensor divisors for "layer_mean" / "layer_max" (None for "none"); zero-safe.

    numels are the *global* element counts (a sharded tensor's local part is smaller), so the mean is
    the mean over the whole parameter once the local sums are all-reduced.
    """
    if normalize == "none":
        return None
    if not importance:
        return []
    if normalize == "layer_mean":
        stats = torch.stack([t.detach().float().sum() for t in importance])
        stats = _all_reduce(stats, group) / torch.tensor(numels, dtype=torch.float32, device=stats.device)
    else:
        stats = torch.stack([t.detach().float().amax() if t.numel() else t.new_zeros((), dtype=torch.float32)
                             for t in importance])
        stats = _all_reduce(stats, group, dist.ReduceOp.MAX if dist.is_available() else None)
    stats = torch.where(stats > 0, stats, torch.ones_like(stats))  # an all-zero tensor ranks last anyway
    return [float(s) for s in stats.cpu()]


def top_p_masks(importance: Sequence[torch.Tensor], ratio: float, *, normalize: str = "layer_mean",
                quota: str = "global", numels: Optional[Sequence[int]] = None, group=None,
                previous: Optional[Sequence[torch.Tensor]] = None, hysteresis: float = 0.0) -> list:
    """Return one bool mask per tensor marking its protected (top-p) coordinates.

    With hysteresis h and a previous mask, a previously protected coordinate stays protected while it is
    in the top-(p+h) set; everything else follows the top-p set. Coordinates with zero importance are never
    protected (they carry no evidence of importance, and a zero threshold would otherwise take them all).
    """
    numels = list(numels) if numels is not None else [t.numel() for t in importance]
    scales = layer_scales(importance, normalize, numels, group)

    def thresholds(r: float) -> list:
        if quota == "per_tensor":
            out = []
            for i, t in enumerate(importance):
                s = None if scales is None else [scales[i]]
                out.append(radix_threshold([t], max(1, int(round(r * numels[i]))), group, s))
            return out
        k = max(1, int(round(r * sum(numels))))
        return [radix_threshold(importance, k, group, scales)] * len(importance)

    def normed(i: int) -> torch.Tensor:
        v = importance[i].detach().float()
        return v / scales[i] if scales is not None else v

    thr = thresholds(ratio)
    keep_thr = thresholds(ratio + hysteresis) if hysteresis > 0 and previous is not None else None
    masks = []
    for i in range(len(importance)):
        v = normed(i)
        m = v >= thr[i]
        if keep_thr is not None:
            m |= previous[i] & (v >= keep_thr[i])
        masks.append(m.logical_and_(v > 0))
    return masks


def random_masks(shapes: Sequence[torch.Size], ratio: float, generator: torch.Generator,
                 device=None) -> list:
    """Return bool masks protecting a uniformly random `ratio` of all coordinates (the random control)."""
    numels = [int(torch.Size(s).numel()) for s in shapes]
    total, k = sum(numels), max(1, int(round(ratio * sum(numels))))
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.randperm(total, generator=generator)[:k]] = True
    out, start = [], 0
    for s, n in zip(shapes, numels):
        out.append(chosen[start:start + n].view(s).to(device))
        start += n
    return out


# ---- drift statistics (counts summed over the list of tensors) -------------------------------------

def _counts(values: Sequence[int], group) -> list:
    """Return integer counts summed over the ranks of `group` (sharded masks count their shards once)."""
    t = _all_reduce(torch.tensor(list(values), dtype=torch.int64), group)
    return [int(v) for v in t]


def overlap_counts(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], group=None) -> Tuple[int, int, int]:
    """Return (|a ∩ b|, |a|, |b|) of two lists of bool masks, summed over the tensors (and the ranks of `group`)."""
    inter, na, nb = _counts([sum(int((x & y).sum()) for x, y in zip(a, b)), sum(int(x.sum()) for x in a),
                             sum(int(y.sum()) for y in b)], group)
    return inter, na, nb


def mask_overlap(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], group=None) -> dict:
    """Return Jaccard, churn and released fraction between masks a (previous) and b (current).

    jaccard = |a∩b| / |a∪b| (1.0 when both are empty); churn = |a△b| / |b| (0.0 when both are empty, inf
    when only b is: everything changed); released = |a∖b| / |a| (0.0 when a is empty: nothing to release).
    The one implementation: epi.analysis.metrics' jaccard, churn and released_fraction call it.
    """
    inter, na, nb = overlap_counts(a, b, group)
    union, changed = na + nb - inter, na + nb - 2 * inter
    return {
        "jaccard": inter / union if union else 1.0,
        "churn": changed / nb if nb else (0.0 if changed == 0 else math.inf),
        "released_fraction": (na - inter) / na if na else 0.0,
    }


def index_overlap(first_idx: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], group=None) -> float:
    """Return the Jaccard index between masks stored as flat indices and bool masks."""
    inter, na, nb = _counts([sum(int(m.reshape(-1)[i.long()].sum()) for i, m in zip(first_idx, masks)),
                             sum(int(i.numel()) for i in first_idx), sum(int(m.sum()) for m in masks)], group)
    union = na + nb - inter
    return inter / union if union else 1.0


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Return Spearman's rank correlation of two 1-D tensors (average ranks for ties); nan if constant.

    The one implementation: epi.analysis.metrics.spearman checks its inputs and calls it."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = torch.argsort(v)
        sorted_v = v[order]
        r = torch.empty_like(v)
        r[order] = torch.arange(1, len(v) + 1, dtype=torch.float64)
        # average ranks over runs of equal values
        uniq, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
        if len(uniq) < len(v):
            sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, r[order])
            r[order] = (sums / counts)[inverse]
        return r
    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def masks_digest(sets: Dict[str, Sequence[torch.Tensor]]) -> str:
    """Return a sha256 digest of protected sets ({scope key: bool masks}): identical masks give identical
    digests (what results records and the distributed runs compare)."""
    h = hashlib.sha256()
    for key in sorted(sets):
        h.update(key.encode())
        for m in sets[key]:
            h.update(m.cpu().numpy().tobytes())
    return h.hexdigest()[:16]

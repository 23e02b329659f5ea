"""The mask, drawn: which coordinates of which tensor are protected at each refresh, and how that set moves.

Between two refreshes every coordinate of a tensor is in one of four classes: free (protected neither before
nor now), **kept** (protected before and now), **newly protected** (now, not before) or **released** (before,
not now). The figures here show those classes for one weight matrix across refreshes (small multiples and a
GIF), the protected share of every block of every isolatable tensor at one refresh, and a tensor × refresh
heatmap of the protected share; per-task scope gets one row of panels per task's set.

Matrices larger than a panel are down-sampled by pooling square blocks of `factor × factor` coordinates:
- class maps: a block takes its most frequent class among kept / newly protected / released (ties go to newly
  protected, then released, then kept: change is what the figure is for); a block is blank only when none of
  its coordinates is protected before or now, so every block holding a protected coordinate stays coloured
  (max pooling of "protected before or now");
- share maps: a block's value is the protected share of its coordinates (mean pooling).

Data: `RefreshRecorder` is a `train_steps` callback that copies the engine's protected sets right after each
refresh (the engine's own masks, nothing recomputed).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

FREE, KEPT, NEW, RELEASED = 0, 1, 2, 3
CLASS_NAMES = {KEPT: "kept", NEW: "newly protected", RELEASED: "released"}
# colour-blind safe (seaborn "colorblind"): blue = stays, orange = enters, pink = leaves; white = free
CLASS_COLOURS = {FREE: "#ffffff", KEPT: "#0173b2", NEW: "#de8f05", RELEASED: "#cc78bc"}
_PRIORITY = (NEW, RELEASED, KEPT)  # tie order when a pooled block holds as many of two classes


def as_mask(mask) -> np.ndarray:
    """Return `mask` (numpy array or torch tensor) as a numpy bool array, 1-D tensors as one row."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.dtype != bool:
        raise ValueError(f"a mask must hold bools (protected or not), got dtype {arr.dtype}")
    if arr.ndim == 1:
        return arr.reshape(1, -1)
    return arr.reshape(arr.shape[0], -1) if arr.ndim > 2 else arr


def transition_codes(previous, current) -> np.ndarray:
    """Return an int8 array of classes (FREE, KEPT, NEW, RELEASED) per coordinate; previous=None: nothing before.

    Raises ValueError when the two masks have different shapes (they must be the same tensor's masks).
    """
    now = as_mask(current)
    before = np.zeros_like(now) if previous is None else as_mask(previous)
    if before.shape != now.shape:
        raise ValueError(f"masks of one tensor must have the same shape: previous {before.shape} vs current "
                         f"{now.shape}; pass the same tensor's mask at every refresh")
    codes = np.full(now.shape, FREE, dtype=np.int8)
    codes[before & now] = KEPT
    codes[~before & now] = NEW
    codes[before & ~now] = RELEASED
    return codes


def transition_counts(codes: np.ndarray) -> Dict[str, int]:
    """Return {"kept", "newly protected", "released"}: how many coordinates of `codes` are in each class."""
    return {name: int((codes == c).sum()) for c, name in CLASS_NAMES.items()}


def block_factor(shape: Sequence[int], max_side: int) -> int:
    """Return the pooling factor f ≥ 1 that brings the longer side of `shape` to at most `max_side` blocks."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    return max(1, math.ceil(max(shape) / max_side))


def _blocks(arr: np.ndarray, factor: int, fill) -> np.ndarray:
    """Return arr padded to multiples of factor and viewed as (rows, cols, factor * factor) blocks."""
    h, w = arr.shape
    H, W = math.ceil(h / factor), math.ceil(w / factor)
    padded = np.full((H * factor, W * factor), fill, dtype=arr.dtype)
    padded[:h, :w] = arr
    return padded.reshape(H, factor, W, factor).transpose(0, 2, 1, 3).reshape(H, W, factor * factor)


def pool_codes(codes: np.ndarray, factor: int) -> np.ndarray:
    """Return the block-pooled class map: each block's most frequent non-free class (FREE when it has none)."""
    if factor == 1:
        return codes.copy()
    blocks = _blocks(codes, factor, FREE)
    counts = np.stack([(blocks == c).sum(-1) for c in _PRIORITY])  # argmax keeps the first of equal counts
    pooled = np.asarray(_PRIORITY, dtype=np.int8)[counts.argmax(0)]
    pooled[counts.sum(0) == 0] = FREE
    return pooled


def pool_share(mask, factor: int) -> np.ndarray:
    """Return the block-pooled protected share: protected / coordinates per block (padding not counted)."""
    arr = as_mask(mask)
    if factor == 1:
        return arr.astype(float)
    hits = _blocks(arr.astype(np.int32), factor, 0).sum(-1)
    cells = _blocks(np.ones(arr.shape, dtype=np.int32), factor, 0).sum(-1)
    return hits / cells


def evolution(masks: Mapping[int, object], max_side: int = 64) -> List[dict]:
    """Return one frame per refresh step of one tensor's masks ({step: mask}), in step order.

    A frame: step, counts (full resolution: kept / newly protected / released vs the previous refresh; the
    first refresh has nothing before it, so its whole set is newly protected), codes (block-pooled class map),
    factor (pooling factor), shape (the tensor's 2-D shape) and protected (coordinates protected now).
    """
    if not masks:
        raise ValueError("no masks to draw: record at least one refresh (RefreshRecorder)")
    frames, previous = [], None
    shape = as_mask(masks[min(masks)]).shape
    factor = block_factor(shape, max_side)
    for step in sorted(masks):
        codes = transition_codes(previous, masks[step])
        frames.append({"step": int(step), "counts": transition_counts(codes), "codes": pool_codes(codes, factor),
                       "factor": factor, "shape": shape, "protected": int(as_mask(masks[step]).sum())})
        previous = masks[step]
    return frames


def _class_cmap():
    from matplotlib.colors import ListedColormap
    return ListedColormap([CLASS_COLOURS[c] for c in (FREE, KEPT, NEW, RELEASED)])


def _legend_handles():
    from matplotlib.patches import Patch
    return [Patch(facecolor=CLASS_COLOURS[c], edgecolor="0.5", label=CLASS_NAMES[c]) for c in (KEPT, NEW, RELEASED)]


def _panel_title(frame: dict) -> str:
    c = frame["counts"]
    return (f"step {frame['step']}\nkept {c['kept']} · new {c['newly protected']}\n"
            f"released {c['released']}")


def _draw_codes(ax, frame: dict) -> None:
    ax.imshow(frame["codes"], cmap=_class_cmap(), vmin=-0.5, vmax=3.5, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_edgecolor("0.6")


def _pooling_note(frame: dict) -> str:
    f = frame["factor"]
    h, w = frame["shape"]
    if f == 1:
        return f"{h}×{w} coordinates, one pixel each"
    return f"{h}×{w} coordinates in blocks of {f}×{f} (block = its most frequent class; any protected block is coloured)"


def _rows(frames_by_row) -> Dict[str, List[dict]]:
    rows = {"": list(frames_by_row)} if isinstance(frames_by_row, (list, tuple)) else dict(frames_by_row)
    if not rows or not all(rows.values()):
        raise ValueError("no frames to draw: pass evolution(...) of at least one refresh per row")
    return rows


def plot_evolution(frames_by_row, tensor: str = "", max_panels: int = 8):
    """Return a figure of small multiples: one panel per refresh, one row per scope key (e.g. per task).

    frames_by_row: evolution(...) frames, or {row label: frames}. At most `max_panels` refreshes are shown,
    evenly spaced, first and last included; each panel's classes are relative to the refresh just before it.
    """
    import matplotlib.pyplot as plt
    rows = _rows(frames_by_row)
    n = max(len(f) for f in rows.values())
    keep = sorted({round(i * (n - 1) / max(1, min(n, max_panels) - 1)) for i in range(min(n, max_panels))})
    first = next(iter(rows.values()))[0]
    h, w = first["codes"].shape
    side, wide = 1.9, min(2.0, max(0.5, w / h))  # a panel's width follows the matrix, within limits
    fig, axes = plt.subplots(len(rows), len(keep), squeeze=False,
                             figsize=(side * len(keep) * wide + 1.2, (side + 0.9) * len(rows) + 0.9))
    for r, (label, frames) in enumerate(rows.items()):
        for c, i in enumerate(keep):
            ax = axes[r][c]
            if i >= len(frames):
                ax.axis("off")
                continue
            _draw_codes(ax, frames[i])
            ax.set_title(_panel_title(frames[i]), fontsize=7.5)
        if label:
            axes[r][0].set_ylabel(label, fontsize=9)
    fig.suptitle(f"Protected set of {tensor or 'one tensor'} at each refresh, vs the refresh before\n"
                 f"{_pooling_note(first)}", fontsize=9.5)
    fig.legend(handles=_legend_handles(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def animate_evolution(frames_by_row, path: str | Path, tensor: str = "", fps: float = 2.0, dpi: int = 80) -> Path:
    """Write the evolution as a GIF (matplotlib FuncAnimation + PillowWriter, one frame per refresh); return the path.

    Every row must have the same refresh steps (the engine refreshes every scope key at the same steps).
    """
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    rows = _rows(frames_by_row)
    steps = [[f["step"] for f in frames] for frames in rows.values()]
    if any(s != steps[0] for s in steps):
        raise ValueError(f"every row must have the same refresh steps to animate, got {steps}")
    first = next(iter(rows.values()))[0]
    h, w = first["codes"].shape
    wide = min(2.0, max(0.5, w / h))
    fig, axes = plt.subplots(1, len(rows), squeeze=False, figsize=(2.8 * len(rows) * wide + 0.6, 3.9), dpi=dpi)
    images = []
    for ax, (label, frames) in zip(axes[0], rows.items()):
        _draw_codes(ax, frames[0])
        images.append((ax, ax.images[0], label, frames))
    header = fig.suptitle("", fontsize=9)
    fig.legend(handles=_legend_handles(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.9))

    def draw(i: int):
        header.set_text(f"{tensor or 'one tensor'}: protected set at step {steps[0][i]} vs the refresh before\n"
                        f"{_pooling_note(first)}")
        for ax, image, label, frames in images:
            image.set_data(frames[i]["codes"])
            c = frames[i]["counts"]
            ax.set_title(f"{label + ': ' if label else ''}kept {c['kept']} · new {c['newly protected']} · "
                         f"released {c['released']}", fontsize=7.5)
        return [im for _, im, _, _ in images]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FuncAnimation(fig, draw, frames=len(steps[0]), blit=False).save(path, writer=PillowWriter(fps=fps), dpi=dpi)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return (name.replace("model.layers.", "L").replace(".weight", "").replace("self_attn.", "")
            .replace("mlp.", "").replace("_proj", ""))


def plot_layer_maps(masks: Mapping[str, object], step: Optional[int] = None, max_side: int = 64, ncols: int = 7):
    """Return a figure with one panel per tensor: the protected share of each block at one refresh.

    masks: {tensor name: mask}. One pooling factor for every tensor (from the largest), so a block is the same
    number of coordinates in every panel; one colour scale for every panel.
    """
    import matplotlib.pyplot as plt
    if not masks:
        raise ValueError("no masks to draw: pass {tensor name: mask} of one refresh")
    arrays = {n: as_mask(m) for n, m in masks.items()}
    factor = max(block_factor(a.shape, max_side) for a in arrays.values())
    shares = {n: pool_share(a, factor) for n, a in arrays.items()}
    vmax = max(float(s.max()) for s in shares.values()) or 1.0
    nrows = math.ceil(len(shares) / ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(1.7 * ncols + 1.2, 1.9 * nrows + 0.8))
    image = None
    for ax, (name, share) in zip(axes.flat, shares.items()):
        image = ax.imshow(share, cmap="magma_r", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="equal")
        ax.set_title(f"{_short(name)} · {arrays[name].mean():.1%}", fontsize=7.5)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(shares):]:
        ax.axis("off")
    where = f" at step {step}" if step is not None else ""
    fig.suptitle(f"Protected share of each {factor}×{factor} block, every isolatable tensor{where} "
                 "(title: the tensor's share)", fontsize=9.5)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="protected share of the block")
    return fig


def protected_shares(masks_by_step: Mapping[int, Mapping[str, object]]):
    """Return a DataFrame of protected shares: rows tensors (model order), columns refresh steps."""
    import pandas as pd
    if not masks_by_step:
        raise ValueError("no refreshes recorded: nothing to tabulate")
    steps = sorted(masks_by_step)
    names = list(masks_by_step[steps[0]])
    return pd.DataFrame({s: [float(as_mask(masks_by_step[s][n]).mean()) for n in names] for s in steps}, index=names)


def plot_share_heatmap(tables, ratio: Optional[float] = None, title: str = "Protected share per tensor at each refresh"):
    """Return a figure of tensor × refresh heatmaps of the protected share (%), one panel per scope key.

    tables: a protected_shares(...) DataFrame, or {label: DataFrame} (per-task scope: one per task's set).
    One colour scale for every panel, from 0: with `ratio` (the asked p) a diverging scale centred on p
    (white = the tensor holds exactly its p share; red above, blue below), else a sequential one.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns
    tables = {"": tables} if hasattr(tables, "columns") else dict(tables)
    if not tables:
        raise ValueError("no tables to draw")
    top = 100 * max(float(t.values.max()) for t in tables.values())
    scale = (dict(cmap="RdBu_r", vmin=0.0, vmax=max(top, 200 * ratio), center=100 * ratio) if ratio is not None
             else dict(cmap="magma_r", vmin=0.0, vmax=top))
    bar = "protected share of the tensor (%)" + (f"; white = p = {100 * ratio:g} %" if ratio is not None else "")
    n_rows = max(len(t) for t in tables.values())
    fig, axes = plt.subplots(1, len(tables), squeeze=False,
                             figsize=(max(4.0, 0.32 * max(t.shape[1] for t in tables.values()) + 2.4) * len(tables),
                                      0.2 * n_rows + 1.6))
    for i, (ax, (label, t)) in enumerate(zip(axes[0], tables.items())):
        sns.heatmap(100 * t, ax=ax, yticklabels=[_short(n) for n in t.index], xticklabels=list(t.columns),
                    cbar=i == len(tables) - 1, cbar_kws={"label": bar}, **scale)
        ax.set(xlabel="refresh step (optimizer steps)", ylabel="tensor" if i == 0 else "", title=label)
        if i:
            ax.set_yticklabels([])
        ax.tick_params(axis="y", labelsize=6.5)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _dense(entry, shape: tuple) -> np.ndarray:
    """Return a stored set entry (a bool mask, or int32 flat indices with mask_format="index") as a bool mask."""
    arr = entry.detach().cpu().numpy()
    if arr.dtype == bool:
        return arr.reshape(shape).copy()
    out = np.zeros(int(np.prod(shape)), dtype=bool)
    out[arr.astype(np.int64)] = True
    return out.reshape(shape)


class RefreshRecorder:
    """A `train_steps` callback that copies the engine's protected sets after every refresh.

    `masks[key][step]` is {tensor name: numpy bool mask} for each scope key ("global", or each task's own set in
    per-task scope), taken from the engine's `sets` right after the refresh at `step`.
    """

    def __init__(self, engine):
        self.engine = engine
        self.masks: Dict[str, Dict[int, Dict[str, np.ndarray]]] = {}
        self._seen = len(engine.history)

    def __call__(self, state=None) -> None:
        new = self.engine.history[self._seen:]
        self._seen = len(self.engine.history)
        for entry in new:
            key = entry["scope_key"]
            self.masks.setdefault(key, {})[entry["step"]] = {
                n: _dense(m, tuple(p.shape)) for n, m, p in zip(self.engine.names, self.engine.sets[key],
                                                                self.engine.params)}

    def tensor(self, name: str, key: str = "global") -> Dict[int, np.ndarray]:
        """Return {step: mask} of one tensor for one scope key (what evolution() takes)."""
        if key not in self.masks:
            raise KeyError(f"no refresh recorded for scope key {key!r}; recorded: {sorted(self.masks)}")
        return {step: masks[name] for step, masks in self.masks[key].items()}

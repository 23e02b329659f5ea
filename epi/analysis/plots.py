"""The house style (seaborn) and the suite's figures, saved as PNG next to the run's outputs."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

PALETTE = "colorblind"
# One colour per method in every figure, by family: full SFT greys, staging browns, static purple, EPI greens,
# random controls oranges, HFT magenta, EWC / replay blues. An arm ("full_sft@lr=0.00077") takes its method's
# colour, lightened (`method_colour`). The order is the registry's (epi.methods.METHODS), reference first.
METHOD_COLOURS = {
    "reference": "#bdbdbd", "full_sft": "#404040", "sequential": "#8c8c8c",
    "multi_stage": "#a6761d", "multi_stage_heuristic": "#e6ab02", "static": "#7570b3",
    "epi": "#66c2a5", "epi_per_task": "#1b9e77",
    "random": "#d95f02", "random_global": "#fdae6b", "random_per_task": "#e6550d", "hft": "#e7298a",
    "ewc": "#386cb0", "replay": "#80b1d3",
}
METHOD_ORDER = list(METHOD_COLOURS)
# the drift readings keep one colour in every figure (01's curves, 03's engine history, the explorer)
DRIFT_COLOURS = {"jaccard_prev": "#1b9e77", "jaccard_first": "#7570b3", "spearman_prev": "#636363"}


def set_style() -> None:
    """Apply the house style: seaborn whitegrid, colour-blind palette, compact figures."""
    import matplotlib
    import seaborn as sns
    sns.set_theme(style="whitegrid", palette=PALETTE, context="notebook")
    matplotlib.rcParams.update({"figure.figsize": (6.0, 3.6), "figure.dpi": 100, "savefig.dpi": 150,
                                "axes.titlesize": 11, "axes.labelsize": 10})


def savefig(fig, name: str, out_dir: str | Path) -> Path:
    """Save `fig` as `<out_dir>/figures/<name>.png` (no software tag, so bytes do not change with versions)."""
    path = Path(out_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", metadata={"Software": None})
    return path


def method_colour(label: str) -> str:
    """Return the colour of a method or arm label: the method's own colour, lightened for an arm
    ("epi_per_task@refresh_every=0"); a label that names no known method gets a neutral grey."""
    from matplotlib.colors import to_hex, to_rgb
    method, _, arm = label.partition("@")
    colour = METHOD_COLOURS.get(method, "#999999")
    if not arm:
        return colour
    return to_hex([0.45 * c + 0.55 for c in to_rgb(colour)])   # the same hue, paler: an arm of its method


def method_sort_key(label: str) -> tuple:
    """Return a sort key that puts method labels in METHOD_ORDER, each method's arms right after it."""
    method, _, arm = label.partition("@")
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), arm)


def _ax(ax):
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots()
    return ax


def drift_curves(history: Sequence[dict], ax=None, key: Optional[str] = None, title: str = "Mask drift"):
    """Plot Jaccard to the previous and to the first mask, and Spearman to the previous, per refresh."""
    ax = _ax(ax)
    rows = [h for h in history if key is None or h["scope_key"] == key]
    steps = [h["step"] for h in rows]
    for field, label in (("jaccard_prev", "Jaccard vs previous mask"), ("jaccard_first", "Jaccard vs first mask"),
                         ("spearman_prev", "Spearman vs previous importance")):
        ys = [np.nan if h.get(field) is None else h[field] for h in rows]
        ax.plot(steps, ys, marker="o", ms=3, label=label, color=DRIFT_COLOURS[field])
    ax.set(xlabel="optimizer step", ylabel="similarity", ylim=(-0.05, 1.05), title=title)
    ax.legend(fontsize=8)
    return ax


def matrix_heatmap(matrix: np.ndarray, labels: Sequence, ax=None, title: str = "", vmin: float = 0.0,
                   cmap: str = "viridis", annotate: bool = False):
    """Plot a square similarity matrix (e.g. Jaccard of top-p sets across checkpoints)."""
    import seaborn as sns
    ax = _ax(ax)
    sns.heatmap(matrix, xticklabels=labels, yticklabels=labels, vmin=vmin, vmax=1.0, cmap=cmap, ax=ax,
                annot=annotate, fmt=".2f", square=True, cbar_kws={"shrink": 0.8})
    ax.set_title(title)
    return ax


def per_layer_heatmap(history: Sequence[dict], ax=None, key: Optional[str] = None, title: str = "Protected share per tensor",
                      ratio: Optional[float] = None):
    """Plot each tensor's protected share at every refresh (rows: tensors, columns: refresh steps). With `ratio`
    (p) the colour scale runs from 0 to 2p, so a share at p sits mid-scale and one-point differences stay small."""
    import seaborn as sns
    ax = _ax(ax)
    rows = [h for h in history if key is None or h["scope_key"] == key]
    names = list(rows[0]["per_layer"])
    data = np.array([[h["per_layer"][n] for h in rows] for n in names])
    short = [n.replace("model.layers.", "L").replace(".weight", "").replace("self_attn.", "").replace("mlp.", "")
             for n in names]
    scale = {} if ratio is None else {"vmin": 0.0, "vmax": max(2 * ratio, float(np.nanmax(data)))}
    sns.heatmap(data, yticklabels=short, xticklabels=[h["step"] for h in rows], cmap="magma", ax=ax,
                cbar_kws={"shrink": 0.8, "label": "protected share (fraction of the tensor)"}, **scale)
    ax.set(xlabel="refresh step", title=title)
    ax.tick_params(axis="y", labelsize=7)
    return ax


def method_bars(df, columns: Sequence[str], ax=None, title: str = "", ylabel: str = "score"):
    """Plot each method's mean over seeds of `columns` (grouped bars in the methods' colours) with the one rule's
    interval around it (`stats.arm_interval`: the 95 % bootstrap over seeds, or the seed range with ≤ 3 seeds);
    the legend says what the lines are."""
    import seaborn as sns

    from .stats import arm_interval, reaches_level
    ax = _ax(ax)
    long = df.melt(id_vars=["method", "seed"], value_vars=list(columns), var_name="metric", value_name="value")
    long["metric"] = long["metric"].map(nice_label)
    order = sorted(long["method"].unique(), key=method_sort_key)
    sns.barplot(data=long, x="metric", y="value", hue="method", hue_order=order, ax=ax, capsize=0.05, saturation=1,
                palette={m: method_colour(m) for m in order},
                errorbar=lambda v: arm_interval(list(v)) if len(v) > 1 else (np.nan, np.nan))
    ax.set(xlabel="", ylabel=ylabel, title=title)
    seeds = int(df.groupby("method")["seed"].nunique().min()) if len(df) else 0
    lines = "95% bootstrap interval over seeds" if reaches_level(seeds) else "range of the seeds (≤ 3: no 95% interval)"
    ax.legend(fontsize=7, ncol=2, title=f"bars: mean over {seeds} seed(s) · lines: {lines}", title_fontsize=7)
    return ax


def nice_label(column: str) -> str:
    """Return a column name in words for a tick label: "score_math" → "math", "mean_score" → "mean of tasks",
    "forgetting_mean" → "mean of tasks", "learning_code" → "code"."""
    if column in ("mean_score", "forgetting_mean", "learning_mean"):
        return "mean of tasks"
    for prefix in ("score_", "forgetting_", "learning_"):
        if column.startswith(prefix):
            return column[len(prefix):]
    return column.replace("_", " ")


def seed_bands(values) -> tuple:
    """Return (low, high) per column of `values` (seeds × points): the one rule's interval around the mean over
    seeds at each point (`stats.arm_interval`: the seed range with ≤ 3 seeds, else the 95 % bootstrap); nan where
    a column holds a nan (e.g. the first refresh's Jaccard to a previous mask) or one seed."""
    from .stats import arm_interval
    a = np.asarray(values, dtype=float)
    ends = [arm_interval(list(col)) if np.isfinite(col).all() and col.size > 1 else (np.nan, np.nan) for col in a.T]
    return np.array([e[0] for e in ends]), np.array([e[1] for e in ends])


def band_label(n_seeds: int) -> str:
    """Return what `seed_bands` draws for `n_seeds` seeds, for a legend or title."""
    from .stats import reaches_level
    return "95% bootstrap interval over seeds" if reaches_level(n_seeds) else f"range of the {n_seeds} seeds"


def lines(xs: Sequence, series: Dict[str, Sequence[float]], ax=None, xlabel: str = "", ylabel: str = "",
          title: str = "", errors: Optional[Dict[str, Sequence[float]]] = None, logx: bool = False,
          colours: Optional[Dict[str, str]] = None, bands: Optional[Dict[str, tuple]] = None):
    """Plot one line per series, optionally with ± `errors` or (low, high) `bands` (e.g. `seed_bands`) shaded
    around it; say in the labels what they are. A series named after a method takes the method's colour;
    `colours` sets others (e.g. DRIFT_COLOURS' readings)."""
    ax = _ax(ax)
    for name, ys in series.items():
        ys = np.asarray(ys, dtype=float)
        # a method keeps its colour here too; other series take the style's cycle
        colour = ({"color": colours[name]} if colours and name in colours else
                  {"color": method_colour(name)} if name.partition("@")[0] in METHOD_COLOURS else {})
        (line,) = ax.plot(xs, ys, marker="o", ms=4, label=name, **colour)
        if errors and name in errors:
            e = np.asarray(errors[name], dtype=float)
            ax.fill_between(xs, ys - e, ys + e, alpha=0.2, color=line.get_color())
        if bands and name in bands:
            lo, hi = (np.asarray(b, dtype=float) for b in bands[name])
            ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return ax


VERDICT_COLOURS = {"supported": "#1b7837", "not supported": "#b2182b", "mixed": "#636363", "not measured": "#bdbdbd"}


def effect_intervals(claims: Sequence[dict], ax=None, minimum: float = 0.0, title: str = "",
                     xlabel: str = "effect on mean score (method − baseline, fraction of prompts)"):
    """Plot each decided claim as a dot (its effect) on a line (its 95 % interval from the one rule), one row per
    claim labelled "method vs baseline", coloured by verdict; dashed lines at 0 and at the claim's minimum."""
    ax = _ax(ax)
    decided = [c for c in claims if isinstance(c.get("decision"), dict) and c["decision"].get("effect") is not None]
    for y, c in enumerate(reversed(decided)):
        d = c["decision"]
        colour = VERDICT_COLOURS[c["verdict"]]
        lo, hi = d.get("interval") or (None, None)
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [y, y], color=colour, lw=2.2, solid_capstyle="butt")
        ax.plot([d["effect"]], [y], "o", color=colour, ms=6)
    names = [f"{c.get('method', '?')} vs {c.get('baseline', '?')}" for c in reversed(decided)]
    ax.set_yticks(range(len(decided)), names, fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    if minimum:
        ax.axvline(minimum, color="black", lw=0.8, ls="--")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=col, marker="o", lw=2, label=v) for v, col in VERDICT_COLOURS.items()
               if any(c["verdict"] == v for c in decided)]
    ax.legend(handles=handles, fontsize=7, loc="lower right", title="verdict (95% interval)", title_fontsize=7)
    ax.set(xlabel=xlabel, title=title)
    return ax


def per_task_intervals(readings: Dict[str, Dict[str, object]], ax=None, title: str = "",
                       xlabel: str = "mix score − single-task reference (fraction of prompts)"):
    """Plot, per task (rows), each method's effect with its 95 % interval from the one rule (a Verdict per task,
    e.g. `evidence.seesaw(...).per_task`), methods side by side in their colours; a line at 0."""
    ax = _ax(ax)
    methods = sorted(readings, key=method_sort_key)
    tasks = list(dict.fromkeys(t for m in methods for t in readings[m]))
    width = 0.7 / max(1, len(methods))
    for j, m in enumerate(methods):
        colour = method_colour(m)
        for i, t in enumerate(tasks):
            v = readings[m].get(t)
            if v is None:
                continue
            y = i + (j - (len(methods) - 1) / 2) * width
            lo, hi = v.interval
            if np.isfinite(lo) and np.isfinite(hi):
                ax.plot([lo, hi], [y, y], color=colour, lw=2)
            ax.plot([v.effect], [y], "o", color=colour, ms=5, label=m if i == 0 else None)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlabel=xlabel, title=title)
    ax.legend(fontsize=7, title="dot: effect · line: 95% interval", title_fontsize=7)
    return ax

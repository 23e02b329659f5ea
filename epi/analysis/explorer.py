"""An explorer for the knobs that move the mask: record a short run's gradients once, then replay EPI's
importance and refreshes on them for any p, β, T, score and normaliser, and redraw.

  rec = record(model, data, steps=48)                    # plain AdamW; gradients and weights kept in float16
  out = replay(rec, ratio=0.05, beta=0.99, refresh_every=8, score="fisher", normalize="layer_mean")
  explore(rec, interactive=not epi.nb.quiet())           # sliders in Jupyter / Colab; one static frame otherwise

What a replay is, and is not. It runs the engine's own pieces — `ImportanceTracker` (the EMA of the score)
and `top_p_masks` (layer normalisation, the global top-p) — over the recorded steps, so for a given setting
its masks are the ones EPI would draw *from these gradients*. The gradients come from a run without
isolation: in a real EPI run, protected weights stop moving and later gradients change with them. The
explorer shows how the estimator and the refresh schedule behave; the runs in notebooks 03–06 show what
isolation does to training.

Under papermill, nbval or CI (the notebook passes `interactive=not epi.nb.quiet()`), or without ipywidgets,
`explore` draws one static frame at the initial values and stores no widget state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from ..engine.config import EPIConfig
from ..engine.core import isolatable
from ..engine.importance import ImportanceTracker
from ..engine.masks import mask_overlap, top_p_masks
from . import maskviz
from .plots import DRIFT_COLOURS

SCORES = ("fisher", "taylor", "grad", "delta")
NORMALIZERS = ("layer_mean", "layer_max", "none")


@dataclass
class Recording:
    """A plain run's isolatable tensors at every step: gradients (before clipping) and the weights they were
    taken at, on the CPU (float16 by default); the weights before the first step; the task of each step's batch."""

    names: List[str]
    grads: List[List[torch.Tensor]] = field(default_factory=list)
    weights: List[List[torch.Tensor]] = field(default_factory=list)
    start: List[torch.Tensor] = field(default_factory=list)
    tasks: List[Optional[str]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Return the number of recorded steps."""
        return len(self.grads)


def record(model: torch.nn.Module, data, steps: int, lr: float = 1e-3, weight_decay: float = 0.1,
           clip: float = 1.0, dtype: torch.dtype = torch.float16) -> Recording:
    """Train `model` for `steps` plain AdamW steps on `data` (a callable step → (task, batch) like
    epi.training.data.StepData) and return its Recording. The model is trained in place.

    dtype: how the gradients and weights are kept (float16 halves the memory of a long recording and moves a
    replay's masks only at the top-p boundary; float32 replays the engine's masks exactly)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    named = isolatable(model, EPIConfig())
    rec = Recording(names=[n for n, _ in named], start=[p.detach().to(dtype).cpu().clone() for _, p in named])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for step in range(steps):
        task, batch = data(step)
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        rec.grads.append([p.grad.detach().to(dtype).cpu().clone() for _, p in named])
        rec.weights.append([p.detach().to(dtype).cpu().clone() for _, p in named])
        rec.tasks.append(task)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return rec


def replay(rec: Recording, ratio: float = 0.05, beta: float = 0.99, refresh_every: int = 8, score: str = "fisher",
           normalize: str = "layer_mean", warmup_steps: Optional[int] = None) -> Dict[str, object]:
    """Return EPI's refreshes over the recorded steps (global scope): {"steps", "masks" (bool per tensor at each
    refresh), "jaccard_prev", "jaccard_first", "share" (protected share per tensor × refresh), "names"}.

    warmup_steps defaults to refresh_every; refresh_every = 0 draws one mask at warm-up end (static)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if normalize not in NORMALIZERS:
        raise ValueError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if refresh_every < 0:
        raise ValueError(f"refresh_every must be >= 0, got {refresh_every}")
    warmup = refresh_every if warmup_steps is None else warmup_steps
    warmup = max(1, warmup or 1)
    if warmup > rec.steps:
        raise ValueError(f"warm-up ({warmup} steps) is longer than the recording ({rec.steps} steps)")
    # stand-in tensors the tracker reads: .grad and the weights of each recorded step, in float32
    params = [w.float().clone().requires_grad_(False) for w in rec.start]
    tracker = ImportanceTracker(params, EPIConfig(ratio=ratio, beta=beta, score=score, normalize=normalize))
    out: Dict[str, object] = {"steps": [], "masks": [], "jaccard_prev": [], "jaccard_first": [], "share": [],
                              "names": list(rec.names)}
    for step in range(rec.steps):
        for p, g, w in zip(params, rec.grads[step], rec.weights[step]):
            p.data.copy_(w.float())
            p.grad = g.float()
        tracker.update(rec.tasks[step], finite=True)
        n = step + 1
        due = n == warmup or (refresh_every and n > warmup and (n - warmup) % refresh_every == 0)
        if not due:
            continue
        masks = top_p_masks(tracker.buffers["global"], ratio, normalize=normalize)
        prev = out["masks"][-1] if out["masks"] else None
        out["steps"].append(n)
        out["jaccard_prev"].append(None if prev is None else mask_overlap(prev, masks)["jaccard"])
        out["jaccard_first"].append(mask_overlap(out["masks"][0], masks)["jaccard"] if prev is not None else None)
        out["share"].append([float(m.float().mean()) for m in masks])
        out["masks"].append(masks)
    return out


def draw(result: Dict[str, object], tensor: int = 0, fig=None, title: str = ""):
    """Draw a replay: drift per refresh, the protected share per tensor × refresh, and one tensor's mask at the
    last refresh coloured by what happened to each coordinate there (kept, newly protected, released)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    if not result["steps"]:
        raise ValueError("the replay has no refresh: lower warm-up or use a longer recording")
    fig = fig or plt.figure(figsize=(13, 3.8))
    fig.clear()
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.1, 1.2, 1.0]})
    steps = result["steps"]
    for key, label in (("jaccard_prev", "vs previous mask"), ("jaccard_first", "vs first mask")):
        ys = [np.nan if v is None else v for v in result[key]]
        ax1.plot(steps, ys, marker="o", ms=4, label=label, color=DRIFT_COLOURS[key])
    ax1.set(xlabel="optimizer step", ylabel="Jaccard of protected sets", ylim=(-0.05, 1.05), title="Drift at each refresh")
    ax1.legend(fontsize=8)
    share = np.array(result["share"]).T * 100
    im = ax2.imshow(share, aspect="auto", cmap="magma", vmin=0)
    short = [n.replace("model.layers.", "L").replace(".weight", "").replace("self_attn.", "").replace("mlp.", "")
             for n in result["names"]]
    ax2.set_yticks(range(len(short)), short, fontsize=6)
    ax2.set_xticks(range(len(steps)), steps, fontsize=7)
    ax2.set(xlabel="refresh step", title="Protected share per tensor (%)")
    fig.colorbar(im, ax=ax2, shrink=0.8)
    masks = result["masks"]
    prev = masks[-2][tensor] if len(masks) > 1 else None
    m = maskviz.transition_codes(prev, masks[-1][tensor])   # the same classes and colours as the mask figures
    colours = [maskviz.CLASS_COLOURS[c] for c in (maskviz.FREE, maskviz.KEPT, maskviz.NEW, maskviz.RELEASED)]
    ax3.imshow(m, aspect="auto", cmap=ListedColormap(colours), vmin=0, vmax=3, interpolation="nearest")
    ax3.set(xlabel="input coordinate", ylabel="output coordinate", title=f"{short[tensor]} at step {steps[-1]}")
    ax3.legend(handles=[Patch(color=maskviz.CLASS_COLOURS[c], label=name) for c, name in maskviz.CLASS_NAMES.items()],
               fontsize=7, loc="upper right", framealpha=0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def explore(rec: Recording, interactive: bool, tensor: int = 0, ratio: float = 0.05, beta: float = 0.99,
            refresh_every: int = 8, score: str = "fisher", normalize: str = "layer_mean"):
    """Show sliders for p, β, T, score and normaliser that redraw `draw(replay(...))` and return the widget; with
    `interactive` False (a notebook passes `not epi.nb.quiet()`: papermill, nbval, CI) or without ipywidgets,
    draw one static frame at the given values and return the figure."""
    if interactive:
        try:
            import ipywidgets  # noqa: F401
        except ImportError:   # a plain Python without the notebook extras: the static frame
            interactive = False
    if not interactive:
        return draw(replay(rec, ratio, beta, refresh_every, score, normalize), tensor,
                    title=f"p = {ratio:g}, β = {beta:g}, T = {refresh_every}, score {score}, {normalize} (static frame)")
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display
    out = w.Output()
    controls = {
        "ratio": w.FloatLogSlider(value=ratio, base=10, min=-2.5, max=-0.3, step=0.05, description="p",
                                  readout_format=".3f"),
        "beta": w.SelectionSlider(options=[0.5, 0.9, 0.95, 0.99, 0.999], value=beta, description="β"),
        "refresh_every": w.IntSlider(value=refresh_every, min=0, max=max(1, rec.steps // 2), description="T"),
        "score": w.Dropdown(options=SCORES, value=score, description="score"),
        "normalize": w.Dropdown(options=NORMALIZERS, value=normalize, description="normaliser"),
    }

    def redraw(_=None):
        with out:
            out.clear_output(wait=True)
            try:
                fig = draw(replay(rec, **{k: c.value for k, c in controls.items()}), tensor)
                display(fig)
                plt.close(fig)   # shown once, inside the output area; no figure piles up
            except ValueError as e:   # e.g. a warm-up longer than the recording: say so instead of a traceback
                print(e)

    for c in controls.values():
        c.observe(redraw, names="value")
    redraw()
    box = w.VBox([w.HBox(list(controls.values())[:3]), w.HBox(list(controls.values())[3:]), out])
    display(box)
    return box


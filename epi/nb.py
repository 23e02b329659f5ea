"""Notebook setup: profile resolution, seeds, quiet mode under CI/papermill, versions, output folders."""
from __future__ import annotations

import inspect
import os
import platform
from pathlib import Path
from typing import Optional

FLOORS = {"torch": "2.1", "transformers": "4.45"}


def quiet() -> bool:
    """True under CI, papermill/nbval, or when EPI_SMOKE=1: progress bars and chatty logs off."""
    return any(os.environ.get(k) for k in ("CI", "EPI_SMOKE", "PAPERMILL", "PYTEST_CURRENT_TEST")) or \
        "PAPERMILL_INPUT_PATH" in os.environ


def resolve_profile(profile: str) -> str:
    """Return the concrete profile: "auto" → smoke under CI/EPI_SMOKE, gpu with CUDA, else cpu."""
    if profile != "auto":
        return profile
    import torch
    if os.environ.get("EPI_SMOKE") or os.environ.get("CI"):
        return "smoke"
    return "gpu" if torch.cuda.is_available() else "cpu"


def repo_root() -> Path:
    """Return the repository root (the folder holding pyproject.toml), else the current folder."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def setup_notebook(seed: int = 0, out: str | Path = "artifacts", profile: str = "auto",
                   threads: Optional[int] = None) -> dict:
    """Seed everything, apply the plot style, quieten progress bars under CI, create the output folder `out`
    ("{profile}" in it is replaced by the resolved profile; relative to the repo root); return a report dict
    (profile, seed, versions, device, out)."""
    if quiet():
        for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(var, "1")
    import torch
    import transformers
    from .plots import set_style
    from .train import seed_everything
    transformers.logging.set_verbosity_error()
    if threads is None and quiet():
        threads = 1  # CI runs notebooks side by side on 2 cores: oversubscribed OpenMP threads crawl
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    set_style()
    profile = resolve_profile(profile)
    # "{profile}" in the folder keeps each tier's outputs apart (CI's smoke runs never overwrite a cpu reproduction)
    out = Path(str(out).replace("{profile}", profile))
    if not out.is_absolute():
        out = repo_root() / out
    (out / "figures").mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return {"profile": profile, "seed": seed, "out": out, "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def show_source(obj) -> str:
    """Return the source code of a function or class of `epi` (to read it in a notebook)."""
    return inspect.getsource(obj)

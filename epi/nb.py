"""Notebook setup: profile resolution, seeds, quiet mode under CI/papermill, versions, output folders."""
from __future__ import annotations

import inspect
import os
import platform
from pathlib import Path
from typing import Optional, Sequence

# What notebooks 01-06 serve: synthetic EPI-Mini data and tiny-base. A notebook for the hub-scale
# profiles (07) says so: setup_notebook(..., gpu_profile="gpu", serves=("smoke", "cpu", "gpu", "full")).
CPU_SCALE = ("smoke", "cpu")


# Programs that execute a notebook with nobody watching. None of them tells its kernel so through the
# environment, but each starts the kernel as its own child process.
EXECUTORS = ("papermill", "nbval", "nbclient", "nbconvert", "jupyter-execute")


def started_by_executor(parent_cmdline: Optional[str] = None) -> bool:
    """True when the parent process (this kernel's launcher) is papermill, nbval, nbclient or nbconvert.

    `parent_cmdline` defaults to the parent's command line from /proc (Linux); elsewhere this returns False.
    """
    if parent_cmdline is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return False
        parent_cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
    return any(name in parent_cmdline for name in EXECUTORS)


def quiet() -> bool:
    """True under CI, pytest (nbval), a notebook executor (papermill, nbclient, nbconvert), EPI_SMOKE=1 or
    EPI_QUIET=1: progress bars and chatty logs off. EPI_QUIET=0 turns it off whatever else holds.

    `python -m epi reproduce` sets EPI_QUIET=1 for its kernels (their parent is the epi CLI, not papermill's).
    """
    forced = os.environ.get("EPI_QUIET", "")
    if forced in ("0", "1"):
        return forced == "1"
    return any(os.environ.get(k) for k in ("CI", "EPI_SMOKE", "PYTEST_CURRENT_TEST")) or started_by_executor()


def resolve_profile(profile: str = "auto", *, gpu_profile: str = "cpu", serves: Sequence[str] = CPU_SCALE) -> str:
    """Return the concrete profile: "auto" → smoke under CI/EPI_SMOKE, `gpu_profile` when CUDA is present
    (default cpu: the CPU-scale lesson, run on the GPU by the runner's device="auto"), else cpu.

    `serves` lists the profiles the notebook can run; asking for another one (directly or through "auto")
    is a ValueError naming them, raised before anything is trained.
    """
    from .experiments.profiles import PROFILES
    unknown = [p for p in (*serves, gpu_profile) if p not in PROFILES]
    if unknown:
        raise ValueError(f"unknown profile(s) {unknown} in serves/gpu_profile; known: {sorted(PROFILES)}")
    resolved = profile
    if profile == "auto":
        import torch
        if os.environ.get("EPI_SMOKE") or os.environ.get("CI"):
            resolved = "smoke"
        else:
            resolved = gpu_profile if torch.cuda.is_available() else "cpu"
    elif profile not in PROFILES:
        raise ValueError(f"PROFILE must be 'auto' or one of {sorted(PROFILES)}, got {profile!r}")
    if resolved not in serves:
        asked = f"PROFILE={profile!r}" + (f" (resolved to {resolved!r})" if resolved != profile else "")
        raise ValueError(f"this notebook serves the profiles {tuple(serves)}, not {asked}; set PROFILE to "
                         f"'auto' or one of {tuple(serves)}")
    return resolved


def repo_root() -> Path:
    """Return the repository root (the folder holding pyproject.toml), else the current folder."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def setup_notebook(seed: int = 0, out: str | Path = "artifacts", profile: str = "auto",
                   threads: Optional[int] = None, *, gpu_profile: str = "cpu",
                   serves: Sequence[str] = CPU_SCALE) -> dict:
    """Seed everything, apply the plot style, quieten progress bars under CI, create the output folder `out`
    ("{profile}" in it is replaced by the resolved profile; relative to the repo root); return a report dict
    (profile, seed, versions, the device and precision runs resolve "auto" to, out).

    The profile is resolved by `resolve_profile(profile, gpu_profile=..., serves=...)`: by default a GPU
    runtime runs the CPU-scale lesson on the GPU, and profiles outside `serves` are refused."""
    profile = resolve_profile(profile, gpu_profile=gpu_profile, serves=serves)  # refuse before any work
    if quiet():
        for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(var, "1")
    import torch
    import transformers
    from .analysis.plots import set_style
    from .training.loop import seed_everything
    transformers.logging.set_verbosity_error()
    if threads is None and quiet():
        threads = 1  # CI runs notebooks side by side on 2 cores: oversubscribed OpenMP threads crawl
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    set_style()
    # "{profile}" in the folder keeps each tier's outputs apart (CI's smoke runs never overwrite a cpu reproduction)
    out = Path(str(out).replace("{profile}", profile))
    if not out.is_absolute():
        out = repo_root() / out
    (out / "figures").mkdir(parents=True, exist_ok=True)
    from .training.device import describe, resolve_device, resolve_precision
    device = resolve_device("auto")
    return {"profile": profile, "seed": seed, "out": out, "device": describe(device),
            "precision": resolve_precision("auto", device),
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def show_source(obj) -> str:
    """Return the source code of a function or class of `epi` (to read it in a notebook)."""
    return inspect.getsource(obj)

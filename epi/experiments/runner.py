"""The experiment runner: a config → a run → a results record (JSON), resumable from checkpoints.

  python -m epi run --method epi --profile cpu --seed 0 --out artifacts/runs

This module owns the run folders around a `Run` (epi.experiments.run): the output folder, the lock, reuse of
a finished run with the same settings, a fresh start, grids and the single-task references. A run
interrupted and restarted with the same command resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch

from ..jsonio import write_json
from ..methods.base import RunRefused
from .profiles import NOT_SETTINGS, ExperimentConfig
from .run import Run, differing_settings, environment, peak_memory_mb

__all__ = ["Run", "RunRefused", "differing_settings", "check_same_settings", "output_folder", "run_lock", "discard",
           "finished_record", "run_experiment", "run_grid", "run_references"]

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: run folders are not locked
    fcntl = None

LOCK = "run.lock"


def output_folder(out_root: str | Path) -> Path:
    """Return `out_root` as a Path once it is a folder this process can write (created when missing)."""
    root = Path(out_root)
    if root.exists() and not root.is_dir():
        raise RunRefused(f"the output folder {root} is a file; give --out a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunRefused(f"cannot create the output folder {root}: {e.strerror or e}; give --out a writable folder") \
            from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RunRefused(f"the output folder {root} is not writable; give --out a writable folder")
    return root


def _lock_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def run_lock(folder: Path, say: Callable[[str], None] = log.info) -> Iterator[None]:
    """Own run `folder` for the block: one process at a time, or RunRefused naming the other process.

    The lock is an OS file lock (flock) on `folder/run.lock`, so it is released when its process ends, even
    by SIGKILL; the file names the holder (pid, host, start) for the message, and a file left behind by a
    process that has ended is taken over with a log line. Without fcntl (Windows) nothing is locked."""
    folder = Path(folder)
    if fcntl is None:
        yield
        return
    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = _lock_holder(path)
            raise RunRefused(f"the run folder {folder} is in use by pid {h.get('pid', '?')} on {h.get('host', '?')} "
                             f"(since {h.get('started', '?')}; lock {path}): wait for that run to end or stop it; two "
                             "processes in one run folder would overwrite each other's checkpoint") from None
        try:  # the holder may have removed the file between our open and flock: lock the file that is there
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    left = _lock_holder(path)
    if left:
        say(f"{folder.name}: taking over the lock of pid {left.get('pid', '?')} on {left.get('host', '?')} "
            f"(since {left.get('started', '?')}); that process has ended")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiting opener then retries on a new file
        os.close(fd)


def discard(out: Path, say: Callable[[str], None] = log.info) -> None:
    """Delete what an earlier attempt of the run in `out` left (results, checkpoints, snapshots)."""
    # checkpoint*.tmp: what a checkpoint write killed midway left (epi.jsonio.atomic_write; older runs: .tmp)
    gone = [p for p in (out / "results.json", out / "checkpoint.pt", *sorted(out.glob("checkpoint*.tmp")),
                        out / "snapshots.npz", *sorted(out.glob("*/checkpoint.pt")),
                        *sorted(out.glob("*/checkpoint*.tmp"))) if p.exists()]
    for p in gone:
        p.unlink()
    if gone:
        say(f"{out.name}: fresh start, discarded {', '.join(str(p.relative_to(out)) for p in gone)}")


def finished_record(config: ExperimentConfig, out: Path) -> Optional[dict]:
    """Return the results record of `config`'s finished run in run folder `out` (None when there is none);
    refuse a record that cannot be read or that was made with other settings."""
    results = Path(out) / "results.json"
    if not results.exists():
        return None
    try:
        record = json.loads(results.read_text())
        stored = record["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunRefused(f"{results} is not a readable results record ({type(e).__name__}: {e}); delete it (or rerun "
                         f"with --fresh) to run {config.run_name} again") from None
    differ = differing_settings(stored, config, record.get("precision"))
    if differ:
        raise RunRefused(f"{config.run_name}: the folder holds a finished run with other settings ({differ}) in "
                         f"{results}; use another output folder, delete that run, or rerun with --fresh to replace it")
    return record


def run_experiment(config: ExperimentConfig, out_root: str | Path, say: Callable[[str], None] = log.info,
                   fresh: bool = False) -> dict:
    """Run (or resume, or reuse if finished) one experiment; return its results record.

    The run folder is owned by this process while it runs (`run_lock`); a finished or interrupted run in it
    is reused only with the same settings (threads, checkpoint_every and device may differ); fresh=True
    discards what an earlier attempt left and starts over."""
    out = output_folder(out_root) / config.run_name
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise RunRefused(f"cannot create the run folder {out}: {e.strerror or e}") from None
    with run_lock(out, say):
        if fresh:
            discard(out, say)
        record = finished_record(config, out)
        if record is not None:
            say(f"{config.run_name}: already finished ({out / 'results.json'})")
            return record
        run = Run(config, out, say)
        run.method.check(config, out)  # e.g. a matched run the method reads: refuse before training
        if config.protocol == "reference":
            record = run_references(config, out, say)
        else:
            record = run.execute()
        write_json(out / "results.json", record)
        (out / "checkpoint.pt").unlink(missing_ok=True)
    return record


def check_same_settings(stored: dict, config: ExperimentConfig, stored_precision: Optional[str] = None) -> None:
    """Raise RunRefused when a finished run's stored config differs from `config` (see differing_settings)."""
    differ = differing_settings(stored, config, stored_precision)
    if differ:
        raise RunRefused(f"{config.run_name}: the folder holds a finished run with other settings ({differ}); "
                         "use another output folder, delete that run, or rerun with --fresh to replace it")


def _grid_worker(args) -> str:
    config, out_root = args
    torch.set_num_threads(config.threads)
    rec = run_experiment(config, out_root, say=log.info)
    return f"{config.run_name}: " + " ".join(f"{t}={v:.2f}" for t, v in rec["final_scores"].items())


def run_grid(configs: List[ExperimentConfig], out_root: str | Path, workers: int = 1,
             say: Callable[[str], None] = log.info) -> List[dict]:
    """Run many experiments (finished ones are reused) with `workers` processes; return their records.

    Base models are built first, one per seed, so parallel workers never race to build the same one.
    """
    from ..methods.registry import METHODS
    from .base_build import ensure_base
    root = output_folder(out_root)
    names: Dict[str, dict] = {}
    for c in configs:  # one folder per run name: two settings under one name would overwrite each other
        first, this = names.setdefault(c.run_name, c.to_dict()), c.to_dict()
        differ = [k for k in this if k not in NOT_SETTINGS and first[k] != this[k]]
        if differ:
            raise RunRefused(f"two runs of the grid share the folder {c.run_name} with different settings "
                             f"({', '.join(f'{k}={first[k]!r} vs {this[k]!r}' for k in differ)}); "
                             "give them separate output folders")
    # finished runs are reused only with the same settings: checked for all before anything runs
    todo = [c for c in configs if finished_record(c, root / c.run_name) is None]
    for cfg in {(c.seed, c.base_steps, c.model): c for c in todo if c.model == "tiny-base"}.values():
        ensure_base(cfg)
    later = {name for name, method in METHODS.items() if method.reads_other_runs}
    ordered = sorted(todo, key=lambda c: c.method in later)  # e.g. matched controls after what they match
    if workers > 1 and len(ordered) > 1:
        import multiprocessing as mp
        first = [c for c in ordered if c.method not in later]
        rest = [c for c in ordered if c.method in later]
        with mp.get_context("spawn").Pool(workers) as pool:
            for batch in (first, rest):
                for line in pool.imap_unordered(_grid_worker, [(c, root) for c in batch]):
                    say(line)
    else:
        for c in ordered:
            say(_grid_worker((c, root)))
    return [json.loads((root / c.run_name / "results.json").read_text()) for c in configs]


def run_references(config: ExperimentConfig, out: Path, say) -> dict:
    """Single-task references: each task alone from the start model, `steps_per_task` steps."""
    from dataclasses import replace
    if config.method != "full_sft":
        raise ValueError("protocol 'reference' trains each task alone with full_sft")
    t0 = time.time()
    per_task = {}
    for t in config.tasks:
        sub = replace(config, protocol="forgetting", tasks=list(config.tasks), train_tasks=[t])
        rec = Run(sub, out / t, say).execute()
        per_task[t] = {"final_score": rec["final_scores"][t], "final_loss": rec["final_losses"][t],
                       "evals": rec["evals"]}
        say(f"reference {t}: {rec['final_scores'][t]:.2f}")
    return {"config": config.to_dict(), "seed": config.seed, "environment": environment(),
            "device": rec["device"], "precision": rec["precision"], "references": per_task,
            "final_scores": {t: v["final_score"] for t, v in per_task.items()},
            "wall_s": round(time.time() - t0, 1), "peak_memory_mb": round(peak_memory_mb(), 1)}

"""Checkpoints of a run in progress: model, optimizer, loop, engine, GradScaler and RNG state, safely read.

A checkpoint holds tensors and plain values only and is read with `torch.load(weights_only=True)`, so a
file planted in a run folder can never run code (`safe_load`); a file that is not a checkpoint, or is
truncated, raises CheckpointError naming it and what to do.
"""
from __future__ import annotations

import pickle
import random
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..jsonio import atomic_write
from .loop import LoopState


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from (the message names it and what to do)."""


def rng_state() -> dict:
    """Return the torch, CUDA, numpy and python RNG states as tensors and plain values (no pickled objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    """Restore the RNG states that `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))


def plain(value, where: str = "state"):
    """Return `value` as tensors and plain containers (dict, list, tuple, str, int, float, bool, None), so
    that `torch.load(weights_only=True)` reads it back; raise naming the path of anything else."""
    if isinstance(value, torch.Tensor) or value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, str):  # e.g. torch.__version__ (TorchVersion)
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} holds a {type(value).__name__}; checkpoints store tensors and plain values only "
                    "(they are read with torch.load(weights_only=True))")


def save_checkpoint(path: Path, *, model, optimizer, state: LoopState, engine=None, extra: Optional[dict] = None,
                    scaler=None) -> None:
    """Write model, optimizer, loop, engine, GradScaler and RNG state atomically (tmp file + rename), as tensors
    and plain values only: `read_checkpoint` loads with weights_only=True, so a file can never run code."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loop": plain(asdict(state), "loop"),
            "engine": plain(engine.state_dict(), "engine") if engine is not None else None,
            "rng": rng_state(), "extra": plain(extra or {}, "extra")}
    if scaler is not None:
        blob["scaler"] = plain(scaler.state_dict(), "scaler")
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def safe_load(path: Path, advice: str):
    """Return what torch saved at `path`, read with weights_only=True: tensors and plain values only, so a
    planted pickle cannot run code. An unsafe, empty, truncated or corrupt file raises CheckpointError
    naming the path, followed by `advice` (what to do about it)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = ("holds objects other than tensors and plain values (refused by torch.load(weights_only=True): "
                  "loading them could run code)") if "Weights only load failed" in str(e) else \
            f"is not a readable checkpoint ({str(e).splitlines()[0][:120]})"
    except (EOFError, RuntimeError, ValueError, KeyError, IndexError) as e:
        reason = "is empty" if path.stat().st_size == 0 else \
            f"is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    raise CheckpointError(f"checkpoint {path} {reason}; {advice}")


def read_checkpoint(path: Path) -> dict:
    """Return the contents of a checkpoint written by `save_checkpoint` (see `safe_load`: a pickle that would
    run code is refused); a file that is not such a checkpoint raises CheckpointError naming it."""
    advice = "delete it (or rerun with --fresh) to start the run over"
    blob = safe_load(path, advice)
    missing = [k for k in ("model", "optimizer", "loop", "engine", "rng", "extra")
               if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing} (not written by "
                              f"epi.training.checkpoints.save_checkpoint); {advice}")
    return blob


def load_checkpoint(path: Path | dict, *, model, optimizer, engine=None, scaler=None) -> Tuple[LoopState, dict]:
    """Restore what save_checkpoint wrote (a path, or the dict `read_checkpoint` returned); return
    (loop state, extra)."""
    blob = path if isinstance(path, dict) else read_checkpoint(path)
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    if engine is not None and blob["engine"] is not None:
        engine.load_state_dict(blob["engine"])
    set_rng_state(blob["rng"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    return LoopState(**blob["loop"]), blob["extra"]

"""Each method's results saved the moment it finishes, so a rerun (after a disconnect) skips it.

    <folder>/<method>/result.json   the results (JSON, NaN written as null) and the settings they came from
    <folder>/<method>/epi_state.pt  the engine state (EvolvingIsolation.state_dict()), EPI methods only

A rerun loads a finished method instead of training it, but only when its settings are the ones asked
for now: results of other settings are refused with what differs (change the folder, or delete it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from .. import jsonio

RESULT = "result.json"
ENGINE_STATE = "epi_state.pt"


def json_safe(value: Any) -> Any:
    """Return `value` as it reads back from strict JSON: tuples as lists, numpy/torch scalars as numbers,
    NaN/inf as None (epi.jsonio)."""
    return json.loads(jsonio.dumps(value))


def save_result(folder: str | Path, name: str, result: dict, settings: dict,
                engine_state: Optional[dict] = None) -> Path:
    """Return the folder `<folder>/<name>` after writing result.json (+ epi_state.pt) atomically."""
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    if engine_state is not None:
        import torch
        jsonio.atomic_write(out / ENGINE_STATE, lambda tmp: torch.save(engine_state, tmp))
    jsonio.write_json(out / RESULT, {"settings": settings, "result": result})  # last: its presence means finished
    return out


def load_result(folder: str | Path, name: str, settings: dict) -> Optional[dict]:
    """Return the saved result of `name`, or None when it has not finished; ValueError when it was made
    with other settings (naming the fields that differ)."""
    path = Path(folder) / name / RESULT
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: unreadable result ({err.msg}); delete it to rerun {name}") from None
    want = json_safe(settings)
    differ = sorted(k for k in set(want) | set(saved["settings"]) if want.get(k) != saved["settings"].get(k))
    if differ:
        pairs = ", ".join(f"{k}: saved {saved['settings'].get(k)!r} vs now {want.get(k)!r}" for k in differ)
        raise ValueError(f"{path} holds {name} run with other settings ({pairs}); use another output folder "
                         f"or delete {path.parent} to rerun it")
    return saved["result"]


def run_or_load(folder: str | Path, name: str, settings: dict, run: Callable[[], tuple[dict, Optional[dict]]],
                reuse: bool = True) -> tuple[dict, bool]:
    """Return (the result of `name`, whether it was loaded): the saved one (when `reuse`), or run() saved
    at once (replacing a saved one when not `reuse`)."""
    saved = load_result(folder, name, settings) if reuse else None
    if saved is not None:
        return saved, True
    result, engine_state = run()
    save_result(folder, name, result, settings, engine_state)
    return json_safe(result), False

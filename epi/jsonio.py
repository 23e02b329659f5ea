"""Files a reader can trust: strict JSON for records, and every file or folder written atomically.

Strict JSON: every file is standard JSON (RFC 8259) that any parser reads.

Python's `json` writes NaN and Infinity as the bare words `NaN`/`Infinity`, which strict parsers (and
`jq`, JavaScript, pandas' `orient="records"` readers) refuse. A record is a measurement, and a measurement
that is not a number (a diverged loss) is written as `null`; `json.dumps(..., allow_nan=False)` then
guarantees nothing non-standard slips through.

Atomic: `atomic_write` fills a temporary sibling and renames it over the target, so a reader (or a
parallel run writing the same entry) never sees half a file; every tmp-then-rename in the suite uses it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional


def finite(value: Any) -> Any:
    """Return `value` with every non-finite float (NaN, ±inf), at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _number(value: Any) -> Any:
    # numpy scalars, 0-d tensors and the like: what `default=float` did before, non-finite → null
    number = float(value)
    return number if math.isfinite(number) else None


def dumps(value: Any, **kwargs) -> str:
    """Return `value` as strict JSON text (non-finite numbers as null; anything float() reads as a number)."""
    return json.dumps(finite(value), allow_nan=False, default=_number, **kwargs)


def atomic_write(path: str | Path, write: Callable[[Path], Any], *,
                 unless: Optional[Callable[[Path], bool]] = None) -> Path:
    """Return `path` after `write(tmp)` filled a temporary sibling of it (a file or a folder) that then
    replaces `path` in one rename, so a reader never sees half of it.

    unless(path) true by then (a parallel writer finished first): that one is kept and ours dropped. A
    folder replaces an existing folder by removing it first (a rename cannot replace a non-empty folder).
    On an error the temporary is removed and the error raised."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if unless is None or not unless(path):
            if tmp.is_dir() and path.is_dir():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | Path, value: Any, indent: int = 1) -> Path:
    """Write `value` to `path` as strict JSON, atomically (a reader never sees half a file); return the path."""
    text = dumps(value, indent=indent) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))

"""Strict JSON for records: every file is standard JSON (RFC 8259) that any parser reads.

Python's `json` writes NaN and Infinity as the bare words `NaN`/`Infinity`, which strict parsers (and
`jq`, JavaScript, pandas' `orient="records"` readers) refuse. A record is a measurement, and a measurement
that is not a number (a diverged loss) is written as `null`; `json.dumps(..., allow_nan=False)` then
guarantees nothing non-standard slips through.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


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


def write_json(path: str | Path, value: Any, indent: int = 1) -> Path:
    """Write `value` to `path` as strict JSON, atomically (a reader never sees half a file); return the path."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps(value, indent=indent) + "\n")
    os.replace(tmp, path)
    return path

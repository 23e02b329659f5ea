"""Task records for EPI: the synthetic EPI-Mini abilities, real-dataset adapters, scorers, evaluation.

A record is a plain dict (docs/CONTRACTS.md): ``task``, ``id``, ``prompt`` or ``messages``,
``response`` (what SFT trains on) and ``answer`` (what the scorer compares), plus scorer extras such
as ``tests`` for code.

- ``load_task(name, source, split)`` reads records: ``data/epi_mini`` for the abilities, a local file
  or a hub id for the real datasets.
- ``generate(ability, n, seed, split, difficulty)`` draws synthetic records on the fly (training).
- ``score(name, prediction, record)`` returns a score in [0, 1].
- ``evaluate`` (from ``epi.tasks.evaluate``) and the SFT formatting helpers (from
  ``epi.tasks.formatting``, looked up on first use) are re-exported here; the submodules import
  each other directly, never this package, so importing any of them first works.
"""

from __future__ import annotations

import importlib
from typing import Any

from .evaluate import evaluate
from .real import REAL_TASKS, load_task
from .scoring import score
from .synthetic import ABILITIES, DEFAULT_DIFFICULTY, SPLITS, generate, split_of, write_dataset

__all__ = ["ABILITIES", "DEFAULT_DIFFICULTY", "REAL_TASKS", "SPLITS", "evaluate", "generate",
           "load_task", "score", "split_of", "write_dataset"]


def __getattr__(name: str) -> Any:
    # SFT formatting helpers (render, encode_sft, ...) are re-exported lazily: formatting imports torch
    if name.startswith("__"):
        raise AttributeError(name)
    formatting = importlib.import_module(".formatting", __name__)
    if name == "formatting":
        return formatting
    try:
        return getattr(formatting, name)
    except AttributeError:
        raise AttributeError(f"module 'epi.tasks' has no attribute {name!r}") from None

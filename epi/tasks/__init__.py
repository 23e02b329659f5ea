"""Task records for EPI: the synthetic EPI-Mini abilities, real-dataset adapters, scorers, evaluation.

A record is a plain dict (docs/CONTRACTS.md): ``task``, ``id``, ``prompt`` or ``messages``,
``response`` (what SFT trains on) and ``answer`` (what the scorer compares), plus scorer extras such
as ``tests`` for code.

- ``load_task(name, source, split)`` reads records: ``data/epi_mini`` for the abilities, a local file
  or a hub id for the real datasets.
- ``generate(ability, n, seed, split, difficulty)`` draws synthetic records on the fly (training).
- ``score(name, prediction, record)`` returns a score in [0, 1].
- ``evaluate`` (from ``epi.tasks.evaluate``) and the SFT formatting helpers (from
  ``epi.tasks.formatting``, looked up on first use) are re-exported here.
"""

from __future__ import annotations

import importlib
from typing import Any

from .real import REAL_TASKS, load_task
from .scoring import score
from .synthetic import ABILITIES, DEFAULT_DIFFICULTY, SPLITS, generate, split_of, write_dataset

__all__ = ["ABILITIES", "DEFAULT_DIFFICULTY", "REAL_TASKS", "SPLITS", "evaluate", "generate",
           "load_task", "score", "split_of", "write_dataset"]


try:
    # bound eagerly: a lazy wrapper would be replaced by the submodule object as soon as anything ran
    # `import epi.tasks.evaluate` (Python binds a submodule onto its package on first import)
    from .evaluate import evaluate
except ModuleNotFoundError as err:   # pragma: no cover - only while evaluate.py does not exist yet
    if err.name != f"{__name__}.evaluate":
        raise

    def evaluate(*args: Any, **kwargs: Any) -> dict[str, dict]:
        """Return per-task scores and loss; see ``epi.tasks.evaluate.evaluate``."""
        from .evaluate import evaluate as _evaluate

        return _evaluate(*args, **kwargs)


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

"""The hub table: where each real task lives on the Hugging Face hub, and how its rows are read.

``load_task(name, "hub", split)`` reads a real task through ``HUB``:

- split ``"train"`` (the default) is the dataset's training split; ``"test"`` is its evaluation split,
  or, for a dataset without one (CodeAlpaca, Alpaca), the last ``HELD_OUT`` rows of the training split,
  which training then must not reach (``load_task`` refuses a training slice that does);
- a slice may follow: ``"train[:2000]"``, ``"test[:200]"``; any other split name (``"validation"``,
  ``"train_sft[:10]"``) goes to ``datasets.load_dataset`` unchanged.

Rows are read with ``datasets.load_dataset(hub_id, config, split=...)``. A script dataset
(``lucasmccabe/logiqa``), which ``datasets`` >= 4 refuses to run, is read from the hub's own parquet
export instead (revision ``refs/convert/parquet``).

Offline, ``EPI_HUB_MIRROR=<folder>`` (or ``mirror=``) makes every hub read go to ``<folder>/<hub id>``
through the same ``datasets.load_dataset`` call, and the parquet export to
``<folder>/<hub id>@refs--convert--parquet``. ``epi.tasks.mirror.write_mirror`` writes such a folder
with small stand-in datasets in each dataset's original schema.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

MIRROR_ENV = "EPI_HUB_MIRROR"
PARQUET_REVISION = "refs/convert/parquet"
HELD_OUT = 1000  # rows at the end of a training split that stand in for a missing evaluation split
# datasets caches a local folder by its name and file patterns, not its contents: a mirror keeps its own
# cache, which write_mirror empties, so a rewritten mirror is never read stale
MIRROR_CACHE = ".datasets_cache"


@dataclass(frozen=True)
class HubDataset:
    """Where a real task's rows live: hub id, config, training split and evaluation split."""
    hub_id: str
    config: Optional[str]
    train_split: str
    eval_split: Optional[str]  # None: the last HELD_OUT rows of the training split


HUB = {
    "gsm8k": HubDataset("openai/gsm8k", "main", "train", "test"),
    "codealpaca": HubDataset("sahil2801/CodeAlpaca-20k", None, "train", None),
    "logiqa": HubDataset("lucasmccabe/logiqa", None, "train", "test"),
    "alpaca": HubDataset("tatsu-lab/alpaca", None, "train", None),
    "ultrachat": HubDataset("HuggingFaceH4/ultrachat_200k", None, "train_sft", "test_sft"),
}

_SPLIT = re.compile(r"(?P<name>[\w.-]+)(?P<slice>\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?")


def hub_entry(task: str) -> HubDataset:
    """Return the hub table's entry of a real task (ValueError naming the known tasks otherwise)."""
    if task not in HUB:
        raise ValueError(f"task {task!r} has no hub dataset; the hub table (epi.tasks.hub.HUB) knows "
                         f"{', '.join(HUB)}")
    return HUB[task]


def mirror_folder(mirror: Optional[str | Path] = None) -> Optional[Path]:
    """Return the offline mirror folder: `mirror`, else $EPI_HUB_MIRROR, else None (the network)."""
    value = mirror if mirror is not None else os.environ.get(MIRROR_ENV)
    return Path(value).expanduser() if value else None


def mirror_path(mirror: Path, hub_id: str, revision: Optional[str] = None) -> Path:
    """Return the folder of `hub_id` (at `revision`) inside a mirror."""
    name = hub_id if revision is None else f"{hub_id}@{revision.replace('/', '--')}"
    return mirror / name


def resolve_split(task: str, split: Optional[str]) -> tuple[str, Optional[slice], Optional[int]]:
    """Return (the split to ask `datasets` for, a slice to apply afterwards, the training rows allowed).

    The third value is set when `split` reads the training split of a dataset whose held-out rows are
    its tail: the end of the read must stay below the split's length minus HELD_OUT.
    """
    entry = hub_entry(task)
    match = _SPLIT.fullmatch(split or "train")
    if match is None:
        raise ValueError(f"split {split!r} for {task}: expected a name with an optional [start:stop] slice, "
                         "e.g. 'train', 'test[:200]'")
    name, suffix = match["name"], match["slice"] or ""
    if name == "test" and entry.eval_split is None:
        start = int(match["start"]) if match["start"] else None
        stop = int(match["stop"]) if match["stop"] else None
        if (start or 0) < 0 or (stop or 0) < 0:
            raise ValueError(f"split {split!r}: the held-out rows of {task} take non-negative slices only")
        return f"{entry.train_split}[-{HELD_OUT}:]", slice(start, stop), None
    if name == "test":
        return entry.eval_split + suffix, None, None
    if name == "train":
        guard = entry.eval_split is None
        if guard and not suffix:  # the whole split minus its held-out tail
            return f"{entry.train_split}[:-{HELD_OUT}]", None, None
        return entry.train_split + suffix, None, (HELD_OUT if guard else None)
    return split, None, None


def _is_script_error(err: Exception) -> bool:
    text = str(err)
    return "script" in text or "trust_remote_code" in text


def read_rows(hub_id: str, config: Optional[str] = None, split: Optional[str] = None,
              mirror: Optional[str | Path] = None) -> Any:
    """Return the rows of `split` of a hub dataset (a `datasets.Dataset`, or what `load_dataset` gives).

    Reads `<mirror>/<hub_id>` instead of the network when a mirror is set; falls back to the hub's
    parquet export for a script dataset.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(f"loading {hub_id!r} from the hub needs `pip install datasets` "
                          "(or pass a local file path)") from None
    folder = mirror_folder(mirror)
    source = str(mirror_path(folder, hub_id)) if folder is not None else hub_id
    if folder is not None and not Path(source).is_dir():
        raise FileNotFoundError(f"the hub mirror {folder} has no {hub_id} (looked for {source}); write a "
                                "stand-in mirror with epi.tasks.mirror.write_mirror(folder), or unset "
                                f"{MIRROR_ENV} to read the hub")
    args = (config,) if config else ()
    kwargs = {"cache_dir": str(folder / MIRROR_CACHE)} if folder is not None else {}
    logger.info("loading %s (config=%s, split=%s) from %s", hub_id, config, split, source)
    try:
        return datasets.load_dataset(source, *args, split=split, **kwargs)
    except (RuntimeError, ValueError) as err:  # datasets >= 4: "Dataset scripts are no longer supported"
        if not _is_script_error(err):
            raise
    logger.info("%s is a script dataset: reading its parquet export (%s)", hub_id, PARQUET_REVISION)
    if folder is not None:
        return datasets.load_dataset(str(mirror_path(folder, hub_id, PARQUET_REVISION)), *args, split=split,
                                     **kwargs)
    return datasets.load_dataset(hub_id, *args, split=split, revision=PARQUET_REVISION)


def split_rows(rows: Any, split_name: str) -> Optional[int]:
    """Return the full length of `split_name` as the dataset's info records it (None when unknown)."""
    splits = getattr(getattr(rows, "info", None), "splits", None) or {}
    info = splits.get(split_name) if hasattr(splits, "get") else None
    return getattr(info, "num_examples", None) or None


def check_train_slice(task: str, split: str, n_read: int, rows: Any) -> None:
    """Raise ValueError when a training read of `task` reaches into the held-out tail of its split."""
    entry = hub_entry(task)
    total = split_rows(rows, entry.train_split)
    match = _SPLIT.fullmatch(split)
    start = int(match["start"]) if match and match["start"] else 0
    if total is None:  # the dataset does not say how long the split is
        return
    end = (start + total if start < 0 else start) + n_read
    if end > total - HELD_OUT:
        raise ValueError(f"{task}: training split {split!r} reads up to row {end} of {entry.hub_id} "
                         f"[{entry.train_split}] ({total} rows), into the last {HELD_OUT} rows held out for "
                         f"evaluation; read at most {max(0, total - HELD_OUT)} training rows (train_records)")

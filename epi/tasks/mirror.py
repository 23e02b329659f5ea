"""An offline stand-in for the hub: small datasets in each real dataset's original schema.

``write_mirror(folder)`` writes, for every entry of the hub table (``epi.tasks.hub.HUB``), a folder
``<folder>/<hub id>`` laid out like the hub repository (a README with the ``configs`` section, parquet
files per split), so that ``EPI_HUB_MIRROR=<folder>`` sends the real loading code,
``datasets.load_dataset(...)``, to it. ``lucasmccabe/logiqa`` is mirrored as the hub has it: a loading
script at the main revision (which ``datasets`` >= 4 refuses) and the parquet export next to it.

The contents are EPI-Mini abilities rewritten into the real schemas (GSM8K from ``math`` with the
``<<a+b=c>>`` calculator annotations, CodeAlpaca from ``code``, LogiQA from ``logic``, Alpaca from
``instruction``, UltraChat from ``chat``), so a tiny model can learn them: the mirror exercises the
real-data code path, not the real data.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .hub import HELD_OUT, HUB, MIRROR_CACHE, PARQUET_REVISION, mirror_path
from .synthetic import generate

_STEP = re.compile(r"^(\d+ ?[-+*/] ?\d+)=(\d+)$")
_OPTION = re.compile(r"([A-D])\) (.*?)(?= [A-D]\) |$)")
_ALPACA_TEXT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")


def _gsm8k(record: dict) -> dict:
    lines = [(f"{m[1]}=<<{m[1]}={m[2]}>>{m[2]}" if (m := _STEP.match(line)) else line)
             for line in record["response"].splitlines()]
    return {"question": record["prompt"], "answer": "\n".join(lines)}


def _codealpaca(record: dict) -> dict:
    return {"instruction": record["prompt"], "input": "", "output": record["response"]}


def _logiqa(record: dict) -> dict:
    statement, options = record["prompt"].split("\n", 1)
    context, _, query = statement.rpartition(". ")
    labelled = dict(_OPTION.findall(options))
    return {"context": context + ".", "query": query, "options": [labelled[k] for k in "ABCD"],
            "correct_option": "ABCD".index(record["answer"])}


def _alpaca(record: dict) -> dict:
    instruction, _, extra = record["prompt"].partition(": ")
    row = {"instruction": instruction + "." if extra else instruction, "input": extra, "output": record["response"]}
    return {**row, "text": _ALPACA_TEXT.format(**row)}


def _ultrachat(record: dict) -> dict:
    messages = [dict(m) for m in record["messages"]] + [{"role": "assistant", "content": record["response"]}]
    ident = hashlib.sha256(record["id"].encode()).hexdigest()
    return {"prompt": messages[0]["content"], "prompt_id": ident, "messages": messages}


# task -> (EPI-Mini ability, row writer in the hub dataset's schema)
SOURCES: Dict[str, tuple[str, Callable[[dict], dict]]] = {
    "gsm8k": ("math", _gsm8k), "codealpaca": ("code", _codealpaca), "logiqa": ("logic", _logiqa),
    "alpaca": ("instruction", _alpaca), "ultrachat": ("chat", _ultrachat)}


def mirror_rows(task: str, n_train: int, n_eval: int, seed: int = 0) -> Dict[str, List[dict]]:
    """Return {hub split: rows} of one task's stand-in; a dataset without an evaluation split gets
    n_train rows followed by the HELD_OUT rows that stand in for one (evaluation reads their start)."""
    ability, write = SOURCES[task]
    entry = HUB[task]
    train = [write(r) for r in generate(ability, n_train, seed=seed, split="train")]
    held = [write(r) for r in generate(ability, max(n_eval, HELD_OUT if entry.eval_split is None else 0),
                                       seed=seed, split="test")]
    if entry.eval_split is None:
        return {entry.train_split: train + held}
    return {entry.train_split: train, entry.eval_split: held[:n_eval]}


def _write_parquet(rows: List[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def _readme(hub_id: str, config: str, splits: List[str]) -> str:
    files = "".join(f"  - split: {s}\n    path: {config}/{s}-*\n" for s in splits)
    return (f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n"
            f"Offline stand-in for {hub_id} (written by epi.tasks.mirror.write_mirror): EPI-Mini records in "
            "the dataset's original schema.\n")


def write_mirror(folder: str | Path, n_train: int = 64, n_eval: int = 16, seed: int = 0,
                 tasks: Optional[List[str]] = None) -> Path:
    """Return `folder` after writing a stand-in hub dataset per task (default: every task of HUB)."""
    folder = Path(folder)
    shutil.rmtree(folder / MIRROR_CACHE, ignore_errors=True)  # built from the files this call replaces
    for task in tasks or list(HUB):
        entry = HUB[task]
        repo = mirror_path(folder, entry.hub_id)
        repo.mkdir(parents=True, exist_ok=True)
        splits = mirror_rows(task, n_train, n_eval, seed)
        if task == "logiqa":  # a script dataset on the hub: the rows live in its parquet export
            (repo / f"{repo.name}.py").write_text("# stands for the hub's loading script, which datasets >= 4 "
                                                  "refuses to run\n")
            export = mirror_path(folder, entry.hub_id, PARQUET_REVISION)
            for split, rows in splits.items():
                _write_parquet(rows, export / "default" / split / "0000.parquet")
            continue
        config = entry.config or "default"
        for split, rows in splits.items():
            _write_parquet(rows, repo / config / f"{split}-00000-of-00001.parquet")
        (repo / "README.md").write_text(_readme(entry.hub_id, config, list(splits)))
    return folder

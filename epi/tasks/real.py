"""Load task records from EPI-Mini files, local copies of the real datasets, or the Hugging Face hub.

``load_task(name, source, split)`` maps every source into the record shape of docs/CONTRACTS.md.

Real datasets (``REAL_TASKS``):

- ``gsm8k`` -- ``{"question", "answer"}``; ``response`` is the worked solution with the ``<<48/2=24>>``
  calculator annotations stripped (they are tool calls, not text a model should learn to write);
  ``answer`` is the number after ``####`` without thousands separators.
- ``codealpaca`` / ``alpaca`` -- ``{"instruction", "input", "output"}`` (Alpaca's extra ``text`` field
  is ignored); ``prompt`` is the instruction, plus a blank line and the input when there is one;
  ``response`` = ``answer`` = the reference output, scored with token F1 (see ``epi.tasks.scoring``).
- ``logiqa`` -- the original 8-line text format (blank line, answer letter, context, question, four
  options ``A.``..``D.``) or hub rows ``{"context", "query", "options", "correct_option"}``;
  ``response`` is ``"Answer: B"`` like the synthetic ``logic`` ability, ``answer`` the letter.
- ``ultrachat`` -- ``{"prompt", "prompt_id", "messages"}``; ``messages`` keeps the turns before the
  last assistant turn, which becomes ``response`` and ``answer``.

A malformed record raises ``ValueError`` naming the file and line (JSONL, text) or the record index
(JSON array, hub rows); so do a byte that is not UTF-8 (a UTF-8 byte-order mark is fine), a file
without records, and a code record whose ``tests`` are not a non-empty list of ``[args, expected]``.
Unknown extra fields are ignored.

Local path or hub id? A ``source`` that does not exist is a hub id only if it could be one: a path
that starts with ``.``, ``/`` or ``~``, holds a backslash or more than one ``/``, ends with a data-file
suffix (``.jsonl``, ``.json``, ``.txt``, ...), or whose folder exists here (``data/gsm8k`` when there is
a ``data/`` folder) raises ``FileNotFoundError`` before any network call.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .hub import HUB, check_train_slice, hub_entry, read_rows, resolve_split
from .sandbox import check_tests
from .synthetic import ABILITIES

logger = logging.getLogger(__name__)

REAL_TASKS = tuple(HUB)  # gsm8k, codealpaca, logiqa, alpaca, ultrachat: the hub table's tasks
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_ROLES = ("user", "assistant")


def _text(row: dict, key: str) -> str:
    if key not in row:
        raise ValueError(f"missing field {key!r}")
    if not isinstance(row[key], str):
        raise ValueError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]


# ------------------------------------------------------------------------------------ row adapters
def _gsm8k(row: dict, index: int) -> dict:
    solution = _text(row, "answer")
    if "####" not in solution:
        raise ValueError("GSM8K answer has no '#### <number>' line")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not re.fullmatch(r"-?\d+(\.\d+)?", final):
        raise ValueError(f"GSM8K final answer {final!r} is not a number")
    return {"task": "gsm8k", "id": f"gsm8k-{index}", "prompt": _text(row, "question"),
            "response": _CALCULATOR.sub("", solution), "answer": final}


def _instruction_adapter(task: str) -> Callable[[dict, int], dict]:
    def adapt(row: dict, index: int) -> dict:
        instruction, output = _text(row, "instruction"), _text(row, "output")
        extra = _text(row, "input") if "input" in row else ""
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return {"task": task, "id": f"{task}-{index}", "prompt": prompt, "response": output,
                "answer": output}
    return adapt


def _strip_label(option: str, label: str) -> str:
    option = option.strip()
    return option[2:].strip() if option[:2].upper() == f"{label}." else option


def _logiqa_record(index: int, letter: str, context: str, question: str, options: list[str]) -> dict:
    letter = letter.strip().upper()
    if letter not in ("A", "B", "C", "D"):
        raise ValueError(f"answer must be a letter a-d, got {letter!r}")
    # options are labelled by position: the published file has a few lines whose "C." drifted into
    # the text ("Most of the spirits on the C.S City market"), so the line order is the ground truth
    labelled = [f"{label}. {_strip_label(o, label)}" for label, o in zip("ABCD", options)]
    prompt = "\n".join([context.strip(), question.strip(), *labelled])
    return {"task": "logiqa", "id": f"logiqa-{index}", "prompt": prompt, "response": f"Answer: {letter}",
            "answer": letter}


def _logiqa(row: dict, index: int) -> dict:
    options = row.get("options")
    if not isinstance(options, list) or len(options) != 4:
        raise ValueError("field 'options' must be a list of four strings")
    correct = row.get("correct_option")
    if not isinstance(correct, int) or not 0 <= correct < 4:
        raise ValueError(f"field 'correct_option' must be an int in 0..3, got {correct!r}")
    return _logiqa_record(index, "ABCD"[correct], _text(row, "context"), _text(row, "query"),
                          [str(o) for o in options])


def _ultrachat(row: dict, index: int) -> dict:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': 'user'|'assistant', 'content': str}}")
        turns.append({"role": m["role"], "content": m["content"]})
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None or not any(m["role"] == "user" for m in turns[:last]):
        raise ValueError("needs a user turn followed by an assistant turn")
    ident = row.get("prompt_id") if isinstance(row.get("prompt_id"), str) else f"ultrachat-{index}"
    return {"task": "ultrachat", "id": ident, "messages": turns[:last], "response": turns[last]["content"],
            "answer": turns[last]["content"]}


def _synthetic(row: dict, index: int) -> dict:
    for key in ("task", "id", "response", "answer"):
        _text(row, key)
    if ("prompt" in row) == ("messages" in row):
        raise ValueError("needs exactly one of 'prompt' or 'messages'")
    if "prompt" in row:
        _text(row, "prompt")
    elif not isinstance(row["messages"], list) or not all(
            isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)
            for m in row["messages"]):
        raise ValueError("'messages' must be a list of {'role': 'user'|'assistant', 'content': str}")
    if row["task"] == "code":
        if "tests" not in row:
            raise ValueError("code records need a 'tests' list of [args, expected]")
        check_tests(row["tests"])       # scoring would fail on them much later, far from the file
    return row


_ADAPTERS: dict[str, Callable[[dict, int], dict]] = {
    "gsm8k": _gsm8k, "codealpaca": _instruction_adapter("codealpaca"), "logiqa": _logiqa,
    "alpaca": _instruction_adapter("alpaca"), "ultrachat": _ultrachat,
    **{ability: _synthetic for ability in ABILITIES}}


# ------------------------------------------------------------------------------------------ readers
def _decode(raw: bytes, path: Path, first_line: int = 1) -> str:
    """Return ``raw`` decoded as UTF-8; a bad byte raises ``ValueError`` naming file, line and byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}); "
                         "re-save the file as UTF-8") from None


def _read_text(path: Path) -> str:
    return _decode(path.read_bytes().removeprefix(codecs.BOM_UTF8), path)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line = _decode(raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw, path, number)
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: malformed record: invalid JSON ({err.msg})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: malformed file: invalid JSON ({err.msg})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield f"{path}: record {index}", row


def _logiqa_txt(path: Path) -> list[dict]:
    """Return LogiQA records from the original text format: 8 lines per item, the first one blank."""
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for start in range(0, len(lines), 8):
        block = lines[start:start + 8]
        where = f"{path}:{start + 1}"
        if len(block) < 8:
            raise ValueError(f"{where}: malformed LogiQA item: expected 8 lines, file ends after {len(block)}")
        if block[0].strip():
            raise ValueError(f"{where}: malformed LogiQA item: expected a blank separator line")
        try:
            records.append(_logiqa_record(len(records), block[1], block[2], block[3], block[4:8]))
        except ValueError as err:
            raise ValueError(f"{path}:{start + 2}: malformed LogiQA item: {err}") from None
    return records


def _adapt_all(name: str, rows: Iterable[tuple[str, object]]) -> list[dict]:
    adapt, records = _ADAPTERS[name], []
    for where, row in rows:
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            records.append(adapt(row, len(records)))
        except ValueError as err:
            raise ValueError(f"{where}: malformed {name} record: {err}") from None
    return records


def _read_file(name: str, path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _adapt_all(name, _jsonl_rows(path))
    elif suffix == ".json":
        records = _adapt_all(name, _json_rows(path))
    elif suffix == ".txt" and name == "logiqa":
        records = _logiqa_txt(path)
    else:
        raise ValueError(f"cannot read {path} for task {name!r}: expected .jsonl, .json"
                         + (" or LogiQA .txt" if name == "logiqa" else ""))
    if not records:         # an empty file would train and evaluate on nothing without a word
        raise ValueError(f"no records in {path} (the file is empty or an empty JSON array); "
                         f"point at a file that holds {name} records, or write them again")
    return records


_DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zip")


def _local_path_reason(source: str | Path) -> str | None:
    """Return why ``source`` can only be a local path (the rule in the module docstring), else None."""
    if isinstance(source, Path):
        return "is a pathlib.Path"
    source = str(source)
    if source.startswith((".", "/", "~")):
        return "starts with '.', '/' or '~'"
    if "\\" in source or source.count("/") > 1:
        return "has a backslash or more than one '/', which a hub id (owner/name) never has"
    if source.lower().endswith(_DATA_SUFFIXES):
        return f"ends with the file suffix {Path(source).suffix!r}"
    if "/" in source and Path(source).parent.is_dir():
        return f"its folder {Path(source).parent.as_posix()!r} exists here"
    return None


def _find_file(name: str, folder: Path, split: str | None) -> Path:
    """Return the one data file for ``name`` in ``folder`` or ``folder/name``, preferring ``split``."""
    candidates = sorted(p for d in (folder, folder / name) if d.is_dir() for p in d.iterdir()
                        if p.suffix.lower() in (".jsonl", ".json", ".txt") and p.is_file())
    if split is not None:
        candidates = [p for p in candidates if split.lower() in p.name.lower()]
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise ValueError(f"expected exactly one {name} data file in {folder}"
                         f"{f' matching split {split!r}' if split else ''}; found: {found}")
    return candidates[0]


def _from_hub(name: str, hub_id: str, split: str | None) -> list[dict]:
    """Return the records of an explicit hub id (the table's config; split default: its training split)."""
    entry = hub_entry(name)
    split = split or entry.train_split
    rows = read_rows(hub_id, entry.config, split)
    return _adapt_all(name, ((f"{hub_id} [{split}]: record {i}", dict(row)) for i, row in enumerate(rows)))


def _from_table(name: str, split: str | None) -> list[dict]:
    """Return the records of ``split`` ("train", "test", a slice of either, or a raw split) via ``HUB``."""
    entry = hub_entry(name)
    hub_split, after, guard = resolve_split(name, split)
    rows = read_rows(entry.hub_id, entry.config, hub_split)
    records = _adapt_all(name, ((f"{entry.hub_id} [{hub_split}]: record {i}", dict(row))
                                for i, row in enumerate(rows)))
    if guard is not None:
        check_train_slice(name, hub_split, len(records), rows)
    return records[after] if after is not None else records


def load_task(name: str, source: str | Path, split: str | None = None) -> list[dict]:
    """Return the records of task ``name`` read from ``source``.

    ``name``: an EPI-Mini ability (``ABILITIES``) or a real dataset (``REAL_TASKS``).
    ``source``:

    - for an ability, a directory written by ``python -m epi data`` (reads
      ``<source>/<name>/<split>.jsonl``, split default "train") or one JSONL file;
    - for a real dataset, ``"hub"`` (the hub table ``epi.tasks.hub.HUB``: split ``"train"`` or
      ``"test"``, optionally sliced, e.g. ``"train[:2000]"``; ``$EPI_HUB_MIRROR`` reads an offline
      mirror), a local file (``.jsonl``, ``.json`` array, LogiQA ``.txt``), a directory holding exactly
      one such file (after filtering by ``split`` when given), or else a hub id such as
      ``"openai/gsm8k"`` loaded with ``datasets.load_dataset``.
    """
    if name not in _ADAPTERS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(ABILITIES + REAL_TASKS)}")
    path = Path(source)
    if name in ABILITIES:
        if path.is_dir():
            path = path / name / f"{split or 'train'}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no {name} records at {path}; create them with "
                                    f"`python -m epi data --out {Path(source).as_posix()} --seed 0`")
        return _read_file(name, path)
    if str(source) == "hub":
        return _from_table(name, split)
    path = path.expanduser()
    if path.is_dir():
        return _read_file(name, _find_file(name, path, split))
    if path.is_file():
        return _read_file(name, path)
    reason = _local_path_reason(source)
    if reason is not None:          # a mistyped path must not turn into minutes of hub retries
        raise FileNotFoundError(
            f"no {name} data at {path}: {str(source)!r} is a local path (it {reason}) and nothing is there. "
            f"Check the spelling, or save the {name} rows there as .jsonl or .json"
            f"{' (or LogiQA .txt)' if name == 'logiqa' else ''}; to read the hub instead, pass a hub id "
            "of the form owner/name as on huggingface.co/datasets")
    return _from_hub(name, str(source), split)

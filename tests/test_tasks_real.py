"""Real-dataset adapters: GSM8K, CodeAlpaca, LogiQA, Alpaca, UltraChat into the record shape."""

import json
import sys
import types
from pathlib import Path

import pytest

from epi.tasks import ABILITIES, REAL_TASKS, load_task, score

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / ".." / "shared" / "data" / "real"
FIXTURES = REPO / "tests" / "fixtures"

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real is not on this machine")


@needs_real
def test_gsm8k_answer_is_the_number_after_hashes_and_annotations_are_stripped():
    records = load_task("gsm8k", REAL / "gsm8k" / "train_head300.jsonl")
    assert len(records) == 300
    first = records[0]
    assert first["prompt"].startswith("Natalia sold clips to 48 of her friends")
    assert first["answer"] == "72"
    assert first["response"].endswith("#### 72") and "<<" not in first["response"]
    assert "48/2 = 24 clips" in first["response"]
    assert all("<<" not in r["response"] and "," not in r["answer"] for r in records)
    assert score("gsm8k", first["response"], first) == 1.0
    assert score("gsm8k", "so the answer is 72", first) == 1.0       # no '####': last number
    assert score("gsm8k", "#### 73", first) == 0.0


@needs_real
def test_gsm8k_directory_source_finds_its_one_file():
    assert load_task("gsm8k", REAL / "gsm8k", split="train")[1]["answer"] == "10"


@needs_real
def test_codealpaca_prompt_joins_instruction_and_input():
    records = load_task("codealpaca", REAL / "codealpaca" / "code_alpaca_head300.json")
    assert len(records) == 300
    first = records[0]
    assert first["prompt"] == ("What are the distinct values from the given list?\n\n"
                               "dataList = [3, 9, 3, 5, 7, 9, 5]")
    assert first["answer"] == first["response"] == "The distinct values from the given list are 3, 5, 7 and 9."
    assert score("codealpaca", first["answer"], first) == 1.0
    assert 0.0 < score("codealpaca", "the distinct values are 3 5 7 9", first) < 1.0


@needs_real
def test_logiqa_text_format_gives_uppercase_letters_and_four_labelled_options():
    records = load_task("logiqa", REAL / "logiqa" / "Eval_head100.txt")
    assert len(records) == 100
    assert [r["answer"] for r in records[:3]] == ["A", "A", "D"]
    first = records[0]
    assert first["prompt"].startswith("Black Americans are twice as likely")
    assert [line[:2] for line in first["prompt"].splitlines()[-4:]] == ["A.", "B.", "C.", "D."]
    assert first["response"] == "Answer: A"
    assert score("logiqa", "Answer: a", first) == 1.0 and score("logiqa", "B", first) == 0.0


def test_ultrachat_fixture_ends_at_the_last_assistant_turn():
    records = load_task("ultrachat", FIXTURES / "ultrachat_sample.jsonl")
    assert [r["id"] for r in records] == ["uc-0001", "uc-0002", "uc-0003"]
    second = records[1]
    assert second["response"] == second["answer"] == "11 is a prime number larger than 10."
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert "prompt" not in second and "score_chosen" not in second
    assert score("ultrachat", second["response"], second) == 1.0
    assert score("ultrachat", "Paris", second) == 0.0


def test_alpaca_fixture_ignores_the_preformatted_text_field():
    records = load_task("alpaca", FIXTURES / "alpaca_sample.json")
    assert records[0]["prompt"] == "Give three tips for staying healthy."
    assert records[1]["prompt"] == "Reverse the word.\n\nstressed"
    assert records[1]["answer"] == "desserts" and "text" not in records[1]
    assert score("alpaca", "Desserts.", records[1]) == 1.0      # normalised: case and punctuation


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    good = json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"})
    path = _write(tmp_path / "gsm.jsonl", [good, good, json.dumps({"question": "no answer"})])
    with pytest.raises(ValueError, match=r"gsm\.jsonl:3: .*'answer'"):
        load_task("gsm8k", path)
    _write(path, [good, "{not json"])
    with pytest.raises(ValueError, match=r"gsm\.jsonl:2: .*invalid JSON"):
        load_task("gsm8k", path)
    _write(path, [json.dumps({"question": "q", "answer": "no final line"})])
    with pytest.raises(ValueError, match=r"gsm\.jsonl:1: .*####"):
        load_task("gsm8k", path)


def test_malformed_ultrachat_messages_are_named_by_line(tmp_path):
    ok = {"prompt": "hi", "prompt_id": "a", "messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]}
    only_user = dict(ok, messages=[{"role": "user", "content": "hi"}])
    bad_role = dict(ok, messages=[{"role": "robot", "content": "hi"}])
    for bad in (only_user, bad_role):
        path = _write(tmp_path / "uc.jsonl", [json.dumps(ok), json.dumps(bad)])
        with pytest.raises(ValueError, match=r"uc\.jsonl:2: malformed ultrachat record"):
            load_task("ultrachat", path)


def test_malformed_json_array_record_is_named_by_index(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"},
                                {"instruction": "c", "input": ""}]))
    with pytest.raises(ValueError, match=r"alpaca\.json: record 1: .*'output'"):
        load_task("alpaca", path)


def test_malformed_logiqa_item_is_named_by_line(tmp_path):
    item = ["", "b", "Context.", "Question?", "A.one", "B.two", "C.three", "D.four"]
    path = _write(tmp_path / "Eval.txt", item + ["", "e"] + item[2:])
    with pytest.raises(ValueError, match=r"Eval\.txt:10: .*letter a-d"):
        load_task("logiqa", path)
    _write(path, item + item[:5])
    with pytest.raises(ValueError, match=r"Eval\.txt:9: .*8 lines"):
        load_task("logiqa", path)
    _write(path, item)
    assert load_task("logiqa", path)[0]["prompt"].splitlines()[2:] == ["A. one", "B. two", "C. three", "D. four"]


def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="known tasks: .*gsm8k.*ultrachat") as err:
        load_task("mmlu", FIXTURES)
    assert all(name in str(err.value) for name in ABILITIES + REAL_TASKS)
    with pytest.raises(ValueError, match="known tasks"):
        score("mmlu", "x", {"answer": "x"})


def test_every_task_name_has_a_scorer_in_the_unit_interval():
    record = {"answer": "7", "tests": [[[1], 1]]}
    for name in ABILITIES + REAL_TASKS:
        assert 0.0 <= score(name, "def f(x): return x", record) <= 1.0


def test_hub_id_goes_through_datasets_load_dataset(monkeypatch):
    calls = []

    def load_dataset(path, *args, split=None):
        calls.append((path, args, split))
        return [{"context": "C.", "query": "Q?", "options": ["w", "x", "y", "z"], "correct_option": 2}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    records = load_task("logiqa", "lucasmccabe/logiqa", split="test")
    assert calls == [("lucasmccabe/logiqa", (), "test")]
    assert records[0]["answer"] == "C" and records[0]["prompt"].endswith("D. z")
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset",
                        lambda path, config, split=None: calls.append((path, config, split)) or [])
    assert load_task("gsm8k", "openai/gsm8k") == []
    assert calls[-1] == ("openai/gsm8k", "main", "train")


def test_bad_hub_row_is_named_by_index(monkeypatch):
    rows = [{"question": "q", "answer": "#### 1"}, {"question": "q"}]
    monkeypatch.setitem(sys.modules, "datasets",
                        types.SimpleNamespace(load_dataset=lambda path, config, split=None: rows))
    with pytest.raises(ValueError, match=r"openai/gsm8k \[train\]: record 1"):
        load_task("gsm8k", "openai/gsm8k")

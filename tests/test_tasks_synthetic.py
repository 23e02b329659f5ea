"""EPI-Mini: determinism, disjoint splits, the difficulty knob, exact scorers, the committed sample."""

import json
import string
from pathlib import Path

import pytest

from epi.tasks import ABILITIES, SPLITS, generate, load_task, score, split_of, write_dataset
from epi.tasks.synthetic import canonical_prompt

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "data" / "epi_mini"
ALLOWED = set(string.printable[:95]) | {"\n"}       # printable ASCII 32..126 plus newline
N = 60


def _texts(record):
    turns = record.get("messages", [{"content": record.get("prompt", "")}])
    return [m["content"] for m in turns] + [record["response"], record["answer"]]


@pytest.mark.parametrize("ability", ABILITIES)
def test_same_seed_gives_same_records_and_other_seed_differs(ability):
    a = generate(ability, N, seed=3, split="train")
    assert a == generate(ability, N, seed=3, split="train")
    assert a[:10] == generate(ability, 10, seed=3, split="train")           # prefix-stable
    assert [canonical_prompt(r) for r in a] != [canonical_prompt(r) for r in generate(ability, N, seed=4)]


@pytest.mark.parametrize("ability", ABILITIES)
def test_splits_never_share_a_prompt(ability):
    prompts = {s: {canonical_prompt(r) for r in generate(ability, N, seed=0, split=s)} for s in SPLITS}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    for split, found in prompts.items():                   # the split is a function of the prompt
        assert {split_of(p) for p in found} == {split}


@pytest.mark.parametrize("ability", ABILITIES)
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_records_follow_the_contract_and_are_plain_ascii(ability, difficulty):
    records = generate(ability, 20, seed=1, split="validation", difficulty=difficulty, unique=True)
    assert len({r["id"] for r in records}) == len(records)
    assert len({canonical_prompt(r) for r in records}) == len(records)
    for r in records:
        assert r["task"] == ability
        assert ("prompt" in r) != ("messages" in r)
        assert all(set(text) <= ALLOWED for text in _texts(r))
        assert json.loads(json.dumps(r)) == r


@pytest.mark.parametrize("ability", ABILITIES)
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_reference_response_scores_one(ability, difficulty):
    for r in generate(ability, 15, seed=2, split="test", difficulty=difficulty):
        assert score(ability, r["response"], r) == 1.0, r


@pytest.mark.parametrize("ability,wrong", [
    ("math", "1+1=2\n#### 99999"), ("math", "no final line 7"), ("code", "def f(x): return None"),
    ("instruction", "zzzzzzzzzzzz"), ("chat", "I do not know."), ("logic", "I cannot tell."),
])
def test_wrong_predictions_score_zero(ability, wrong):
    for r in generate(ability, 15, seed=2, split="test"):
        assert score(ability, wrong, r) == 0.0


def test_logic_scorer_reads_the_chosen_letter_only():
    r = generate("logic", 1, seed=0, split="test")[0]
    other = next(letter for letter in "ABCD" if letter != r["answer"])
    assert score("logic", f"Answer: {r['answer']}", r) == 1.0
    assert score("logic", r["answer"], r) == 1.0
    assert score("logic", f"Answer: {other}", r) == 0.0


def test_code_scorer_runs_the_prediction_on_the_hidden_tests():
    r = generate("code", 1, seed=0, split="test")[0]
    tests = [[[1], 2], [[5], 6], [[0], 0]]
    assert score("code", "def f(x): return x+1", dict(r, tests=tests)) == pytest.approx(2 / 3)


def test_difficulty_adds_steps_length_and_facts():
    def mean(ability, d, size):
        records = generate(ability, 40, seed=0, difficulty=d)
        return sum(size(r) for r in records) / len(records)
    steps = {d: mean("math", d, lambda r: r["response"].count("\n")) for d in (1, 2, 3)}
    assert steps == {1: 2, 2: 3, 3: 4}
    premises = {d: mean("logic", d, lambda r: r["prompt"].count(" than ")) for d in (1, 2, 3)}
    assert premises == {1: 1, 2: 2, 3: 3}
    facts = {d: mean("chat", d, lambda r: sum(m["content"].count(".") for m in r["messages"]
                                              if m["role"] == "user")) for d in (1, 2, 3)}
    assert facts == {1: 2, 2: 3, 3: 4}
    length = [mean("instruction", d, lambda r: len(r["prompt"])) for d in (1, 2, 3)]
    assert length[0] < length[1] < length[2]
    code = [mean("code", d, lambda r: len(r["response"])) for d in (1, 2, 3)]
    assert code[0] < code[1] < code[2]


def test_default_difficulty_keeps_sequences_short_for_the_tiny_model():
    for ability in ABILITIES:
        records = generate(ability, 500, seed=0)
        # what the model reads: the prompt, or the text of every turn (templates add a few tokens)
        shown = [r["prompt"] if "prompt" in r else "".join(m["content"] for m in r["messages"])
                 for r in records]
        assert max(map(len, shown)) <= 90, ability
        assert max(len(r["response"]) for r in records) <= 40, ability


def test_bad_arguments_are_user_errors():
    with pytest.raises(ValueError, match="unknown ability"):
        generate("poetry", 1)
    with pytest.raises(ValueError, match="split"):
        generate("math", 1, split="dev")
    with pytest.raises(ValueError, match="difficulty"):
        generate("math", 1, difficulty=7)


def test_committed_sample_regenerates_byte_identically(tmp_path):
    manifest = json.loads((COMMITTED / "MANIFEST.json").read_text())
    assert manifest["command"] == "python -m epi data --out data/epi_mini --seed 0"
    fresh = write_dataset(tmp_path, seed=manifest["seed"], sizes=manifest["sizes"])
    assert fresh["files"] == manifest["files"]
    for name in manifest["files"]:
        assert (tmp_path / name).read_bytes() == (COMMITTED / name).read_bytes(), name


def test_committed_sample_loads_through_load_task():
    for ability in ABILITIES:
        test = load_task(ability, COMMITTED, split="test")
        assert len(test) == 50 and {r["task"] for r in test} == {ability}
        assert load_task(ability, COMMITTED)[0]["id"].endswith("train-00000")


def test_missing_sample_directory_says_how_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m epi data"):
        load_task("math", tmp_path / "nowhere", split="test")


def test_package_reexports_evaluate_and_formatting_helpers():
    import importlib
    import sys

    import epi.tasks as tasks

    importlib.import_module("epi.tasks.evaluate")           # importing the submodule must not shadow it
    assert tasks.evaluate is sys.modules["epi.tasks.evaluate"].evaluate
    assert tasks.render is sys.modules["epi.tasks.formatting"].render
    with pytest.raises(AttributeError):
        tasks.no_such_helper

"""The hub table: load_task(name, "hub", split) reads the real datasets through datasets.load_dataset,
tested offline against a stand-in mirror in each dataset's original schema (EPI_HUB_MIRROR)."""
import pytest

from epi.tasks import REAL_TASKS, load_task, score
from epi.tasks.hub import HELD_OUT, HUB, MIRROR_ENV, PARQUET_REVISION, mirror_path
from epi.tasks.mirror import write_mirror

N_TRAIN, N_EVAL = 24, 6


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    return write_mirror(tmp_path_factory.mktemp("hub"), n_train=N_TRAIN, n_eval=N_EVAL)


@pytest.fixture
def calls(monkeypatch, mirror):
    """Point the hub loader at the mirror and record every datasets.load_dataset call (path, split)."""
    import datasets
    seen, real = [], datasets.load_dataset

    def spy(path, *args, **kwargs):
        seen.append((path, args, kwargs.get("split"), kwargs.get("revision")))
        return real(path, *args, **kwargs)

    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    monkeypatch.setattr(datasets, "load_dataset", spy)
    return seen


def test_the_table_names_every_real_task_once():
    assert tuple(HUB) == REAL_TASKS == ("gsm8k", "codealpaca", "logiqa", "alpaca", "ultrachat")
    assert len({e.hub_id for e in HUB.values()}) == len(HUB)
    assert HUB["gsm8k"].config == "main" and HUB["ultrachat"].train_split == "train_sft"


def test_every_task_reads_its_train_and_test_split_through_the_table(calls, mirror):
    for task, entry in HUB.items():
        train, test = load_task(task, "hub", f"train[:{N_TRAIN}]"), load_task(task, "hub", "test")
        assert len(train) == N_TRAIN and len(test) >= N_EVAL, task
        assert {r["task"] for r in train + test} == {task}
        for r in test[:3]:  # the scorer accepts the reference
            assert score(task, r["response"], r) == 1.0, (task, r)
        assert str(mirror_path(mirror, entry.hub_id)) in [c[0] for c in calls], task
    gsm = load_task("gsm8k", "hub", "train[:3]")
    assert all("<<" not in r["response"] and r["response"].endswith(f"#### {r['answer']}") for r in gsm)
    assert ("openai/gsm8k" in calls[0][0]) and calls[0][1] == ("main",)  # the table's config goes along


def test_a_script_dataset_is_read_from_its_parquet_export(calls, mirror):
    records = load_task("logiqa", "hub", "test[:4]")
    paths = [c[0] for c in calls]
    # the main revision holds only a loading script, which datasets >= 4 refuses: then the parquet export
    assert paths == [str(mirror_path(mirror, "lucasmccabe/logiqa")),
                     str(mirror_path(mirror, "lucasmccabe/logiqa", PARQUET_REVISION))]
    assert len(records) == 4 and all(r["answer"] in "ABCD" and r["prompt"].splitlines()[-1].startswith("D. ")
                                     for r in records)


def test_held_out_rows_of_a_dataset_without_test_split_are_the_training_tail(calls):
    for task in ("codealpaca", "alpaca"):
        train, test = load_task(task, "hub", "train"), load_task(task, "hub", f"test[:{N_EVAL}]")
        assert len(train) == N_TRAIN and len(test) == N_EVAL  # the split holds N_TRAIN + HELD_OUT rows
        assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
        assert HUB[task].eval_split is None
    with pytest.raises(ValueError, match=rf"into the last {HELD_OUT} rows.*at most {N_TRAIN} training rows"):
        load_task("alpaca", "hub", f"train[:{N_TRAIN + 1}]")
    assert len(load_task("gsm8k", "hub", "train")) == N_TRAIN  # a dataset with a test split: no such limit


def test_explicit_hub_ids_read_the_mirror_too(calls, mirror):
    records = load_task("ultrachat", "HuggingFaceH4/ultrachat_200k", split="test_sft")
    assert len(records) == N_EVAL and records[0]["messages"][0]["role"] == "user"
    assert calls[-1][0] == str(mirror_path(mirror, "HuggingFaceH4/ultrachat_200k"))


def test_a_rewritten_mirror_is_never_read_stale(tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    write_mirror(tmp_path, n_train=4, n_eval=2, seed=0, tasks=["gsm8k"])
    first = load_task("gsm8k", "hub", "train")
    write_mirror(tmp_path, n_train=4, n_eval=2, seed=1, tasks=["gsm8k"])
    second = load_task("gsm8k", "hub", "train")
    assert len(first) == len(second) == 4 and [r["prompt"] for r in first] != [r["prompt"] for r in second]


def test_a_mirror_without_the_dataset_names_the_path_and_the_writer(tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"openai/gsm8k.*write_mirror"):
        load_task("gsm8k", "hub")
    with pytest.raises(ValueError, match="hub table"):
        from epi.tasks.hub import hub_entry
        hub_entry("math")


def test_the_gpu_and_full_profiles_read_their_tasks_through_the_table(calls):
    from epi.experiments.profiles import resolve
    from epi.training.data import eval_records, train_records
    for profile in ("gpu", "full"):
        cfg = resolve(profile)
        assert cfg.data_source == "hub" and set(cfg.tasks) == set(HUB)
    for task in resolve("gpu").tasks:
        assert len(train_records(task, 8, 0, source="hub")) == 8
        assert len(eval_records(task, 4, source="hub")) == 4
    assert ("train[:8]" in {c[2] for c in calls}) and ("test_sft[:4]" in {c[2] for c in calls})

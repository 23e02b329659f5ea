"""The experiment runner: every method runs in the smoke profile, resume is exact, bad configs fail early."""
import json
import subprocess
import sys

import pytest

from helpers import interrupt_at_stage_end
from epi.analysis.compare import summary_table, write_tables
from epi.experiments.collect import compare
from epi.experiments.profiles import resolve
from epi.experiments.runner import run_experiment
from epi.methods.registry import METHODS

SMOKE = dict(tasks=["math", "instruction", "chat"], steps_per_task=8, eval_records=4, eval_every=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m != "random") + ["random"])
def test_every_method_runs_in_the_smoke_profile(method, runs):
    cfg = resolve("smoke", method=method, seed=0, **SMOKE)
    rec = run_experiment(cfg, runs)
    assert set(rec["final_scores"]) == set(SMOKE["tasks"])
    assert all(0.0 <= s <= 1.0 for s in rec["final_scores"].values())
    # static's Stage 4 is brief: stage4_fraction × steps_per_task steps per task (epi.methods.static)
    per_task = rec["cpift"]["stage4"]["steps_per_task"] if method == "static" else SMOKE["steps_per_task"]
    assert len(rec["losses"]) == sum(len(s) for s in rec["stages"]) * per_task
    assert len(rec["stage_scores"]) == len(rec["stages"])
    assert sorted(t for s in rec["stages"] for t in s) == sorted(SMOKE["tasks"])
    if method in ("epi", "epi_per_task", "static", "random"):
        assert rec["mask_digest"] and rec["protected_fraction_mean"] >= 0.0
    if method == "random":  # matched to epi_per_task's realised share on the same seed
        matched = json.loads((runs / "mix-epi_per_task-s0" / "results.json").read_text())
        assert abs(rec["protected_fraction_mean"] - matched["protected_fraction_mean"]) < 0.01
    assert (runs / cfg.run_name / "results.json").exists()
    assert not (runs / cfg.run_name / "checkpoint.pt").exists()


def test_compare_builds_the_method_by_task_table(runs, tmp_path):
    df = compare(runs)
    assert set(df["method"]) >= {"full_sft", "epi", "static"}
    table = summary_table(df)
    assert "| epi |" in table and "score_math" in table
    write_tables(df, tmp_path, "python -m epi compare runs")
    assert (tmp_path / "summary.csv").read_text().startswith("protocol,method,seed")  # plain CSV
    assert json.loads((tmp_path / "summary.provenance.json").read_text())["command"] == "python -m epi compare runs"


def test_interrupted_run_resumes_from_its_checkpoint_and_ends_identically(tmp_path):
    cfg = resolve("smoke", method="epi_per_task", protocol="sequential", tasks=["math", "instruction"],
                  steps_per_task=8, eval_records=4, eval_every=0, checkpoint_every=5)
    full = run_experiment(cfg, tmp_path / "a")

    interrupt_at_stage_end(cfg, tmp_path / "b", "stage 1/2")
    assert (tmp_path / "b" / cfg.run_name / "checkpoint.pt").exists()
    said = []
    resumed = run_experiment(cfg, tmp_path / "b", say=said.append)
    assert any(m.startswith("resumed") and "at step 5/16" in m for m in said)
    assert resumed["losses"] == full["losses"]
    assert resumed["final_scores"] == full["final_scores"]
    assert resumed["mask_digest"] == full["mask_digest"]


def test_invalid_configs_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="ratio"):
        resolve("smoke", ratio=1.5)
    with pytest.raises(ValueError, match="unknown experiment setting"):
        resolve("smoke", rato=0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        resolve("smoke", method="magic")
    with pytest.raises(ValueError, match="train_tasks"):
        resolve("smoke", protocol="forgetting", tasks=["math", "code"], train_tasks=["chat"])
    with pytest.raises(ValueError, match="does not apply"):
        run_experiment(resolve("smoke", method="multi_stage", protocol="forgetting"), tmp_path)
    with pytest.raises(ValueError, match="run it first"):
        run_experiment(resolve("smoke", method="random", seed=7), tmp_path)
    assert not any(tmp_path.rglob("*.pt"))


def test_cli_rejects_a_bad_config_with_a_clear_message(tmp_path):
    out = subprocess.run([sys.executable, "-m", "epi", "run", "--profile", "smoke", "--set", "ratio=1.5",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "ratio must be in (0, 1)" in out.stderr


def test_a_finished_run_with_other_settings_is_not_reused(runs):
    # (another lr is an arm with a folder of its own: tests/test_controls.py)
    cfg = resolve("smoke", method="full_sft", seed=0, **{**SMOKE, "weight_decay": 0.05})
    with pytest.raises(ValueError, match="other settings.*weight_decay"):
        run_experiment(cfg, runs)


def test_paired_differences_pair_runs_by_seed():
    import pandas as pd
    from epi.analysis.compare import paired
    df = pd.DataFrame({"protocol": "mix", "method": ["a", "a", "b", "b"], "seed": [0, 1, 1, 0],
                       "mean_score": [0.5, 0.7, 0.6, 0.2]})
    d = paired(df, "a", "b")
    assert d["seeds"] == 2 and d["positive"] == 2
    assert d["mean"] == pytest.approx(0.2) and d["sd"] == pytest.approx((0.2 - 0.1) * 2 ** 0.5)


def test_cli_runs_a_method_and_compares(tmp_path):
    env = {**__import__("os").environ, "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-m", "epi", "run", "--method", "epi", "--profile", "smoke",
                          "--tasks", "math,chat", "--set", "steps_per_task=6", "--set", "eval_records=4",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "stage 1/1 math+chat" in run.stdout and "done mix-epi-s0" in run.stdout
    cmp = subprocess.run([sys.executable, "-m", "epi", "compare", str(tmp_path), "--out", str(tmp_path / "sum")],
                         capture_output=True, text=True, env=env)
    assert cmp.returncode == 0 and "| epi | 1 |" in cmp.stdout
    assert (tmp_path / "sum" / "summary.csv").exists()


def test_the_start_scores_are_cached_by_weights_and_equal_a_fresh_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("EPI_CACHE", str(tmp_path / "cache"))
    cfg = resolve("smoke", method="full_sft", seed=0, **SMOKE)
    first = run_experiment(cfg, tmp_path / "a")
    (entry,) = (tmp_path / "cache" / "start_scores").glob("*.json")
    assert json.loads(entry.read_text()) == first["base_scores"]
    # a second run from the same start model reads the entry; its record is the same
    again = run_experiment(resolve("smoke", method="epi", seed=0, **SMOKE), tmp_path / "b")
    assert again["base_scores"] == first["base_scores"]
    assert len(list((tmp_path / "cache" / "start_scores").glob("*.json"))) == 1
    # another seed's start model (a different tiny-base) gets its own entry
    run_experiment(resolve("smoke", method="full_sft", seed=1, **SMOKE), tmp_path / "c")
    assert len(list((tmp_path / "cache" / "start_scores").glob("*.json"))) == 2

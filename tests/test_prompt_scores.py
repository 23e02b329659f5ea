"""Per-prompt scores in run records: every evaluation keeps them, the final ones average the last evaluations,
and a start-score cache entry written before they existed is recomputed."""
import json

import pytest

from epi.experiments.profiles import resolve
from epi.experiments.run import final_prompt_scores
from epi.experiments.runner import run_experiment

# eval_every=3 with eval_last=2: the final scores are the mean of two evaluations of the last stage
TINY = dict(model="tiny", tasks=["math", "chat"], steps_per_task=3, eval_records=3, eval_every=3, eval_last=2)


def test_every_stored_evaluation_carries_per_prompt_scores_that_average_to_its_score(tmp_path, monkeypatch):
    monkeypatch.setenv("EPI_CACHE", str(tmp_path / "cache"))
    rec = run_experiment(resolve("smoke", method="full_sft", **TINY), tmp_path / "runs")
    stored = [rec["base_scores"], *rec["stage_scores"], *(e["scores"] for e in rec["evals"])]
    assert len(rec["evals"]) == 2
    for scores in stored:
        for t, s in scores.items():
            assert len(s["per_prompt"]) == s["n"] == TINY["eval_records"]
            assert sum(s["per_prompt"]) / s["n"] == pytest.approx(s["score"], abs=1e-12)
    final = rec["final_prompt_scores"]
    assert set(final) == set(TINY["tasks"])
    for t in TINY["tasks"]:
        assert len(final[t]) == TINY["eval_records"]
        assert sum(final[t]) / len(final[t]) == pytest.approx(rec["final_scores"][t], abs=1e-12)


def test_final_prompt_scores_average_each_prompt_over_the_last_evaluations():
    evals = [{"scores": {"a": {"per_prompt": [1.0, 0.0, 1.0]}}}, {"scores": {"a": {"per_prompt": [0.0, 0.0, 1.0]}}}]
    assert final_prompt_scores(evals, ["a"]) == {"a": [0.5, 0.0, 1.0]}
    # an evaluation from before per-prompt scores (a resumed old checkpoint): nothing to pair, so no field
    assert final_prompt_scores([*evals, {"scores": {"a": {"score": 0.5}}}], ["a"]) is None


def test_a_start_score_cache_entry_without_per_prompt_scores_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("EPI_CACHE", str(tmp_path / "cache"))
    cfg = dict(TINY, eval_every=0)
    first = run_experiment(resolve("smoke", method="full_sft", **cfg), tmp_path / "a")
    (entry,) = (tmp_path / "cache" / "start_scores").glob("*.json")
    stale = {t: {k: v for k, v in s.items() if k != "per_prompt"} for t, s in first["base_scores"].items()}
    entry.write_text(json.dumps(stale))
    said = []
    again = run_experiment(resolve("smoke", method="epi", **cfg), tmp_path / "b", say=said.append)
    assert again["base_scores"] == first["base_scores"]  # per_prompt back, from a fresh evaluation
    assert json.loads(entry.read_text()) == first["base_scores"]  # the entry replaced in place
    assert any("predates per-prompt scores" in m for m in said)
    assert not list(entry.parent.glob(entry.name + ".broken*"))  # stale is not broken: nothing moved aside
    # negative control: a current entry is read, not recomputed
    said.clear()
    run_experiment(resolve("smoke", method="full_sft", seed=0, **{**cfg, "lr": 5e-4}), tmp_path / "c",
                   say=said.append)
    assert not any("score cache" in m for m in said)


def test_the_cpu_profile_evaluates_200_distinct_held_out_prompts_per_task():
    from epi.tasks import ABILITIES
    from epi.tasks.synthetic import DIFFICULTIES, canonical_prompt
    from epi.training.data import eval_records, train_records
    cpu, smoke = resolve("cpu"), resolve("smoke")
    assert cpu.eval_records >= 200 and smoke.eval_records < 20  # smoke stays quick
    for difficulty in DIFFICULTIES:
        for task in ABILITIES:
            prompts = [canonical_prompt(r) for r in eval_records(task, cpu.eval_records, difficulty)]
            assert len(set(prompts)) == cpu.eval_records
            trained = {canonical_prompt(r) for r in train_records(task, cpu.train_records, 0, difficulty)}
            assert not trained & set(prompts)
            # negative control: the check sees a shared prompt when there is one
            assert trained & {*prompts, next(iter(trained))}

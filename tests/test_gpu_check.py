"""The prepared GPU check (`python -m epi gpu-check`), rehearsed on CPU: every part end to end with tiny
shapes, the files it writes, the budget that skips parts with a reason, and the early stop without a GPU."""
import json
from types import SimpleNamespace

import pytest
import torch

from epi import bench, gpu_check
from epi.__main__ import main
from epi.engine.core import ActiveMask
from epi.integrations import recipe

PART_HEADER = "| part | status | wall (s) | result or reason |"
BENCH_HEADER = ("| shape | params | threads | plain step (s) | EPI step (s) | step ratio | engine (ms/step) | fwd+bwd EPI/plain "
                "| whole-step paired ratio [IQR] | lean step ratio | refresh radix (s) | cat+kthvalue (s) | refresh ratio "
                "| exact | B/param default (+diag) | B/param lean (+diag) |")


def strict_json(path):
    """Return the JSON in `path`, failing on NaN or Infinity (which json.loads accepts by default)."""
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def rehearse(tmp_path, *extra):
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main(["gpu-check", "--device", "cpu", "--out", str(out), "--work", str(work), *extra])
    return rc, out, strict_json(out / "gpu_check.json")


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_part_and_writes_table_json_and_provenance(tmp_path):
    rc, out, record = rehearse(tmp_path)
    parts = {p["part"]: p for p in record["parts"]}
    assert list(parts) == ["bench qwen2-tiny", "trainer", "notebook 07"]
    assert rc == 0 and record["ok"], record
    assert parts["bench qwen2-tiny"]["status"] == "ok"
    assert parts["bench qwen2-tiny"]["result"]["refresh"]["exact"] is True
    trainer = parts["trainer"]["result"]["runs"]
    assert [t["scope"] for t in trainer] == ["global", "per_task"]
    for t in trainer:  # accumulation 4: one engine observation per optimizer step, protected weights exact
        assert t["optimizer_steps"] == t["engine_observations"] == 8 and t["grad_accum"] == 4
        assert t["isolated_steps"] > 0 and t["max_protected_drift"] == 0.0
    assert {t["isolation_mode"] for t in trainer} == {"grad", "restore"}
    notebook = parts["notebook 07"]
    assert notebook["status"] == "ok", notebook["reason"]
    assert notebook["result"]["max_protected_drift"] == 0.0
    assert notebook["result"]["params"]["PROFILE"] == "gpu"
    assert set(notebook["result"]["train_s"]) == set(notebook["result"]["methods"])
    table = (out / "gpu_check.md").read_text()
    assert PART_HEADER in table and BENCH_HEADER in table and "## Trainer path" in table
    assert "## Notebook 07" in table
    assert "peak GiB plain" not in table  # the peak-memory column is CUDA's
    prov = strict_json(out / "provenance.json")
    assert prov["command"].startswith("python -m epi gpu-check --device cpu")
    assert prov["device"] == "cpu" and prov["gpu"] is None and prov["capability"] is None
    assert prov["torch"] == torch.__version__ and prov["transformers"] and prov["date"]
    assert record["wall_s"] <= record["budget_s"]


def test_parts_beyond_the_budget_are_skipped_with_the_reason_and_files_are_still_written(tmp_path):
    rc, out, record = rehearse(tmp_path, "--budget-s", "1")
    assert rc == 0
    assert [p["status"] for p in record["parts"]] == ["skipped"] * 3
    assert all(p["reason"].startswith("budget: needs about") for p in record["parts"]), record["parts"]
    table = (out / "gpu_check.md").read_text()
    assert table.count("| skipped |") == 3 and "budget: needs about" in table
    assert (out / "provenance.json").is_file()


def test_a_part_that_fits_runs_and_the_later_ones_that_do_not_are_skipped(tmp_path):
    # the tiny benchmark is estimated at about 5 s and takes about 2: with 8 s the trainer (10 s) cannot fit
    rc, out, record = rehearse(tmp_path, "--budget-s", "8")
    status = {p["part"]: p["status"] for p in record["parts"]}
    assert status == {"bench qwen2-tiny": "ok", "trainer": "skipped", "notebook 07": "skipped"}, record["parts"]
    assert BENCH_HEADER in (out / "gpu_check.md").read_text()


def test_notebook_part_without_papermill_is_skipped_naming_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_missing_for_notebook", lambda: ["papermill", "datasets"])
    rc, out, record = rehearse(tmp_path, "--budget-s", "1")
    notebook = record["parts"][-1]
    assert notebook["part"] == "notebook 07" and notebook["status"] == "skipped"
    assert notebook["reason"].startswith("papermill, datasets not installed") and "results/gpu/README.md" in notebook["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_cuda_the_default_invocation_stops_early_and_names_the_cpu_rehearsal(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["gpu-check", "--out", str(out), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is present" in err and "python -m epi gpu-check --device cpu" in err
    assert not out.exists() and not (tmp_path / "work").exists()  # nothing was started


def test_a_part_that_raises_is_an_error_with_its_message_and_a_failed_check_is_not_ok():
    def broken():
        raise RuntimeError("CUDA out of memory")
    error = gpu_check.run_part("bench x", 1.0, 100.0, broken)
    assert error["status"] == "error" and error["reason"] == "RuntimeError: CUDA out of memory"
    failed = gpu_check.run_part("trainer", 1.0, 100.0, lambda: {"ok": False, "max_protected_drift": 1e-3})
    assert failed["status"] == "failed" and failed["result"] == {"max_protected_drift": 1e-3}
    passed = gpu_check.run_part("trainer", 1.0, 100.0, lambda: {"ok": True})
    assert passed["status"] == "ok"


def test_the_recipe_spy_the_check_relies_on_sees_a_protected_weight_move_and_ignores_a_free_one():
    weight = torch.nn.Parameter(torch.zeros(2, 3))
    mask = torch.tensor([[True, False, False], [False, False, True]])
    engine = SimpleNamespace(params=[weight], current_task=None,
                             active=lambda: ActiveMask(protected=[mask], index=None, count=2))
    spy = recipe.ProtectedDriftSpy(SimpleNamespace(engine=engine))
    for moved, expected in ((~mask, 0.0), (mask, 0.25)):  # a free coordinate moves, then a protected one
        spy.on_pre_optimizer_step(None, None, None)
        with torch.no_grad():
            weight[moved] += 0.25
        spy.on_optimizer_step(None, None, None)
        assert spy.drift[-1] == expected
    # the same through int32 indices (lean engine, restore mode)
    index = mask.reshape(-1).nonzero().reshape(-1).to(torch.int32)
    engine.active = lambda: ActiveMask(protected=None, index=[index], count=2)
    spy.on_pre_optimizer_step(None, None, None)
    with torch.no_grad():
        weight.view(-1)[index[1]] -= 0.5
    spy.on_optimizer_step(None, None, None)
    assert spy.drift[-1] == 0.5


def test_bench_table_adds_the_peak_memory_column_only_when_measured_on_cuda():
    cpu = bench.measure("qwen2-tiny", reps=1, device="cpu", batch=1, seq=8)
    assert "plain_peak_gib" not in cpu["step"]
    assert bench.table([cpu]).splitlines()[0] == BENCH_HEADER  # `python -m epi bench` keeps its columns
    cuda_like = {**cpu, "step": {**cpu["step"], "plain_peak_gib": 1.5, "epi_peak_gib": 1.75},
                 "lean_step": {**cpu["lean_step"], "epi_peak_gib": 1.625}}
    header, _, row = bench.table([cuda_like]).splitlines()
    assert header.endswith(" peak GiB plain / EPI / lean |") and row.endswith(" 1.50 / 1.75 / 1.62 |")


def test_bench_measures_each_thread_count_in_one_run():
    import torch
    before = torch.get_num_threads()
    rows = bench.run(["qwen2-tiny"], reps=1, batch=1, seq=8, threads=(1, 2)).splitlines()[2:]
    assert [r.split(" | ")[2] for r in rows] == ["1", "2"]           # one row per thread count, labelled
    torch.set_num_threads(before)


def test_plan_refuses_an_unknown_device_or_shape_naming_the_choices():
    with pytest.raises(ValueError, match="device must be"):
        gpu_check.plan("tpu")
    with pytest.raises(ValueError, match="unknown shape"):
        gpu_check.plan("cpu", ["qwen9"])
    assert gpu_check.plan("cuda").shapes == ("qwen2.5-0.5b", "qwen2.5-1.5b")
    assert gpu_check.plan("cuda").budget_s == 480


def test_step_ratio_reads_the_engine_off_the_rest_of_the_step_not_the_noisy_forward(monkeypatch):
    """Forward + backward swings by ±20 % here, the rest is 0.10 s plain and 0.13 s with the engine: the ratio is
    (F + 0.13) / (F + 0.10) with F the median forward + backward, whatever the swings; the paired whole-step
    ratio carries them."""
    swings = iter([1.0, 1.2, 0.8, 1.0, 1.2, 0.8, 1.0, 1.0, 0.8, 1.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0] * 4)
    monkeypatch.setattr(bench, "_step", lambda model, opt, data, iso=None: (next(swings), 0.13 if iso else 0.10))
    out = bench.step_ratio("qwen2-tiny", batch=1, seq=8, reps=5, device="cpu", dtype=torch.float32,
                           config=bench.configs()["default"])
    assert out["fb_s"] == 1.0 and out["ratio"] == pytest.approx(1.13 / 1.10)
    assert out["engine_s"] == pytest.approx(0.03) and out["plain_s"] == pytest.approx(1.10)
    assert out["paired_q1"] <= out["paired_ratio"] <= out["paired_q3"] and out["paired_q3"] - out["paired_q1"] > 0.1


@pytest.mark.parametrize("flags, says", [(["--threads", "-1"], "--threads must be >= 0"),
                                         (["--reps", "0"], "--reps must be >= 1"),
                                         (["--min-seconds", "-5"], "--min-seconds >= 0")])
def test_bench_refuses_bad_flags_before_measuring(flags, says):
    with pytest.raises(SystemExit, match=says):
        main(["bench", "--shapes", "qwen2-tiny", *flags])


def test_short_steps_repeat_until_the_minimum_time_has_been_timed():
    out = bench.step_ratio("qwen2-tiny", batch=1, seq=8, reps=2, device="cpu", dtype=torch.float32,
                           config=bench.configs()["default"], min_seconds=0.5)
    assert 2 < out["epi_steps"] <= 200

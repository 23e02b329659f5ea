"""Adversarial runs (issue 12): no code run from a file, no silent resume with other settings, one process
per run folder, every bad command-line input a one-line error before anything is built, compare that never
pools different experiments, and results CSVs that are plain CSV. The tiny model in the smoke profile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from epi.experiments.profiles import resolve
from epi.experiments.runner import run_experiment, run_grid

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="tiny", tasks=["math", "chat"], steps_per_task=3, eval_records=2, eval_every=0)
# sequential: stage 1 ends at step 6, a checkpoint at step 4 is left by a run stopped there
SEQ = dict(TINY, protocol="sequential", steps_per_task=6, checkpoint_every=4)


class Stop(Exception):
    pass


def stop_at(prefix):
    def say(message):
        if message.startswith(prefix):
            raise Stop
    return say


def interrupted(out, **settings):
    """Return the config of a run stopped after its first stage, with a checkpoint at step 4 in `out`."""
    cfg = resolve("smoke", method="epi", **{**SEQ, **settings})
    with pytest.raises(Stop):
        run_experiment(cfg, out, say=stop_at("stage 1/2"))
    assert (out / cfg.run_name / "checkpoint.pt").is_file()
    return cfg


class Planted:
    """Unpickling this writes `marker`: what a planted checkpoint.pt could do on resume."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


# ---- 2: checkpoints hold tensors and plain values; a pickle with code is refused -------------------------

def test_a_planted_pickle_checkpoint_is_refused_without_running_its_code(tmp_path):
    cfg = resolve("smoke", method="epi", **TINY)
    folder = tmp_path / cfg.run_name
    folder.mkdir()
    marker = tmp_path / "owned"
    torch.save({"model": {}, "extra": Planted(marker)}, folder / "checkpoint.pt")
    with pytest.raises(ValueError, match=str(folder / "checkpoint.pt")) as err:
        run_experiment(cfg, tmp_path)
    assert not marker.exists()
    assert "--fresh" in str(err.value)


def test_load_checkpoint_and_the_trainer_callback_refuse_a_planted_pickle(tmp_path):
    from helpers import small_llama

    from epi import EPIConfig, EvolvingIsolation
    from epi.integrations.hf import EPICallback, state_file
    from epi.training.checkpoints import load_checkpoint
    from epi.training.loop import TrainConfig, make_optimizer
    marker = tmp_path / "owned"
    torch.save({"loop": Planted(marker)}, tmp_path / "ckpt.pt")
    model = small_llama()
    with pytest.raises(ValueError, match="ckpt.pt"):
        load_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=make_optimizer(model, TrainConfig()))
    cb = EPICallback(EPIConfig())
    cb.engine = EvolvingIsolation(model, EPIConfig())
    torch.save({"global_step": 3, "engine": Planted(marker)}, tmp_path / state_file())
    with pytest.raises(Exception, match=r"epi_state.pt.*weights_only"):
        cb.load(str(tmp_path), 3)
    assert not marker.exists()


def test_a_run_checkpoint_loads_with_weights_only(tmp_path):
    cfg = interrupted(tmp_path)
    blob = torch.load(tmp_path / cfg.run_name / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(blob["rng"]) >= {"torch", "numpy", "python"}
    assert blob["extra"]["record"]["config"]["ratio"] == cfg.ratio
    assert blob["engine"]["step"] == 4


# ---- 3: resume refuses other settings; one process per folder; broken files named --------------------

def test_a_resumed_run_refuses_other_settings_and_says_how_to_start_fresh(tmp_path):
    cfg = interrupted(tmp_path)
    for change in (dict(steps_per_task=20), dict(ratio=0.3), dict(weight_decay=0.01)):
        with pytest.raises(ValueError, match=f"{next(iter(change))}.*--fresh"):
            run_experiment(resolve("smoke", method="epi", **{**SEQ, **change}), tmp_path)
    # how a run executes (checkpoint spacing, device, threads) may change between the interruption and the resume
    said = []
    rec = run_experiment(resolve("smoke", method="epi", **{**SEQ, "device": "cpu", "checkpoint_every": 5}), tmp_path,
                         say=said.append)
    assert any(m.startswith("resumed") and "at step 4/12" in m for m in said)
    assert len(rec["losses"]) == 12 and rec["config"]["steps_per_task"] == cfg.steps_per_task


def test_fresh_discards_the_interrupted_run_and_trains_the_new_settings(tmp_path):
    interrupted(tmp_path)
    said = []
    new = resolve("smoke", method="epi", **{**SEQ, "steps_per_task": 4})
    rec = run_experiment(new, tmp_path, say=said.append, fresh=True)
    assert not any(m.startswith("resumed") for m in said)
    assert len(rec["losses"]) == 8 and rec["config"]["steps_per_task"] == 4


def test_a_run_folder_is_owned_by_one_process(tmp_path):
    from epi.experiments.runner import run_lock
    cfg = resolve("smoke", method="full_sft", **TINY)
    folder = tmp_path / cfg.run_name
    folder.mkdir()
    with run_lock(folder):  # another owner (here: this process through another open file)
        with pytest.raises(ValueError, match=rf"in use by pid {os.getpid()} on "):
            run_experiment(cfg, tmp_path)
    assert not (folder / "results.json").exists()
    # a lock left by a process that is gone is taken over, with a log line
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (folder / "run.lock").write_text(json.dumps({"pid": gone.pid, "host": "elsewhere", "started": "then"}))
    said = []
    run_experiment(cfg, tmp_path, say=said.append)
    assert any("taking over" in m and str(gone.pid) in m for m in said)
    assert (folder / "results.json").exists() and not (folder / "run.lock").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_broken_checkpoint_is_named_with_what_to_do(tmp_path, damage):
    cfg = interrupted(tmp_path)
    path = tmp_path / cfg.run_name / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(4096)}[damage])
    with pytest.raises(ValueError, match=rf"{path}.*(delete it|--fresh)"):
        run_experiment(cfg, tmp_path)
    rec = run_experiment(cfg, tmp_path, fresh=True)
    assert len(rec["losses"]) == 12


def test_a_broken_start_score_cache_is_moved_aside_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("EPI_CACHE", str(tmp_path / "cache"))
    first = run_experiment(resolve("smoke", method="full_sft", **TINY), tmp_path / "a")
    (entry,) = (tmp_path / "cache" / "start_scores").glob("*.json")
    entry.write_text('{"math": {"score": 0.')
    said = []
    again = run_experiment(resolve("smoke", method="epi", **TINY), tmp_path / "b", say=said.append)
    assert again["base_scores"] == first["base_scores"]
    assert json.loads(entry.read_text()) == first["base_scores"]
    assert any(str(entry) in m and "rebuilt" in m for m in said)
    assert len(list(entry.parent.glob(entry.name + ".broken*"))) == 1


def test_run_grid_refuses_to_reuse_a_finished_run_with_other_settings(tmp_path):
    run_experiment(resolve("smoke", method="full_sft", **TINY), tmp_path)
    other = resolve("smoke", method="full_sft", **{**TINY, "weight_decay": 0.05})
    with pytest.raises(ValueError, match="other settings.*weight_decay"):
        run_grid([other], tmp_path)
    # another learning rate is another arm: its own folder, never the finished run's
    lower = resolve("smoke", method="full_sft", **{**TINY, "lr": 5e-4})
    assert lower.run_name != resolve("smoke", method="full_sft", **TINY).run_name and "lr0.0005" in lower.run_name


def test_a_finished_run_with_a_broken_results_file_is_named(tmp_path):
    cfg = resolve("smoke", method="full_sft", **TINY)
    run_experiment(cfg, tmp_path)
    results = tmp_path / cfg.run_name / "results.json"
    results.write_text(results.read_text()[:100])
    with pytest.raises(ValueError, match=rf"{results}.*--fresh"):
        run_experiment(cfg, tmp_path)


# ---- 4: the command line runs what was asked or refuses in one line, before anything is built ---------

@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Run `python -m epi run ...` in-process; return (exit code, stderr, the config it would run)."""
    import epi.experiments.runner
    from epi.__main__ import main
    ran = []

    def fake_run(config, out, say=print, fresh=False):
        ran.append(config)
        return {"final_scores": {t: 0.0 for t in config.tasks}, "wall_s": 0}
    monkeypatch.setattr(epi.experiments.runner, "run_experiment", fake_run)

    def call(*argv, out=None):
        code = main(["run", "--profile", "smoke", "--out", str(out or tmp_path / "runs"), *argv])
        return code, capsys.readouterr().err, (ran[-1] if ran else None)
    return call


def test_set_without_a_flag_wins_and_a_disagreeing_flag_refuses(cli):
    code, _, cfg = cli("--set", "method=epi", "--set", "seed=3", "--set", "tasks=math")
    assert code == 0 and (cfg.method, cfg.seed, cfg.tasks) == ("epi", 3, ["math"])
    code, _, cfg = cli("--set", "tasks=math,code", "--set", "protocol=sequential")
    assert code == 0 and cfg.tasks == ["math", "code"] and cfg.protocol == "sequential"
    code, err, _ = cli("--method", "full_sft", "--set", "method=epi")
    assert code == 2 and "--method" in err and "method=epi" in err
    code, err, _ = cli("--seed", "1", "--set", "seed=2")
    assert code == 2 and "--seed" in err


@pytest.mark.parametrize("setting,named", [
    ("seed=1.5", "seed"), ("clip=-1", "clip"), ("lr=Infinity", "lr"), ("lr=NaN", "lr"), ("ratio=abc", "ratio"),
    ("beta=1.0", "beta"), ("score=foo", "score"), ("tasks=mth", "mth"), ("freeze_embeddings=1", "freeze_embeddings"),
    ("lr=null", "lr"), ("weight_decay=-0.1", "weight_decay"), ("difficulty=9", "difficulty"), ("ratio", "KEY=VALUE"),
])
def test_a_bad_setting_is_a_one_line_error_naming_the_field(cli, setting, named):
    code, err, cfg = cli("--set", setting)
    assert code == 2 and cfg is None
    assert err.startswith("error:") and named in err and len(err.strip().splitlines()) == 1


def test_out_must_be_a_writable_folder(cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "runs"):
        code, err, cfg = cli(out=out)
        assert code == 2 and cfg is None and str(afile) in err and len(err.strip().splitlines()) == 1


def test_the_cli_refuses_bad_input_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "epi", "run", "--profile", "smoke", "--set", "ratio=abc",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "ratio" in out.stderr
    assert not any(tmp_path.iterdir())


def test_validation_happens_at_config_construction():
    for bad in (dict(beta=1.0), dict(score="foo"), dict(lr=float("nan")), dict(clip=-1.0), dict(seed=1.5),
                dict(tasks="math"), dict(bf16_autocast="no"), dict(eval_every=True), dict(group_tau=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            resolve("smoke", **bad)


def test_results_json_is_strict_json_even_when_training_diverges(tmp_path):
    from epi.jsonio import write_json
    write_json(tmp_path / "r.json", {"loss": float("nan"), "scores": [1.0, float("inf")]})

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert strict((tmp_path / "r.json").read_text()) == {"loss": None, "scores": [1.0, None]}
    rec = run_experiment(resolve("smoke", method="full_sft", **{**TINY, "lr": 1e30}), tmp_path)
    text = (tmp_path / resolve("smoke", **{**TINY, "lr": 1e30}).run_name / "results.json").read_text()
    assert strict(text)["losses"] == [None if x != x else x for x in rec["losses"]]


# ---- 5: compare groups only runs whose settings match; unreadable files are named and skipped ---------

def test_compare_never_pools_runs_with_different_settings_and_names_bad_files(tmp_path, caplog):
    from epi.analysis.compare import summary_table
    from epi.experiments.collect import compare
    cfg = resolve("smoke", method="full_sft", **TINY)
    rec = run_experiment(cfg, tmp_path / "good")
    for i, change in enumerate([{}, {"lr": 0.5}, {"clip": 0.0}, {"ratio": 0.3}]):
        folder = tmp_path / "runs" / f"r{i}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({**rec, "config": {**rec["config"], **change}}))
    for i in (4, 5):  # a matching second seed for r0 and r3's settings
        folder = tmp_path / "runs" / f"r{i}"
        folder.mkdir()
        change = {} if i == 4 else {"ratio": 0.3}
        (folder / "results.json").write_text(json.dumps({**rec, "seed": 1, "config": {**rec["config"], **change,
                                                                                         "seed": 1}}))
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "results.json").write_text('{"config": {"protocol": ')
    (tmp_path / "runs" / "empty").mkdir()
    (tmp_path / "runs" / "empty" / "results.json").write_text('{"config": {}}')
    with caplog.at_level("WARNING", logger="epi"):
        df = compare(tmp_path / "runs")
    assert len(df) == 6
    table = summary_table(df)
    assert "| full_sft | 6 |" not in table and "| full_sft | 4 |" not in table
    rows = [line for line in table.splitlines() if line.startswith("| full_sft")]
    assert len(rows) == 4 and sorted(r.split("|")[2].strip() for r in rows) == ["1", "1", "2", "2"]
    assert any("lr=0.5" in r for r in rows) and any("clip=0.0" in r for r in rows)
    text = caplog.text
    assert str(tmp_path / "runs" / "broken" / "results.json") in text
    assert str(tmp_path / "runs" / "empty" / "results.json") in text and "protocol" in text
    assert "different settings" in text


# ---- 8: results CSVs are plain CSV; provenance sits beside them --------------------------------------

def test_every_results_csv_loads_as_plain_csv():
    paths = sorted((ROOT / "results").rglob("*.csv"))
    assert paths
    for path in paths:
        assert len(pd.read_csv(path).columns) > 1, path


def test_summary_writers_keep_the_command_beside_the_csv(tmp_path):
    from epi.analysis.compare import write_tables
    df = pd.DataFrame({"protocol": ["mix"], "method": ["epi"], "seed": [0], "profile": ["smoke"],
                       "mean_score": [0.5]})
    write_tables(df, tmp_path, "python -m epi compare runs")
    assert list(pd.read_csv(tmp_path / "summary.csv").columns) == list(df.columns)
    assert json.loads((tmp_path / "summary.provenance.json").read_text())["command"] == "python -m epi compare runs"

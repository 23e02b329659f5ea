"""CPU stand-in for notebook 07's GPU path: the `gpu` profile's code path end to end on CPU, with a random-init
Qwen2 (the gpu profile's architecture, tiny) and the five real tasks read through the hub table from a local
mirror in each dataset's original schema; then a rerun that loads the finished methods instead of training."""
import json

import pytest

from helpers import ROOT
from epi.models.shapes import save_random_model
from epi.tasks.hub import MIRROR_ENV
from epi.tasks.mirror import write_mirror

NOTEBOOK = ROOT / "notebooks" / "07_gpu_multitask_sft.ipynb"
METHODS = ["full_sft", "epi", "epi_per_task"]
STEPS = 8
PARAMS = dict(PROFILE="gpu", SEED=0, MAX_STEPS=STEPS, TRAIN_RECORDS=32, EVAL_LIMIT=2, MAX_NEW_TOKENS=8,
              WARMUP_STEPS=2, REFRESH_EVERY=3, GRAD_ACCUM=2)


def outputs(nb) -> str:
    return "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_notebook_07_gpu_profile_runs_on_cpu_and_a_rerun_loads_finished_methods(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    mirror = write_mirror(tmp_path / "hub", n_train=PARAMS["TRAIN_RECORDS"], n_eval=4)
    model = save_random_model("qwen2-tiny", tmp_path / "qwen2-tiny")
    out = tmp_path / "out"
    for key, value in {MIRROR_ENV: str(mirror), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TQDM_DISABLE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    params = dict(PARAMS, MODEL_NAME=str(model), OUTPUT_DIR=str(out))

    def run(name):
        return papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / name), parameters=params, kernel_name="python3",
                                          cwd=str(ROOT / "notebooks"), progress_bar=False, log_output=False)

    first = run("first.ipynb")
    summary = json.loads((out / "summary.json").read_text())
    numbers = summary["numbers"]
    assert summary["profile"] == "gpu" and numbers["model"] == str(model) and numbers["precision"] == "fp32"
    assert numbers["methods"] == METHODS and numbers["plan"]["methods"] == METHODS  # no GPU: nothing dropped
    assert numbers["tasks"] == ["gsm8k", "codealpaca", "logiqa", "alpaca", "ultrachat"]
    assert numbers["max_protected_drift"] == 0.0  # isolated steps after the warm-up, exact
    saved = {m: json.loads((out / "methods" / m / "result.json").read_text()) for m in METHODS + ["base"]}
    assert all(saved[m]["result"]["steps"] == STEPS for m in METHODS)
    assert (out / "methods" / "epi_per_task" / "epi_state.pt").is_file() and \
        not (out / "methods" / "full_sft" / "epi_state.pt").exists()
    assert f"hub datasets read from {mirror}" in outputs(first)
    assert "loaded from" not in outputs(first)

    second = run("second.ipynb")
    text = outputs(second)
    for m in METHODS + ["base"]:
        assert f"loaded from {out / 'methods' / m}" in text, m
    again = json.loads((out / "summary.json").read_text())["numbers"]
    # nothing was trained again: the saved timings and scores come back unchanged
    assert again["train_s"] == numbers["train_s"] and again["scores"] == numbers["scores"]
    assert again["max_protected_drift"] == 0.0

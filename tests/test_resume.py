"""Resume: save mid-run, load into a fresh process, finish → bit-identical weights on CPU."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "resume_worker.py"


def run(mode, out, scope):
    subprocess.run([sys.executable, str(WORKER), mode, str(out), "24", scope], check=True)


@pytest.mark.parametrize("scope", ["global", "per_task"])
def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path, scope):
    run("full", tmp_path, scope)
    run("first", tmp_path, scope)
    run("second", tmp_path, scope)
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    resumed = torch.load(tmp_path / "second.pt", weights_only=False)
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert full["losses"] == resumed["losses"]
    assert full["digest"] == resumed["digest"]
    assert [h["step"] for h in full["history"]] == [h["step"] for h in resumed["history"]]
    assert full["history"][-1]["jaccard_first"] == resumed["history"][-1]["jaccard_first"]

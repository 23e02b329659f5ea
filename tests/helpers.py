"""Shared test helpers (imported by test modules; conftest.py holds only fixtures and setup)."""
from pathlib import Path

import pytest

from epi.models.shapes import small_llama  # the one small-Llama builder (the distributed runs use it too)

__all__ = ["ROOT", "SHARED_REAL", "small_llama", "interrupt_at_stage_end", "one_thread"]

ROOT = Path(__file__).resolve().parents[1]
SHARED_REAL = ROOT.parent / "shared" / "data" / "real"


class Interrupted(Exception):
    """Raised by `interrupt_at_stage_end` to stop a run as a crash would."""


def interrupt_at_stage_end(cfg, out, stage_prefix: str = "stage 1/2") -> None:
    """Run `cfg` under `out` and stop it (as a crash would) when the runner reports the end of the stage whose
    message starts with `stage_prefix`; the run's checkpoint stays behind for a resume."""
    from epi.experiments.runner import run_experiment

    def stop(msg):
        if msg.startswith(stage_prefix):
            raise Interrupted
    with pytest.raises(Interrupted):
        run_experiment(cfg, out, say=stop)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two threads spin against other jobs on a shared CPU); a module
    that imports this fixture runs every test on one thread."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""The runner talks to methods only through the Method hooks: in their documented order, with a
MethodContext (never the run), and a method's own record fields come from its record_extra()."""
import re
from pathlib import Path

import pytest

from epi.experiments.profiles import resolve
from epi.experiments.runner import run_experiment
from epi.methods.base import MethodContext, RunRefused
from epi.methods.random_mask import RandomMask
from epi.methods.registry import METHODS
from epi.methods.staging import FullSFT

ROOT = Path(__file__).resolve().parents[1]
SMOKE = dict(tasks=["math", "code"], steps_per_task=4, eval_records=2, eval_every=2)
RUNNER = [ROOT / "epi" / "experiments" / f for f in ("run.py", "runner.py", "plugins.py")]


def names_a_method(source: str) -> list:
    """Return the method names a source file spells as string literals (or asks about with hasattr)."""
    found = [m for m in METHODS if re.search(rf"""["']{m}["']""", source)]
    return found + (["hasattr(method"] if "hasattr(self.method" in source or "hasattr(method" in source else [])


def test_the_runner_never_names_the_method_it_runs():
    for path in RUNNER:  # the reference protocol is defined as full_sft alone: a protocol rule, not a method's
        allowed = ["full_sft"] if path.name == "runner.py" else []
        assert names_a_method(path.read_text()) == allowed, path
    # negative controls: what the runner used to do is caught
    assert names_a_method('ordered = sorted(todo, key=lambda c: c.method == "random")') == ["random"]
    assert names_a_method('if hasattr(self.method, "groups"):') == ["hasattr(method"]


class Toy(FullSFT):
    """A method added in one place: it logs its hooks and adds a record field of its own."""
    name = "toy"
    calls: list = []

    def check(self, config, out):
        Toy.calls.append("check")

    def engine_config(self, ctx):
        assert isinstance(ctx, MethodContext) and ctx.engine is None
        Toy.calls.append("engine_config")
        return ctx.epi_config(refresh_every=None)

    def prepare(self, ctx):
        assert ctx.engine is not None and set(ctx.base_scores) == set(SMOKE["tasks"])
        Toy.calls.append("prepare")

    def stages(self, ctx):
        Toy.calls.append("stages")
        return [[t] for t in ctx.config.tasks]

    def replay_tasks(self, ctx, k):
        assert ctx.stage_list == [["math"], ["code"]]
        Toy.calls.append(f"replay_tasks {k}")
        return []

    def plugins(self, ctx):
        Toy.calls.append("plugins")
        return []

    def stage_start(self, ctx, k, tasks):
        Toy.calls.append(f"stage_start {k}")

    def stage_end(self, ctx, k, tasks):
        Toy.calls.append(f"stage_end {k}")

    def record_extra(self):
        Toy.calls.append("record_extra")
        return {"toy": {"stages_seen": 2}}


def test_a_new_method_gets_its_hooks_in_order_and_adds_its_own_record_field(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "toy", Toy)
    Toy.calls = []
    rec = run_experiment(resolve("smoke", method="toy", seed=0, **SMOKE), tmp_path)
    assert Toy.calls == ["check", "engine_config", "prepare", "stages", "replay_tasks 0", "replay_tasks 1",
                         "plugins", "stage_start 0", "stage_end 0", "stage_start 1", "stage_end 1", "record_extra"]
    assert rec["toy"] == {"stages_seen": 2} and rec["stages"] == [["math"], ["code"]]
    plain = run_experiment(resolve("smoke", method="full_sft", seed=0, **SMOKE), tmp_path)
    assert "toy" not in plain and plain["cpift"] is None  # negative control: no method, no extra field


def test_random_refuses_before_training_when_its_matched_run_is_missing(tmp_path):
    cfg = resolve("smoke", method="random", seed=0, **SMOKE)
    with pytest.raises(RunRefused, match="random_ratio or a finished 'epi_per_task' run") as e:
        RandomMask().check(cfg, tmp_path / cfg.run_name)
    assert str(tmp_path / "mix-epi_per_task-s0" / "results.json") in str(e.value)
    given = resolve("smoke", method="random", seed=0, random_ratio=0.1, **SMOKE)
    RandomMask().check(given, tmp_path / given.run_name)  # a given share needs no matched run
    assert RandomMask.matched_ratio(given, tmp_path) == 0.1

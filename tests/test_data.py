"""Step-keyed data: every method sees the same batches; schedules are balanced; replay replaces a share."""
import torch

from epi.models import load_model
from epi.training.data import StepData, balanced_schedule, make_batchers, with_replay


def test_balanced_schedule_holds_each_task_equally_and_is_seeded():
    s = balanced_schedule(["a", "b", "c"], 7, seed=3)
    assert sorted(s) == sorted(["a"] * 7 + ["b"] * 7 + ["c"] * 7)
    assert s == balanced_schedule(["a", "b", "c"], 7, seed=3) != balanced_schedule(["a", "b", "c"], 7, seed=4)


def test_replay_replaces_about_the_fraction_with_earlier_tasks():
    s = with_replay(["b"] * 1000, ["a"], 0.2, seed=0)
    assert 150 < s.count("a") < 250 and set(s) == {"a", "b"}
    assert with_replay(["b"] * 10, [], 0.5, seed=0) == ["b"] * 10


def test_batch_of_a_step_does_not_depend_on_what_ran_before():
    _, tok = load_model("tiny")
    batchers = make_batchers(tok, ["math", "chat"], n=64, seed=0, batch_size=8, max_length=128)
    schedule = balanced_schedule(["math", "chat"], 12, seed=0)
    a, b = StepData(batchers, schedule), StepData(batchers, schedule)
    for step in range(len(schedule)):
        a(step)  # walk one through every step
    for step in reversed(range(len(schedule))):  # the other in reverse order
        ta, xa = a(step)
        tb, xb = b(step)
        assert ta == tb and torch.equal(xa["input_ids"], xb["input_ids"])

"""The code sandbox: static whitelist, time limit, crash recovery, pass rates and speed."""

import time

import pytest

from epi.tasks.sandbox import Sandbox, UnsafeCodeError, check_source, pass_rate

REVERSE_TESTS = [[["abc"], "cba"], [["ab"], "ba"], [["x"], "x"], [[""], ""]]


@pytest.fixture(scope="module")
def box():
    with Sandbox(timeout=0.5) as sandbox:
        yield sandbox


@pytest.mark.parametrize("source", [
    "__import__('os').system('echo hi')",
    "def f(x): return __import__('os').system('echo hi')",
    "def f(x): return ().__class__.__bases__[0].__subclasses__()",
    "def f(x): return open('/etc/passwd')",
    "def f(x): return open('/etc/passwd').read()",
    "import os\ndef f(x): return x",
    "def f(x): return eval('1+1')",
    "def f(x): return '{0.__class__}'.format(x)",
    "def f(x):\n    try:\n        return 1\n    except Exception:\n        return 2",
    "def f(x): return globals()",
    "def f(*args): return args",
    "def f(x): return x.__len__()",
    "def f(x): return x ++",
])
def test_unsafe_or_broken_code_is_rejected_before_it_runs(source, box):
    with pytest.raises(UnsafeCodeError):
        check_source(source)
    assert box.pass_rate(source, [[[1], 1]]) == 0.0


def test_whitelisted_one_liners_are_accepted():
    for source in ["def f(x): return x*2+1", "def f(s): return s[::-1].upper()",
                   "def f(xs): return sorted(xs, reverse=True)", "def f(xs): return [v for v in xs if v>3]",
                   "def f(x): return 1 if x%2==0 else 0", "def f(s): return ''.join(c for c in s if c!='a')",
                   "def f(xs):\n    t = 0\n    for v in xs:\n        t += v\n    return t"]:
        assert check_source(source).body[0].name == "f"


def test_infinite_loop_is_stopped_within_the_time_limit(box):
    start = time.monotonic()
    assert box.run("def f(x):\n    while True:\n        pass", [[[1], 1], [[2], 2]]) == [False, False]
    assert time.monotonic() - start < 2 * (box.timeout + box.grace)


def test_loop_inside_c_code_is_killed_and_the_worker_restarts(box):
    restarts = box.restarts
    start = time.monotonic()
    assert box.run("def f(x): return sum(range(10**14))", [[[1], 1]]) == [False]
    assert time.monotonic() - start < 2 * (box.timeout + box.grace)
    assert box.restarts == restarts + 1
    assert box.pass_rate("def f(s): return s[::-1]", REVERSE_TESTS) == 1.0


def test_memory_bomb_fails_without_taking_the_sandbox_down(box):
    assert box.run("def f(x): return [0] * 10**10", [[[1], 1]]) == [False]
    assert box.pass_rate("def f(x): return x+1", [[[1], 2]]) == 1.0


def test_correct_solution_passes_and_wrong_ones_get_partial_or_zero_credit(box):
    assert box.pass_rate("def f(s): return s[::-1]", REVERSE_TESTS) == 1.0
    assert box.pass_rate("def f(s): return s", REVERSE_TESTS) == 0.5      # right on "x" and ""
    assert box.pass_rate("def f(s): return s.upper()", REVERSE_TESTS) == 0.25
    assert box.pass_rate("def f(s): return 1", REVERSE_TESTS) == 0.0


def test_runtime_errors_and_wrong_types_fail_the_test(box):
    assert box.run("def f(x): return x[5]", [[["ab"], "a"]]) == [False]
    assert box.run("def f(x): return True", [[[1], 1]]) == [False]           # bool is not the int 1
    assert box.run("def f(xs): return tuple(sorted(xs))", [[[[2, 1]], [1, 2]]]) == [True]


def test_the_last_defined_function_is_called(box):
    source = "def helper(x): return x*10\ndef f(x): return helper(x)+1"
    assert box.run(source, [[[2], 21]]) == [True]


def test_scoring_hundreds_of_predictions_takes_well_under_seconds(box):
    start = time.monotonic()
    rates = [box.pass_rate("def f(s): return s[::-1]", REVERSE_TESTS) for _ in range(300)]
    assert rates == [1.0] * 300
    assert time.monotonic() - start < 5.0


def test_shared_sandbox_function_scores_like_an_instance():
    assert pass_rate("def f(x): return x*3", [[[2], 6], [[3], 10]]) == 0.5

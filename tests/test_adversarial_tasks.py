"""Adversarial and clumsy-user cases for the task layer: the code sandbox and ``load_task``.

Issue 12, item 7. The sandbox must stop every escape (kept here as regressions), its worker must die
with the scorer and have a CPU-time limit and a per-candidate budget; ``load_task`` must turn every bad
file or mistyped path into an early error that names the file (and line) and what to do.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from epi.tasks import load_task, score
from epi.tasks.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[1]
C_LOOP = "def f(x): return sum(range(10**18))"              # ignores SIGALRM and holds the GIL
PY_LOOP = "def f(x):\n    while True:\n        pass"
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


# ------------------------------------------------------------------ escapes that must stay stopped
@pytest.fixture(scope="module")
def box():
    with Sandbox(timeout=0.5) as sandbox:
        yield sandbox


@pytest.mark.parametrize("source", [
    "def f(x): return x.gi_frame",                                          # frame walk
    "def f(x): return x.tb_frame.f_back",                                   # traceback walk
    "def f(x): return x.__class__.__mro__[-1].__subclasses__()",
    "def f(x): return x.__reduce_ex__(2)",
    "def f(x): return '{0.__class__}'.format(x)",
    "def f(x): return getattr(x, 'upper')()",
    "def f(x): return vars(x)",
    "def f(x): return globals()",
    "def d(g): return g\n@d\ndef f(x): return x",
    "def f(x): return type(x)",
])
def test_escape_attempts_are_rejected_and_score_zero(source, box):
    assert box.pass_rate(source, [[[1], 1]]) == 0.0


@pytest.mark.parametrize("source", [
    "def f(x): return [0] * 10**10",                                       # huge allocation
    "def f(x): return f(x)",                                               # deep recursion
    "def f(x): return 10**10**10",                                         # C-level bignum work
    "def f(x):\n    t = ()\n    for i in range(10**6):\n        t = (t,)\n    return {t: 1}",  # C-stack hash
])
def test_resource_attacks_fail_and_the_sandbox_still_scores_afterwards(source, box):
    assert box.run(source, [[[1], 1]]) == [False]
    assert box.pass_rate("def f(x): return x + 1", [[[1], 2], [[5], 6]]) == 1.0


# ------------------------------------------------------------------ worker lifetime and limits
def _stat(pid: int) -> list[str] | None:
    """Return the fields of /proc/<pid>/stat after the command name (state, ppid, ...), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")     # a zombie has stopped running


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def _orphan_after_scorer_killed(source: str, setup: str = "", box_args: str = "timeout=60.0",
                                wait: float = 5.0) -> tuple[int, bool]:
    """Start a scorer process running ``source``, SIGKILL it, return (worker pid, worker still alive)."""
    script = textwrap.dedent(f"""
        from epi.tasks import sandbox
        {setup}
        box = sandbox.Sandbox({box_args})
        print("scoring", flush=True)
        box.run({source!r}, [[[1], 1]])
    """)
    scorer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        assert scorer.stdout.readline().strip() == "scoring"
        deadline = time.monotonic() + 10
        while worker is None and time.monotonic() < deadline:
            kids = _children(scorer.pid)
            worker = kids[0] if kids else None
            time.sleep(0.05)
        assert worker is not None, "the scorer started no worker process"
        time.sleep(0.3)                                   # let the worker start on the candidate
        assert _alive(worker)
        scorer.send_signal(signal.SIGKILL)
        scorer.wait()
        deadline = time.monotonic() + wait
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        return worker, _alive(worker)
    finally:
        if scorer.poll() is None:
            scorer.kill()
            scorer.wait()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)               # the process this test started, by its id


@linux_only
def test_worker_spinning_in_c_code_dies_when_its_scorer_is_killed():
    worker, alive = _orphan_after_scorer_killed(C_LOOP, wait=3.0)
    assert not alive, f"sandbox worker {worker} kept running after its scorer was killed"


@linux_only
def test_parent_watchdog_alone_stops_an_orphaned_worker():
    # the portable fallback (no PR_SET_PDEATHSIG, e.g. macOS): a thread in the worker polls its parent
    worker, alive = _orphan_after_scorer_killed(PY_LOOP, setup="sandbox._PARENT_DEATH_SIGNAL = False",
                                                wait=3.0)
    assert not alive, f"sandbox worker {worker} kept running after its scorer was killed"


@linux_only
def test_cpu_time_limit_stops_an_orphan_that_no_other_guard_reaches():
    # no death signal, and the watchdog thread cannot run while C code holds the GIL: RLIMIT_CPU
    worker, alive = _orphan_after_scorer_killed(
        C_LOOP, setup="sandbox._PARENT_DEATH_SIGNAL = False",
        box_args="timeout=0.25, budget=0.25, grace=30.0", wait=30.0)     # grace: the scorer waits
    assert not alive, f"sandbox worker {worker} spun past its CPU-time limit"


def test_twenty_looping_tests_stop_at_the_per_candidate_budget():
    tests = [[[i], i] for i in range(20)]
    with Sandbox(timeout=1.0, budget=1.0) as box:
        start = time.monotonic()
        assert box.run(PY_LOOP, tests) == [False] * 20
        assert time.monotonic() - start < 5.0            # was 20 x 1 s = 20 s
        assert box.pass_rate("def f(x): return x", tests) == 1.0     # the budget is per candidate
    with Sandbox(timeout=0.5) as default_budget:         # default budget: a few per-test timeouts
        start = time.monotonic()
        assert default_budget.run(PY_LOOP, tests) == [False] * 20
        assert time.monotonic() - start < 5.0            # was 20 x 0.5 s = 10 s
        # negative control: fast tests after one slow test still pass while budget is left
        slow_first = "def f(x):\n    while x == 0:\n        pass\n    return x"
        assert default_budget.run(slow_first, tests) == [False] + [True] * 19


def test_interrupted_job_leaves_no_stale_answers_for_the_next_candidate():
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    slow_first = "def f(x):\n    while x == 0:\n        pass\n    return x"
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with Sandbox(timeout=1.0) as box:
            signal.setitimer(signal.ITIMER_REAL, 0.3)     # Ctrl-C while the worker is on test 0
            with pytest.raises(KeyboardInterrupt):
                box.run(slow_first, [[[0], 0], [[1], 1], [[2], 2]])
            # the interrupted job's "0 1 1" must not be read as this candidate's answers
            assert box.run("def f(x): return -x", [[[1], 1], [[2], 2], [[3], -3]]) == [False, False, True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_worker_that_cannot_start_is_an_error_not_a_zero_score():
    with Sandbox(memory_mb=1) as starved:                # dies before it can say "ready"
        with pytest.raises(RuntimeError, match="memory_mb=1"):
            starved.pass_rate("def f(x): return x", [[[1], 1]])


def test_malformed_hidden_tests_are_an_error_naming_the_record_not_a_zero():
    for tests in ([1, 2], [], [[1, 2]], [[[1]]]):
        with pytest.raises(ValueError, match=r"code record 'code-7'.*tests"):
            score("code", "def f(x): return x", {"id": "code-7", "answer": "", "tests": tests})


# ------------------------------------------------------------------ load_task: bad files, bad paths
GSM8K_ROW = {"question": "q", "answer": "#### 1"}
CODE_ROW = {"task": "code", "id": "code-0", "prompt": "Write f(x).", "response": "def f(x): return x",
            "answer": "def f(x): return x", "tests": [[[1], 1]]}


def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_non_utf8_byte_is_named_by_file_and_line(tmp_path, suffix):
    text = {".jsonl": json.dumps(GSM8K_ROW) + "\n" + json.dumps(GSM8K_ROW) + "\n",
            ".json": "[\n" + json.dumps(GSM8K_ROW) + ",\n",
            ".txt": "\nA\n"}[suffix]
    path = tmp_path / f"data{suffix}"
    path.write_bytes(text.encode() + b'{"question": "caf\xe9"}\n')
    task = "logiqa" if suffix == ".txt" else "gsm8k"
    with pytest.raises(ValueError, match=rf"{path.name}:3: .*not UTF-8.*byte 0xe9"):
        load_task(task, path)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GSM8K_ROW) + "\n").encode())
    assert load_task("gsm8k", path)[0]["answer"] == "1"


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"),
                                           ("array.json", "[]"), ("empty.txt", "")])
def test_file_without_records_is_an_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    task = "logiqa" if name.endswith(".txt") else "gsm8k"
    with pytest.raises(ValueError, match=rf"no records in {path}"):
        load_task(task, path)


def test_empty_ability_split_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "mini" / "math").mkdir(parents=True)
    (tmp_path / "mini" / "math" / "train.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no records in .*math/train\.jsonl"):
        load_task("math", tmp_path / "mini")


@pytest.fixture
def offline_hub(monkeypatch):
    """A stand-in ``datasets`` that records hub calls instead of touching the network."""
    calls = []

    def load_dataset(path, *args, split=None):
        calls.append(path)
        return [GSM8K_ROW]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


@pytest.mark.parametrize("source", ["data/real/gsm8k", "data/gsm8k.jsonl", "./foo.jsonl", "./gsm8k",
                                    "../nowhere/gsm8k", "~/nowhere/gsm8k", "/nowhere/gsm8k",
                                    "gsm8k.jsonl", "owner/name/extra", "data\\gsm8k"])
def test_mistyped_local_path_is_file_not_found_before_any_hub_call(tmp_path, monkeypatch, offline_hub,
                                                                   source):
    (tmp_path / "data").mkdir()                          # `data/` exists, so `data/x` means a local path
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no gsm8k data at .*hub id"):
        load_task("gsm8k", source)
    assert offline_hub == []


def test_owner_name_hub_id_still_goes_to_the_hub(tmp_path, monkeypatch, offline_hub):
    monkeypatch.chdir(tmp_path)                          # negative control: no local `openai/` folder
    assert load_task("gsm8k", "openai/gsm8k")[0]["answer"] == "1"
    assert offline_hub == ["openai/gsm8k"]


def test_mistyped_ability_folder_says_how_to_create_it(tmp_path, monkeypatch, offline_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python -m epi data --out data/epi_mni"):
        load_task("math", "data/epi_mni")
    assert offline_hub == []


@pytest.mark.parametrize("tests, why", [([1, 2], r"tests\[0\]"), ([], "at least one"),
                                        ([[1, 2]], r"tests\[0\].*args"), ([[[1]]], r"tests\[0\]"),
                                        ("[[[1], 1]]", "list")])
def test_code_record_with_malformed_tests_fails_at_load_naming_file_and_line(tmp_path, tests, why):
    path = _write_lines(tmp_path / "code.jsonl", [CODE_ROW, {**CODE_ROW, "id": "code-1", "tests": tests}])
    with pytest.raises(ValueError, match=rf"code\.jsonl:2: .*{why}"):
        load_task("code", path)
    assert load_task("code", _write_lines(tmp_path / "ok.jsonl", [CODE_ROW]))[0]["tests"] == [[[1], 1]]

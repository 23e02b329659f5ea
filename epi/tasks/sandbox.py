"""A small sandbox that runs model-written Python functions on hidden tests and returns pass rates.

Two layers, both needed:

1. **Static whitelist** (``check_source``): the candidate is parsed with ``ast`` and may only hold
   top-level ``def`` statements built from a short list of node types (arithmetic, comparisons,
   boolean logic, subscripts/slices, literals, comprehensions, lambdas, conditional expressions,
   simple assignments and loops). Every name must be an argument, a locally bound name or one of
   ``SAFE_BUILTINS``; attributes must be one of ``SAFE_METHODS``; nothing may start with ``_``. So
   ``import``, ``open``, ``__import__`` and ``().__class__`` are rejected before anything runs.
2. **Separate process with limits** (``Sandbox``): accepted code runs in one long-lived worker
   (``python -I -S``) with only the safe builtins, an address-space limit, a per-call alarm
   (``while True: pass`` stops after ``timeout`` seconds) and a per-candidate ``budget`` of wall time
   across all its tests (once spent, the remaining tests fail at once). Loops inside C code ignore
   the alarm, so the parent also waits at most ``timeout + grace`` per test (and ``budget + grace``
   per candidate) and then kills and restarts the worker.

The worker never outlives the scorer: it runs in its own session, asks the kernel for SIGKILL when
its parent dies (``PR_SET_PDEATHSIG``, Linux), polls its parent pid from a watchdog thread (the
portable fallback) and has a CPU-time limit (``RLIMIT_CPU``) of one budget per job, which also stops
a C-level loop that holds the GIL where no death signal exists.

Reusing one worker makes scoring cheap: a few hundred predictions take well under a second.
POSIX only (``select`` on pipes, ``SIGALRM``), which covers Linux, macOS and Colab.
"""

from __future__ import annotations

import ast
import atexit
import functools
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1.0
BUDGET_TIMEOUTS = 3       # default per-candidate budget, in per-test timeouts
MAX_SOURCE_CHARS = 2000
_START_SECONDS = 30.0     # a worker that has not said "ready" by then cannot start at all
# PR_SET_PDEATHSIG fires when the *thread* that started the child exits, so it is only asked for when
# the worker is started from the main thread; the watchdog thread and RLIMIT_CPU cover the rest.
_PARENT_DEATH_SIGNAL = sys.platform.startswith("linux")
_WATCHDOG_SECONDS = 0.25

SAFE_BUILTINS = ("abs", "all", "any", "bool", "chr", "dict", "divmod", "enumerate", "filter", "float",
                 "int", "len", "list", "map", "max", "min", "ord", "range", "reversed", "round", "set",
                 "sorted", "str", "sum", "tuple", "zip")
# str / list / dict methods without side effects outside their object; no `format` (it can reach
# attributes through format strings) and nothing that starts with "_".
SAFE_METHODS = frozenset((
    "append", "capitalize", "count", "endswith", "extend", "find", "get", "index", "insert", "isalpha",
    "isdigit", "islower", "isupper", "items", "join", "keys", "lower", "lstrip", "pop", "remove",
    "replace", "reverse", "rstrip", "sort", "split", "startswith", "strip", "swapcase", "title",
    "upper", "values"))

_ALLOWED_NODES = (
    ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Return, ast.Assign, ast.AugAssign, ast.If,
    ast.For, ast.While, ast.Break, ast.Continue, ast.Pass, ast.Expr, ast.Name, ast.Load, ast.Store,
    ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.BinOp, ast.UnaryOp, ast.BoolOp,
    ast.Compare, ast.IfExp, ast.Call, ast.keyword, ast.Attribute, ast.Subscript, ast.Slice, ast.ListComp,
    ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.comprehension, ast.Lambda, ast.operator,
    ast.unaryop, ast.boolop, ast.cmpop)


class UnsafeCodeError(ValueError):
    """The candidate source uses something outside the sandbox's whitelist."""


def _bound_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def check_source(source: str) -> ast.Module:
    """Return the parsed module if ``source`` only uses whitelisted Python; raise ``UnsafeCodeError``.

    A ``SyntaxError`` from the parser is re-raised as ``UnsafeCodeError`` too: either way the code
    must not run.
    """
    if len(source) > MAX_SOURCE_CHARS:
        raise UnsafeCodeError(f"source has {len(source)} characters, more than {MAX_SOURCE_CHARS}")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as err:
        raise UnsafeCodeError(f"cannot parse candidate: {err}") from None
    if not tree.body or not all(isinstance(stmt, ast.FunctionDef) for stmt in tree.body):
        raise UnsafeCodeError("candidate must consist of top-level function definitions only")
    allowed_names = _bound_names(tree) | set(SAFE_BUILTINS)
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if not isinstance(node, _ALLOWED_NODES):
            raise UnsafeCodeError(f"{type(node).__name__} is not allowed ({where})")
        if isinstance(node, ast.FunctionDef) and (node.decorator_list or node.returns):
            raise UnsafeCodeError(f"decorators and annotations are not allowed ({where})")
        if isinstance(node, ast.FunctionDef) and node not in tree.body:
            raise UnsafeCodeError(f"nested function definitions are not allowed ({where})")
        if isinstance(node, ast.arguments) and (node.vararg or node.kwarg or node.kwonlyargs):
            raise UnsafeCodeError(f"only simple positional arguments are allowed ({where})")
        if isinstance(node, ast.arg) and node.annotation is not None:
            raise UnsafeCodeError(f"annotations are not allowed ({where})")
        name = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                else node.arg if isinstance(node, (ast.arg, ast.keyword)) else None)
        if isinstance(node, ast.keyword) and name is None:
            raise UnsafeCodeError(f"**kwargs in calls are not allowed ({where})")
        if name is not None and name.startswith("_"):
            raise UnsafeCodeError(f"names starting with '_' are not allowed: {name!r} ({where})")
        if isinstance(node, ast.Name) and node.id not in allowed_names:
            raise UnsafeCodeError(f"unknown name {node.id!r}; allowed builtins: {', '.join(SAFE_BUILTINS)}")
        if isinstance(node, ast.Attribute) and (node.attr not in SAFE_METHODS
                                                or not isinstance(node.ctx, ast.Load)):
            raise UnsafeCodeError(f"attribute {node.attr!r} is not allowed ({where})")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool, type(None))):
            raise UnsafeCodeError(f"constant of type {type(node.value).__name__} is not allowed ({where})")
    return tree


# The worker is stdlib-only and self-contained: it runs under `python -I -S`, without site-packages.
_WORKER = r"""
import builtins, json, os, signal, sys, threading, time
if DEATH_SIGNAL:
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))    # PR_SET_PDEATHSIG: die with the parent
        del ctypes
    except Exception:
        pass
if os.getppid() != PARENT:                                  # the parent died before that took effect
    os._exit(1)

def watchdog():
    while True:
        time.sleep(WATCHDOG)
        if os.getppid() != PARENT:
            os._exit(1)

if WATCHDOG > 0:
    threading.Thread(target=watchdog, daemon=True).start()
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))        # a crash or SIGXCPU leaves no core file
except Exception:
    resource = None

def limit_cpu(seconds):
    # RLIMIT_CPU counts the whole life of the worker, so every job moves the soft limit to used + budget
    if resource is None:
        return
    try:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        soft = int(usage.ru_utime + usage.ru_stime + seconds) + 1
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except Exception:
        pass

SAFE = {name: getattr(builtins, name) for name in NAMES}

class CallTimeout(BaseException):
    pass

def on_alarm(signum, frame):
    raise CallTimeout()

signal.signal(signal.SIGALRM, on_alarm)

def plain(v):
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v

def same(a, b):
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and type(a) in (str, dict, type(None)) and a == b

def results(job):
    limit_cpu(job["budget"] + 1)
    deadline = time.monotonic() + job["budget"]
    try:
        env = {"__builtins__": dict(SAFE)}
        exec(compile(job["src"], "<candidate>", "exec"), env)
        fn = env[job["entry"]]
    except BaseException:
        fn = None
    for args, expected in job["tests"]:
        ok = False
        left = deadline - time.monotonic()
        if fn is not None and left > 0:
            signal.setitimer(signal.ITIMER_REAL, min(job["timeout"], left))
            try:
                ok = same(plain(fn(*args)), expected)
            except BaseException:
                ok = False
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        yield ok

# a canary through the same path: a worker that cannot pass it (too little memory, a broken Python)
# would fail every candidate, so it stays silent and the parent reports that it did not start
CANARY = {"src": "def f(x):\n    return sorted([x] * 1000)[0]", "entry": "f", "tests": [[[7], 7]],
          "timeout": 5.0, "budget": 5.0}
if not all(results(json.loads(json.dumps(CANARY)))):
    os._exit(3)
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    for ok in results(json.loads(line)):
        sys.stdout.write("1\n" if ok else "0\n")
        sys.stdout.flush()
"""


def check_tests(tests: object) -> list[list]:
    """Return ``tests`` as a list of ``[args, expected]`` pairs; raise ``ValueError`` naming the bad one.

    A test is a two-item list or tuple whose first item is the list of positional arguments; there
    must be at least one. Malformed tests are a data error, never a failed candidate.
    """
    if not isinstance(tests, (list, tuple)):
        raise ValueError(f"tests must be a list of [args, expected] pairs, got {type(tests).__name__}")
    if not tests:
        raise ValueError("tests must hold at least one [args, expected] pair, got an empty list")
    for i, test in enumerate(tests):
        if not (isinstance(test, (list, tuple)) and len(test) == 2 and isinstance(test[0], (list, tuple))):
            raise ValueError(f"tests[{i}] must be a pair [args, expected] with args a list of "
                             f"positional arguments, got {test!r:.80}")
    return [[list(args), expected] for args, expected in tests]


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


class Sandbox:
    """One worker process that runs whitelisted candidates on tests; restarted when it hangs or dies.

    ``timeout`` bounds one test, ``budget`` (default ``BUDGET_TIMEOUTS * timeout``) all tests of one
    candidate. Use as a context manager or call ``close()``. Thread-safe (one job at a time); after
    ``fork`` the child starts its own worker.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, memory_mb: int = 512, grace: float = 0.5,
                 budget: float | None = None) -> None:
        self.timeout = _positive("timeout", timeout)
        self.budget = _positive("budget", BUDGET_TIMEOUTS * self.timeout if budget is None else budget)
        self.memory_mb, self.grace = memory_mb, grace
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0

    def _worker(self) -> subprocess.Popen:
        if self._proc is None or self._owner != os.getpid() or self._proc.poll() is not None:
            if self._proc is not None and self._owner == os.getpid():
                self._kill()
            death_signal = _PARENT_DEATH_SIGNAL and threading.current_thread() is threading.main_thread()
            code = (_WORKER.replace("MEMORY", str(self.memory_mb * 2**20))
                    .replace("NAMES", repr(SAFE_BUILTINS))
                    .replace("DEATH_SIGNAL", repr(death_signal)).replace("PARENT", str(os.getpid()))
                    .replace("WATCHDOG", repr(float(_WATCHDOG_SECONDS))))
            # a session of its own: a Ctrl-C meant for the scorer's terminal never reaches the worker
            # (it would turn into a silently failed test), and killpg reaches all it could start
            self._proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", code], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                                          start_new_session=True)
            self._owner, self._buf = os.getpid(), b""
            if self._readline(time.monotonic() + _START_SECONDS) != "ready":
                try:
                    status = self._proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    status = None
                self._kill()
                why = (f"exited with status {status} before it was ready" if status is not None
                       else f"did not say it was ready within {_START_SECONDS:.0f} s")
                raise RuntimeError(f"the sandbox worker ({sys.executable} -I -S) {why}, so no candidate "
                                   f"could be scored; check that this Python runs without site-packages "
                                   f"and that memory_mb={self.memory_mb} leaves it room (the default is 512)")
        return self._proc

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.returncode is None:     # not reaped yet, so its pid (= group id) is not reused
                try:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                except OSError:
                    self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()
        self._proc, self._buf = None, b""

    def _readline(self, deadline: float) -> str | None:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:                     # the worker died (e.g. memory limit)
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def run(self, source: str, tests: Sequence[Sequence]) -> list[bool]:
        """Return one pass/fail per test ``[args, expected]`` for the last function ``source`` defines.

        Raises ``ValueError`` for malformed ``tests`` (see ``check_tests``) and ``UnsafeCodeError`` if
        the source fails the whitelist (nothing runs then). Tests left when the candidate's ``budget``
        is spent fail.
        """
        tests = check_tests(tests)
        tree = check_source(source)
        entry = tree.body[-1].name
        try:
            job = json.dumps({"src": source, "entry": entry, "tests": tests, "timeout": self.timeout,
                              "budget": self.budget}) + "\n"
        except (TypeError, ValueError) as err:
            raise ValueError(f"tests must hold JSON values (numbers, strings, lists, dicts, None): {err}") \
                from None
        with self._lock:
            proc = self._worker()
            results: list[bool] = []
            try:
                try:
                    proc.stdin.write(job.encode())
                except BrokenPipeError:
                    self._kill()
                    proc = self._worker()
                    proc.stdin.write(job.encode())
                spent = time.monotonic() + self.budget + self.grace
                for _ in tests:
                    line = self._readline(min(time.monotonic() + self.timeout + self.grace, spent))
                    if line is None:          # hung in C code or died: fail the rest, start afresh
                        logger.debug("sandbox worker stopped responding; restarting it")
                        self._kill()
                        self.restarts += 1
                        break
                    results.append(line == "1")
            except BaseException:             # e.g. Ctrl-C: the job's late answers would be read as
                self._kill()                  # the next candidate's, so its worker goes with it
                raise
        return results + [False] * (len(tests) - len(results))

    def pass_rate(self, source: str, tests: Sequence[Sequence]) -> float:
        """Return the fraction of ``tests`` passed (0.0 for code that is unsafe or does not parse)."""
        try:
            return sum(self.run(source, tests)) / len(tests)
        except UnsafeCodeError as err:
            logger.debug("rejected candidate: %s", err)
            return 0.0

    def close(self) -> None:
        """Stop the worker process (a later call starts a new one)."""
        with self._lock:
            if self._owner == os.getpid():
                self._kill()
            self._proc = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.lru_cache(maxsize=None)
def default_sandbox(timeout: float = DEFAULT_TIMEOUT, budget: float | None = None) -> Sandbox:
    """Return the process-wide shared ``Sandbox`` for ``timeout`` and ``budget`` (closed at exit)."""
    box = Sandbox(timeout, budget=budget)
    atexit.register(box.close)
    return box


def pass_rate(source: str, tests: Sequence[Sequence], timeout: float = DEFAULT_TIMEOUT,
              budget: float | None = None) -> float:
    """Return the fraction of ``tests`` that ``source`` passes, run in the shared sandbox."""
    return default_sandbox(timeout, budget).pass_rate(source, tests)

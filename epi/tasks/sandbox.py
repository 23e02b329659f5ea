"""A small sandbox that runs model-written Python functions on hidden tests and returns pass rates.

Two layers, both needed:

1. **Static whitelist** (``check_source``): the candidate is parsed with ``ast`` and may only hold
   top-level ``def`` statements built from a short list of node types (arithmetic, comparisons,
   boolean logic, subscripts/slices, literals, comprehensions, lambdas, conditional expressions,
   simple assignments and loops). Every name must be an argument, a locally bound name or one of
   ``SAFE_BUILTINS``; attributes must be one of ``SAFE_METHODS``; nothing may start with ``_``. So
   ``import``, ``open``, ``__import__`` and ``().__class__`` are rejected before anything runs.
2. **Separate process with limits** (``Sandbox``): accepted code runs in one long-lived worker
   (``python -I -S``) with only the safe builtins, an address-space limit, and a per-call alarm
   (``while True: pass`` stops after ``timeout`` seconds). Loops inside C code ignore the alarm, so
   the parent also waits at most ``timeout + grace`` per test and then kills and restarts the worker.

Reusing one worker makes scoring cheap: a few hundred predictions take well under a second.
POSIX only (``select`` on pipes, ``SIGALRM``), which covers Linux, macOS and Colab.
"""

from __future__ import annotations

import ast
import atexit
import functools
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1.0
MAX_SOURCE_CHARS = 2000

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
import builtins, json, signal, sys
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
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

for line in sys.stdin:
    job = json.loads(line)
    try:
        env = {"__builtins__": dict(SAFE)}
        exec(compile(job["src"], "<candidate>", "exec"), env)
        fn = env[job["entry"]]
    except BaseException:
        fn = None
    for args, expected in job["tests"]:
        ok = False
        if fn is not None:
            signal.setitimer(signal.ITIMER_REAL, job["timeout"])
            try:
                ok = same(plain(fn(*args)), expected)
            except BaseException:
                ok = False
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout.write("1\n" if ok else "0\n")
        sys.stdout.flush()
"""


class Sandbox:
    """One worker process that runs whitelisted candidates on tests; restarted when it hangs or dies.

    Use as a context manager or call ``close()``. Thread-safe (one job at a time); after ``fork`` the
    child starts its own worker.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, memory_mb: int = 512, grace: float = 0.5) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout, self.memory_mb, self.grace = timeout, memory_mb, grace
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0

    def _worker(self) -> subprocess.Popen:
        if self._proc is None or self._owner != os.getpid() or self._proc.poll() is not None:
            if self._proc is not None and self._owner == os.getpid():
                self._kill()
            code = _WORKER.replace("MEMORY", str(self.memory_mb * 2**20)).replace(
                "NAMES", repr(SAFE_BUILTINS))
            self._proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", code], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
            self._owner, self._buf = os.getpid(), b""
        return self._proc

    def _kill(self) -> None:
        if self._proc is not None:
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

        Raises ``UnsafeCodeError`` if the source fails the whitelist (nothing runs then).
        """
        tree = check_source(source)
        entry = tree.body[-1].name
        job = json.dumps({"src": source, "entry": entry, "tests": [list(t) for t in tests],
                          "timeout": self.timeout}) + "\n"
        with self._lock:
            proc = self._worker()
            try:
                proc.stdin.write(job.encode())
            except BrokenPipeError:
                self._kill()
                proc = self._worker()
                proc.stdin.write(job.encode())
            results: list[bool] = []
            for _ in tests:
                line = self._readline(time.monotonic() + self.timeout + self.grace)
                if line is None:              # hung in C code or died: fail the rest, start afresh
                    logger.debug("sandbox worker stopped responding; restarting it")
                    self._kill()
                    self.restarts += 1
                    break
                results.append(line == "1")
        return results + [False] * (len(tests) - len(results))

    def pass_rate(self, source: str, tests: Sequence[Sequence]) -> float:
        """Return the fraction of ``tests`` passed (0.0 for code that is unsafe or does not parse)."""
        if not tests:
            raise ValueError("pass_rate needs at least one test")
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
def default_sandbox(timeout: float = DEFAULT_TIMEOUT) -> Sandbox:
    """Return the process-wide shared ``Sandbox`` for ``timeout`` (its worker is closed at exit)."""
    box = Sandbox(timeout)
    atexit.register(box.close)
    return box


def pass_rate(source: str, tests: Sequence[Sequence], timeout: float = DEFAULT_TIMEOUT) -> float:
    """Return the fraction of ``tests`` that ``source`` passes, run in the shared sandbox."""
    return default_sandbox(timeout).pass_rate(source, tests)

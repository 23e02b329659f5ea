"""Imports run one way: no cycle, nothing imports the CLI, and each layer imports only the layers below it.

The walk reads every module of `epi/` with `ast`: imports inside functions count (they run as soon as the
function does), imports under `if TYPE_CHECKING:` do not, relative imports are resolved, and importing a
submodule also runs its packages' `__init__` (an edge to each package the importer is not inside).

Layers (docs: the README's map of the modules):
  util         jsonio, progress: leaves every layer may use
  engine       config, importance, masks, isolation, EvolvingIsolation, back-end checks
  tasks        the abilities, real adapters, scorers, evaluation
  models       the model factory, cached bases (read only), shapes
  training     the loop, data schedule, checkpoints, device
  methods      one class per method (+ the CPI-FT pieces)
  analysis     metrics, stats, drift, compare, plots, report: they read records, never train
  experiments  profiles, runner, base builds, general ability, collecting runs, the real-model experiment
  integrations HF Trainer, recipe, memory plan, method store, distributed entry point
  api          `epi/__init__.py`: the public engine API
  top          the CLI (`__main__`, which nothing imports), notebook setup, benchmarks, tools
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest

from helpers import ROOT

PACKAGE = "epi"
CLI = "epi.__main__"

BELOW = ("util", "engine", "tasks", "models")
ALLOWED: Dict[str, Set[str]] = {  # layer -> the other layers it may import
    "util": set(),
    "engine": {"util"},
    "tasks": {"util"},
    "models": {"util", "tasks"},
    "training": {*BELOW},
    "methods": {*BELOW, "training"},
    "analysis": {*BELOW},
    "experiments": {*BELOW, "training", "methods", "analysis"},
    "integrations": {*BELOW, "training", "methods", "analysis"},
    "api": {"engine"},
    "top": {*BELOW, "training", "methods", "analysis", "experiments", "integrations", "api"},
}
SUBPACKAGES = ("engine", "tasks", "models", "training", "methods", "analysis", "experiments", "integrations")
TOP_LEVEL = {  # modules directly under epi/: the layer each belongs to
    "epi": "api", "epi.jsonio": "util", "epi.progress": "util",
    # public paths kept for users: each belongs to the layer it re-exports
    "epi.metrics": "analysis", "epi.hf": "integrations", "epi.distributed": "integrations",
    "epi.real_cpu": "experiments",
    "epi.__main__": "top", "epi.nb": "top", "epi.colab": "top", "epi.bench": "top", "epi.gpu_check": "top",
    "epi.reproduce": "top",
}


# ---- the walk ------------------------------------------------------------------------------------------
def modules(root: Path, package: str) -> Dict[str, Path]:
    """Return {module name: file} of every .py file of the package under root/<package>."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST) -> Iterator[ast.AST]:
    """Yield the import statements under `node`, at any depth, except those under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _imports(child)


def imported(name: str, path: Path, known: Set[str], package: str) -> Set[str]:
    """Return the package's modules that importing module `name` (file `path`) runs."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    targets: Set[str] = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
            continue
        if node.level:
            base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            targets.add(sub if sub in known else source)
    out = set()
    for target in targets:
        if target != package and not target.startswith(package + "."):
            continue
        while target not in known and "." in target:  # `import epi.x.y` of a name that is not a module
            target = target.rpartition(".")[0]
        out.add(target)
        parts = target.split(".")
        for i in range(1, len(parts)):  # the packages on the way run their __init__ first
            ancestor = ".".join(parts[:i])
            if not (name == ancestor or name.startswith(ancestor + ".")):
                out.add(ancestor)
    out.discard(name)
    return out


def import_graph(root: Path, package: str) -> Dict[str, Set[str]]:
    """Return {module: the package's modules it imports} for every module of `package` under `root`."""
    found = modules(root, package)
    return {name: imported(name, path, set(found), package) for name, path in found.items()}


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Return one cycle (a → … → a) per strongly connected component that has one (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(sorted(c), graph) for c in components]


def _cycle_in(component: List[str], graph: Dict[str, Set[str]]) -> List[str]:
    """Return a path start → … → start inside one strongly connected component."""
    inside, start = set(component), component[0]
    path, seen = [start], {start}
    while True:
        nxt = next((w for w in sorted(graph[path[-1]]) if w in inside and (w == start or w not in seen)), None)
        if nxt is None:  # dead end inside the component: step back
            path.pop()
            if not path:
                return component + [component[0]]
            continue
        path.append(nxt)
        if nxt == start:
            return path
        seen.add(nxt)


def layer_of(module: str, package: str = PACKAGE) -> Optional[str]:
    """Return the layer of a module of epi (None for a module that no layer claims yet)."""
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == package and parts[1] in SUBPACKAGES:
        return parts[1]
    return None


def layer_violations(graph: Dict[str, Set[str]]) -> List[str]:
    """Return "a (layer) → b (layer)" for every import a layer may not make."""
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            la, lb = layer_of(a), layer_of(b)
            if la != lb and lb not in ALLOWED[la]:
                bad.append(f"{a} ({la}) → {b} ({lb})")
    return bad


# ---- the package -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> Dict[str, Set[str]]:
    return import_graph(ROOT, PACKAGE)


def test_every_module_belongs_to_a_layer(graph):
    unplaced = [m for m in graph if layer_of(m) is None]
    assert not unplaced, f"put {unplaced} in a layer's folder (or name its layer in TOP_LEVEL)"


def test_the_package_has_no_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_nothing_imports_the_cli(graph):
    importers = sorted(m for m, targets in graph.items() if CLI in targets)
    assert not importers, f"{importers} import {CLI}: move what they need below the CLI"


def test_each_layer_imports_only_the_layers_below_it(graph):
    bad = layer_violations(graph)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_analysis_reads_records_and_never_imports_training_methods_or_experiments(graph):
    reach = {b for a, targets in graph.items() if layer_of(a) == "analysis" for b in targets}
    assert not {layer_of(b) for b in reach} & {"training", "methods", "experiments", "integrations", "top"}


def test_the_engine_imports_nothing_else_of_the_package(graph):
    assert all(layer_of(b) == "engine" for a, targets in graph.items() if layer_of(a) == "engine" for b in targets)


# ---- the checker on a synthetic package (negative controls) -------------------------------------------------
def write_package(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def late():\n    from .c import x\n",
        "pkg/c.py": "import pkg.a\nx = 1\n",
        "pkg/d.py": "from pkg import a\n",  # imports into the cycle, but is not on it
    })
    cycles = find_cycles(import_graph(tmp_path, "pkg"))
    assert cycles == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_the_checker_ignores_type_checking_imports_and_resolves_relative_ones(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..high.run import Run\n",
        "pkg/high/__init__.py": "",
        "pkg/high/run.py": "from ..low.base import *\nfrom ..low import base\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.low.base"] == set()
    assert graph["pkg.high.run"] == {"pkg.low", "pkg.low.base"}  # the package __init__ runs first
    assert find_cycles(graph) == []


def test_the_checker_sees_a_cycle_through_a_package_init(tmp_path):
    # importing pkg.shim runs pkg/sub/__init__.py, which imports the module that imports pkg.shim
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/shim.py": "from pkg.sub.real import *\n",
        "pkg/sub/__init__.py": "from . import user\n",
        "pkg/sub/real.py": "x = 1\n",
        "pkg/sub/user.py": "from pkg.shim import x\n",
    })
    assert find_cycles(import_graph(tmp_path, "pkg")) == [["pkg.shim", "pkg.sub", "pkg.sub.user", "pkg.shim"]]


def test_the_layer_rule_flags_an_upward_import_and_an_import_of_the_cli():
    graph = {"epi.analysis.plots": {"epi.training.loop", "epi.engine.masks"},
             "epi.engine.core": {"epi.__main__"}, "epi.__main__": set(), "epi.training.loop": set(),
             "epi.engine.masks": set()}
    assert layer_violations(graph) == ["epi.analysis.plots (analysis) → epi.training.loop (training)",
                                       "epi.engine.core (engine) → epi.__main__ (top)"]


# ---- the public paths keep working ------------------------------------------------------------------------
def test_the_public_import_paths_still_work():
    import epi
    import epi.hf
    import epi.metrics
    import epi.models
    import epi.tasks
    from epi import EPIConfig, EvolvingIsolation
    assert epi.EPIConfig is EPIConfig and epi.EvolvingIsolation is EvolvingIsolation
    assert {"EPICallback", "EPITrainerMixin", "TaskCollator", "task_blocks"} <= set(dir(epi.hf))
    assert callable(epi.metrics.average_normalized_score) and callable(epi.metrics.conflict_scores)
    assert callable(epi.models.load_model) and callable(epi.models.count_parameters)
    assert callable(epi.tasks.evaluate) and "math" in epi.tasks.ABILITIES


@pytest.mark.parametrize("module", ["epi", "epi.distributed", "epi.real_cpu"])
def test_the_documented_module_commands_still_start(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: python -m " + module in out.stdout

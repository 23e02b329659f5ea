"""environment.yml (exact pins) agrees with pyproject.toml (floors); the CLI and CI entry exist."""
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from helpers import ROOT


def pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    out = {}
    for line in pip:
        if line.startswith("-e"):
            continue
        name, version = line.split("==")
        out[name.lower()] = Version(version)
    return env, out


def floors():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_environment_yml_parses_and_pins_exact_versions():
    env, pinned = pins()
    assert env["name"] == "epi"
    assert "python=3.11" in env["dependencies"]
    assert pinned["torch"] == Version("2.13.0")


def test_every_pyproject_dependency_is_pinned_within_its_floor():
    _, pinned = pins()
    for req in floors():
        name = req.name.lower()
        assert name in pinned, f"{name} is in pyproject.toml but not pinned in environment.yml"
        assert pinned[name] in req.specifier, f"{name}=={pinned[name]} violates pyproject's {req.specifier}"


def test_pyproject_declares_floors_only():
    for req in floors():
        assert all(s.operator == ">=" for s in req.specifier), f"{req}: pyproject.toml takes floors only"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and re.search(r"^make test$", ci, re.M)


def test_cli_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "epi", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("data", "bench", "reproduce"):
        assert command in out


def test_jupyterlab_is_in_the_notebooks_extra():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["notebooks"]
    assert any(Requirement(r).name == "jupyterlab" for r in extra)


def test_make_lab_opens_the_notebooks_with_the_venvs_jupyter():
    """`make lab` installs what `make test` installs (the same .venv) and starts that venv's JupyterLab."""
    if not shutil.which("make"):
        pytest.skip("make is missing")
    # under `make test` the parent make's MAKEFLAGS/MAKELEVEL would add "make[1]: Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    plan = subprocess.run(["make", "--no-print-directory", "-n", "-B", "lab"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout
    lines = plan.splitlines()
    assert any('pip install -q -e ".[test]"' in line for line in lines), "the install step of make test"
    assert lines[-1].split()[:3] == [".venv/bin/jupyter", "lab", "notebooks"]
    assert any("import jupyterlab" in line and ".venv/bin/python" in line for line in lines)

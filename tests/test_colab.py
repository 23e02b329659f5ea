"""The notebooks' Colab branch, run for real in fresh Jupyter kernels: the install cell clones a snapshot of
this working tree (offline, through EPI_REPO_URL) into a temporary folder standing in for /content, the
kernel imports epi from that clone and runs the notebook's setup cell; then a restarted runtime, with and
without the install cell. Colab itself is a stand-in `google.colab` module (imported at kernel start, as
Colab's kernel does) and pip is a stand-in that only records its arguments: a real `pip install -e` of the
clone would replace the test environment's own editable install of epi.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from epi.colab import CLONE_FOLDER
from helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is missing")

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
COLAB_START = "import google.colab  # Colab's kernel imports it at start-up"
PROBE = """import json, os, sys, epi
print("PROBE", json.dumps({"epi": epi.__file__, "cwd": os.getcwd(), "sys_path": sys.path,
                          "out": str(globals()["info"]["out"]) if "info" in globals() else None}))"""
PIP_STAND_IN = '''"""Records `python -m pip ...` (one JSON line per call) instead of installing anything."""
import json, os, sys
with open(os.environ["EPI_TEST_PIP_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
'''


def git(*args, cwd):
    """Return git's stdout (identity and signing fixed, so CI's empty git config works)."""
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid",
                           "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A git repository holding one commit of this working tree (tracked and new files; ignored ones left out)."""
    try:
        files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    except subprocess.CalledProcessError:
        pytest.skip(f"{ROOT} is not a git checkout")
    repo = tmp_path_factory.mktemp("origin")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "snapshot of the working tree", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A folder for PYTHONPATH: google.colab (namespace `google`, as on Colab) and a recording pip."""
    path = tmp_path_factory.mktemp("stand_ins")
    (path / "google" / "colab").mkdir(parents=True)
    (path / "google" / "colab" / "__init__.py").write_text('"""Stand-in for Colab\'s module."""\n')
    (path / "pip").mkdir()
    (path / "pip" / "__init__.py").write_text("")
    (path / "pip" / "__main__.py").write_text(PIP_STAND_IN)
    # the kernel must be this interpreter, whatever kernelspecs the user has registered
    spec = path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    return path


@pytest.fixture
def kernel_env(stand_ins, origin, tmp_path, monkeypatch):
    """Return (content folder, env for the kernel, pip log): a Colab-like run pointed at the local origin."""
    monkeypatch.setenv("JUPYTER_PATH", str(stand_ins / "jupyter"))
    content = tmp_path / "content"
    content.mkdir()
    pip_log = tmp_path / "pip.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(stand_ins), env.get("PYTHONPATH")])),
               EPI_COLAB_ROOT=str(content), EPI_REPO_URL=origin.as_uri(), EPI_TEST_PIP_LOG=str(pip_log),
               EPI_SMOKE="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return content, env, pip_log


def notebook_cells(path):
    """Return (install cell, cells after it up to and including the first real cell: the setup_notebook call)."""
    cells = nbformat.read(path, as_version=4).cells
    code = [i for i, c in enumerate(cells) if c.cell_type == "code"]
    setup = next(i for i, c in enumerate(cells) if "epi.nb.setup_notebook" in c.source)
    return cells[code[0]], [c for c in cells[code[0] + 1:setup + 1] if c.cell_type == "code"]


def run_kernel(sources, cwd, env, colab=True):
    """Run code in a fresh kernel started in `cwd`; return what the PROBE line printed (None if not run)."""
    cells = [nbformat.v4.new_code_cell(s) for s in ([COLAB_START] if colab else []) + list(sources)]
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": kernelspec})
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute(env=env)
    for out in nb.cells[-1].get("outputs", []):
        if out.get("name") == "stdout" and out["text"].startswith("PROBE "):
            return json.loads(out["text"][len("PROBE "):])
    return None


def pip_calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_colab_run_imports_the_clone_in_one_kernel_and_again_after_a_restart(kernel_env, origin):
    content, env, pip_log = kernel_env
    clone = content / CLONE_FOLDER
    install, first = notebook_cells(NOTEBOOKS[0])

    # Open in Colab → Run all: clone, install, and the first real cell imports epi from the clone
    probe = run_kernel([install.source, *(c.source for c in first), PROBE], content, env)
    assert (clone / ".git").is_dir() and (clone / "pyproject.toml").is_file()
    assert Path(probe["epi"]) == clone / "epi" / "__init__.py"
    assert Path(probe["out"]) == clone / "artifacts" / "smoke" / NOTEBOOKS[0].stem
    assert Path(probe["cwd"]) == content, "the cell must not change the working folder"
    assert pip_calls(pip_log) == [["install", "-q", "-e", f"{clone}[notebooks]"]], "editable, no torch, no upgrade"

    # the repository moves on; the runtime restarts and Run all starts again, here from notebook 07
    (origin / "NEWS.md").write_text("a later commit\n")
    git("add", "NEWS.md", cwd=origin)
    git("commit", "-q", "-m", "later", cwd=origin)
    install, first = notebook_cells(NOTEBOOKS[-1])
    probe = run_kernel([install.source, *(c.source for c in first), PROBE], content, env)
    assert git("rev-parse", "HEAD", cwd=clone) == git("rev-parse", "HEAD", cwd=origin), "the clone fast-forwards"
    assert Path(probe["epi"]) == clone / "epi" / "__init__.py"
    assert probe["sys_path"].count(str(clone)) == 1
    assert len(pip_calls(pip_log)) == 2

    # restarted, the install cell skipped: the working folder /content must not shadow the installed package
    # (here the test environment's own install of epi answers, on Colab the clone's editable install)
    probe = run_kernel([*(c.source for c in first), "from epi.training.data import StepData", PROBE], content, env)
    assert probe["epi"] and Path(probe["epi"]).is_file(), "a namespace package has no __file__"
    package = Path(probe["epi"]).parent
    assert package.name == "epi" and (package / "training" / "data.py").is_file()
    assert len(pip_calls(pip_log)) == 2


def test_a_clone_named_epi_in_the_working_folder_would_shadow_the_package(kernel_env):
    """Negative control for the folder name: the old cell's /content/epi turns `epi` into a namespace package."""
    content, env, _ = kernel_env
    (content / "epi" / "data").mkdir(parents=True)  # the repository's layout: data/ beside the package
    (content / "epi" / "epi").mkdir()
    shadowed = "import epi, json\nprint('PROBE', json.dumps({'epi': epi.__file__, 'path': list(epi.__path__)}))"
    probe = run_kernel([shadowed], content, env)
    assert probe["epi"] is None and probe["path"] == [str(content / "epi")]


def test_install_cell_does_nothing_outside_colab(kernel_env):
    content, env, pip_log = kernel_env
    install, _ = notebook_cells(NOTEBOOKS[0])
    run_kernel([install.source, "import sys\nassert 'google.colab' not in sys.modules"], content, env, colab=False)
    assert not list(content.iterdir()) and not pip_calls(pip_log)


def test_the_other_notebooks_run_all_from_their_install_cells_in_one_kernel(kernel_env):
    """Notebooks 02-06, one after the other in one kernel (a kernel start costs more than their first cells)."""
    content, env, pip_log = kernel_env
    clone = content / CLONE_FOLDER
    sources = []
    for path in NOTEBOOKS[1:-1]:
        install, first = notebook_cells(path)
        sources += [install.source, *(c.source for c in first)]
    probe = run_kernel([*sources, PROBE], content, env)
    assert Path(probe["epi"]) == clone / "epi" / "__init__.py"
    assert Path(probe["out"]) == clone / "artifacts" / "smoke" / NOTEBOOKS[-2].stem
    assert probe["sys_path"].count(str(clone)) == 1, "a rerun of the install cell must not stack sys.path entries"
    assert len(pip_calls(pip_log)) == len(NOTEBOOKS[1:-1])

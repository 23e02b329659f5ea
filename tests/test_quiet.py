"""epi.nb.quiet(): a kernel started by papermill, nbval, nbclient or nbconvert is quiet with no variable set;
`python -m epi reproduce` says so explicitly (its kernels' parent is the epi CLI); a person's kernel is not."""
import os
import subprocess
import sys
import textwrap

import nbformat
import pytest

import epi.nb
import epi.reproduce
from epi.nb import quiet, started_by_executor

PROBE = "import epi.nb\nprint('QUIET', epi.nb.quiet(), epi.nb.started_by_executor())"
SIGNALS = ("CI", "EPI_SMOKE", "EPI_QUIET", "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER")


def clean_env():
    """Return this process's environment without any variable that makes quiet() True."""
    return {k: v for k, v in os.environ.items() if k not in SIGNALS and not k.startswith("PYTEST_")}


@pytest.mark.parametrize("cmdline, expected", [
    ("/usr/bin/python3 /usr/local/bin/papermill in.ipynb out.ipynb -p PROFILE cpu", True),
    ("/work/.venv/bin/python -m pytest -q --nbval-lax notebooks/03_evolving_isolation.ipynb", True),
    ("/usr/bin/python3 /usr/local/bin/jupyter-nbconvert --to notebook --execute 01.ipynb", True),
    ("/usr/bin/python3 /usr/local/bin/jupyter-execute 01.ipynb", True),
    ("/usr/bin/python3 /usr/local/bin/jupyter-lab --no-browser", False),
    ("/usr/bin/python3 -m colab_kernel_launcher -f /root/.local/share/jupyter/runtime/kernel.json", False),
    ("/work/.venv/bin/python -m epi reproduce --profile cpu", False),
])
def test_started_by_executor_reads_the_parent_command_line(cmdline, expected):
    assert started_by_executor(cmdline) is expected


def test_epi_quiet_decides_over_every_other_signal(monkeypatch):
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("EPI_QUIET", "0")
    assert quiet() is False
    for var in SIGNALS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(epi.nb, "started_by_executor", lambda: False)
    assert quiet() is False
    monkeypatch.setenv("EPI_QUIET", "1")
    assert quiet() is True


def run_papermill(tmp_path, env):
    """Execute a one-cell notebook with the papermill CLI; return what its probe printed."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(PROBE)], metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    src, out = tmp_path / "probe.ipynb", tmp_path / "probe.out.ipynb"
    nbformat.write(nb, src)
    subprocess.run([sys.executable, "-m", "papermill", str(src), str(out), "-k", "python3", "--no-progress-bar"],
                   env=env, check=True, capture_output=True, timeout=300)
    return nbformat.read(out, as_version=4).cells[0].outputs[0]["text"].split()


def test_a_papermill_run_is_quiet_with_no_variable_set(tmp_path):
    assert run_papermill(tmp_path, clean_env()) == ["QUIET", "True", "True"]


def test_a_kernel_started_by_a_plain_program_is_not_quiet(tmp_path):
    """Negative control: the same probe in a kernel whose parent is an ordinary script (as a person's is)."""
    script = tmp_path / "start_kernel.py"
    script.write_text(textwrap.dedent(f"""
        from jupyter_client.manager import start_new_kernel
        km, kc = start_new_kernel(kernel_name="python3")
        try:
            reply = kc.execute_interactive({PROBE!r}, timeout=120,
                                           output_hook=lambda m: m["msg_type"] == "stream" and print(m["content"]["text"], end=""))
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    """))
    out = subprocess.run([sys.executable, str(script)], env=clean_env(), check=True, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path).stdout
    assert out.split() == ["QUIET", "False", "False"]


def test_reproduce_runs_its_notebooks_quiet(tmp_path, monkeypatch):
    """Every kernel `python -m epi reproduce` starts inherits EPI_QUIET=1 (papermill itself passes no variable)."""
    import papermill
    seen = []
    monkeypatch.setenv("EPI_QUIET", "placeholder")  # so that monkeypatch restores the variable's absence
    monkeypatch.delenv("EPI_QUIET")
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: seen.append(os.environ.get("EPI_QUIET")))
    monkeypatch.setattr(epi.reproduce, "write_report", lambda *a, **k: tmp_path / "report.md")
    assert epi.reproduce.main(profile="smoke", out=str(tmp_path)) == 0
    assert seen == ["1"] * len(epi.reproduce.NOTEBOOKS)

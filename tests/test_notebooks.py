"""Notebook metadata lint: card, Colab badge and install cell, one typed parameters cell, params files,
endings, kernel, GPU setting, clean outputs. (Execution is nbval's job: `make test` runs them; the Colab
branch of the install cell runs in tests/test_colab.py.)"""
import json
import re
import subprocess
import sys

import pytest
import yaml

from epi.colab import INSTALL_CELL, REPOSITORY_URL, badge, colab_url
from helpers import ROOT

NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
TIERS = ("smoke", "cpu", "gpu", "full")


def load(path):
    return json.loads(path.read_text())


def source(cell):
    return "".join(cell["source"])


def parameters_cell(nb):
    return [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]


def parameter_names(nb):
    src = source(parameters_cell(nb)[0])
    return re.findall(r"^([A-Z_][A-Z0-9_]*)\s*:\s*(?:int|float|str|bool)\s*=", src, re.M)


def test_the_seven_lessons_exist_in_order():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]
    assert not list(ROOT.rglob(".ipynb_checkpoints"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_metadata_and_structure(path):
    nb = load(path)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert len(parameters_cell(nb)) == 1, "exactly one cell tagged 'parameters'"
    card = source(nb["cells"][0])
    for heading in ("Learning goals", "Prerequisites", "Runtime"):
        assert heading in card, heading
    headings = [source(c) for c in nb["cells"] if c["cell_type"] == "markdown"]
    tail = "\n".join(headings[-4:])
    for heading in ("## Summary", "## Check your understanding", "## Results log"):
        assert heading in "\n".join(headings), heading
    assert "## Results log" in tail
    names = parameter_names(nb)
    assert "PROFILE" in names and "SEED" in names
    for line in source(parameters_cell(nb)[0]).strip().splitlines():
        assert re.match(r"^[A-Z_][A-Z0-9_]*\s*:\s*(int|float|str|bool)\s*=\s*[^#]+#", line), \
            f"parameters must be typed primitives with a comment: {line!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_card_opens_with_this_notebooks_colab_badge(path):
    card = source(load(path)["cells"][0])
    assert card.startswith(badge(path.name) + "\n"), \
        f"{path.name}: the card's first line must be epi.colab.badge({path.name!r}) (python tools/colab_cells.py)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_the_shared_install_cell(path):
    first = next(c for c in load(path)["cells"] if c["cell_type"] == "code")
    assert source(first) == INSTALL_CELL, f"{path.name}: run python tools/colab_cells.py"


def test_install_cell_guards_on_colab_and_never_reinstalls_torch():
    assert '"google.colab" in sys.modules' in INSTALL_CELL
    assert f'"{REPOSITORY_URL}"' in INSTALL_CELL
    pip = [line for line in INSTALL_CELL.splitlines() if '"pip", "install"' in line]
    assert len(pip) == 1 and "torch" not in pip[0] and "-U" not in pip[0] and "--upgrade" not in pip[0]
    assert "os.chdir" not in INSTALL_CELL, "a working folder inside the clone would shadow the epi package"
    assert re.search(r'"/content"\), "(?!epi")[\w-]+"\)', INSTALL_CELL), "the clone folder must not be named epi"


def test_readme_and_docs_link_the_repository_setting():
    """README and docs may only link Colab copies of existing notebooks of epi.colab.REPOSITORY (and clone it)."""
    names = {p.name for p in NOTEBOOKS}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for url in re.findall(r"https://colab\.research\.google\.com/github/[^\s)\"'>]+", text):
            assert any(url == colab_url(name) for name in names), f"{doc.name}: {url} is not epi.colab.colab_url(...)"
        for url in re.findall(r"git clone (?:-\S+ )*(\S+)", text):
            assert url.strip("\"',") == REPOSITORY_URL, f"{doc.name}: clones {url}, not {REPOSITORY_URL}"


def test_colab_cells_tool_rewrites_a_stale_badge_and_install_cell(tmp_path):
    """tools/colab_cells.py --check catches a notebook that drifted from epi.colab; a write brings it back."""
    nb = load(NOTEBOOKS[0])
    nb["cells"][0]["source"][0] = nb["cells"][0]["source"][0].replace("epi-suite/epi", "someone/else")
    next(c for c in nb["cells"] if c["cell_type"] == "code")["source"].append("\nos.chdir('/content/epi')")
    stale = tmp_path / NOTEBOOKS[0].name
    stale.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    tool = [sys.executable, str(ROOT / "tools" / "colab_cells.py")]
    assert subprocess.run([*tool, "--check", str(stale)], capture_output=True).returncode == 1
    subprocess.run([*tool, str(stale)], check=True)
    assert subprocess.run([*tool, "--check", str(stale)], capture_output=True).returncode == 0
    assert stale.read_text() == NOTEBOOKS[0].read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_gpu_notebooks_request_a_colab_gpu(path):
    nb = load(path)
    if "gpu" in path.name:
        assert nb["metadata"].get("accelerator") == "GPU"
        assert nb["metadata"].get("colab", {}).get("gpuType")


@pytest.mark.parametrize("tier", TIERS)
def test_params_files_only_use_known_parameters(tier):
    params = yaml.safe_load((NB_DIR / "params" / f"{tier}.yaml").read_text())
    assert params.get("PROFILE") == tier
    for path in NOTEBOOKS:
        allowed = set(parameter_names(load(path)))
        common = {k: v for k, v in params.items() if not isinstance(v, dict)}
        specific = params.get(path.stem, {})
        unknown = (set(common) | set(specific)) - allowed
        assert not unknown, f"{tier}.yaml passes unknown parameters {sorted(unknown)} to {path.name}"


def test_papermill_sees_the_same_parameters():
    import papermill
    for path in NOTEBOOKS:
        inferred = papermill.inspect_notebook(str(path))
        assert set(inferred) == set(parameter_names(load(path))), path.name


def test_outputs_are_stripped_except_checked_cells():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "nbclean.py"), "--check", *map(str, NOTEBOOKS)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    for path in NOTEBOOKS:
        checked = [c for c in load(path)["cells"] if "nbval-check-output" in c.get("metadata", {}).get("tags", [])]
        assert checked and all(c["outputs"] for c in checked), f"{path.name}: checked cells need recorded outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_default_to_a_folder_per_profile(path):
    """CI's smoke runs must not overwrite a cpu reproduction's summaries and figures."""
    assert f'OUTPUT_DIR: str = "artifacts/{{profile}}/{path.stem}"' in source(parameters_cell(load(path))[0])


def test_setup_notebook_puts_the_resolved_profile_in_the_output_folder(tmp_path):
    from epi.nb import setup_notebook
    info = setup_notebook(0, str(tmp_path / "{profile}" / "01_x"), "smoke")
    assert info["profile"] == "smoke" and info["out"] == tmp_path / "smoke" / "01_x"
    assert (tmp_path / "smoke" / "01_x" / "figures").is_dir()


def helpers_defined_twice(notebooks: dict) -> dict:
    """Return {name: [notebooks]} for every function or class that more than one notebook defines at the top
    of a code cell (`def name` / `class name`): such a helper belongs in the library, defined once."""
    defined = {}
    for name, nb in notebooks.items():
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                for helper in re.findall(r"^(?:def|class) (\w+)", source(cell), re.M):
                    defined.setdefault(helper, set()).add(name)
    return {h: sorted(names) for h, names in defined.items() if len(names) > 1}


def test_no_notebook_defines_a_helper_another_notebook_defines():
    shared = helpers_defined_twice({p.stem: load(p) for p in NOTEBOOKS})
    assert not shared, f"helpers defined in more than one notebook (move them into epi once): {shared}"
    # negative control: the check sees a helper two notebooks share, and not one defined twice in one notebook
    code = lambda text: {"cell_type": "code", "source": [text]}  # noqa: E731
    fake = {"a": {"cells": [code("x = 1\ndef markdown(df):\n    pass\n"), code("def only_a():\n    pass")]},
            "b": {"cells": [code("def markdown(df, digits=3):\n    pass"), code("def only_b(): pass\ndef only_b(): pass"),
                            {"cell_type": "markdown", "source": ["def only_a(): prose, not code"]}]}}
    assert helpers_defined_twice(fake) == {"markdown": ["a", "b"]}

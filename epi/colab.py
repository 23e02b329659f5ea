"""Where the suite lives on GitHub, and the two things every notebook says about it: its Colab badge and
its install cell (the first code cell). One setting, `REPOSITORY`; `tools/colab_cells.py` writes both into
the notebooks and tests/test_notebooks.py checks that notebooks, README and this module agree.

The install cell is plain text because it runs before `epi` can be imported. On Colab it
- clones into `<EPI_COLAB_ROOT or /content>/epi-suite`, never a folder named `epi`: Colab's kernel has its
  working folder /content on `sys.path`, so a folder /content/epi would be imported as a namespace package
  `epi` whose `epi.data` is the repository's data/ folder;
- on a rerun (runtime restarted, Run all) keeps the clone and fast-forwards it, tolerating no network;
- installs the clone editable with the `notebooks` extra; Colab's torch already satisfies the floor, and pip's
  default strategy (only-if-needed) leaves it alone, so torch is never reinstalled;
- puts the clone first on `sys.path`: a running interpreter does not see a new editable install (it is wired
  in at start-up), a restarted one does.
`EPI_REPO_URL` and `EPI_COLAB_ROOT` override the URL and the folder (tests/test_colab.py runs the cell offline).
"""
from __future__ import annotations

REPOSITORY = "epi-suite/epi"  # owner/name on GitHub; nobody has checked yet that it exists
BRANCH = "main"
REPOSITORY_URL = f"https://github.com/{REPOSITORY}"
CLONE_FOLDER = "epi-suite"  # under /content on Colab; anything but "epi" (see above)

BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

INSTALL_CELL = f'''\
# Colab only (a no-op locally, in CI and under papermill): fetch the suite, install it, import it from the clone.
import importlib, os, subprocess, sys
if "google.colab" in sys.modules:
    url = os.environ.get("EPI_REPO_URL", "{REPOSITORY_URL}")
    clone = os.path.join(os.environ.get("EPI_COLAB_ROOT", "/content"), "{CLONE_FOLDER}")  # not .../epi: it would shadow the package
    if not os.path.isdir(os.path.join(clone, ".git")):
        subprocess.run(["git", "clone", "-q", "--depth", "1", url, clone], check=True)
    else:  # a restarted runtime: keep the clone, take new commits if the network allows
        subprocess.run(["git", "-C", clone, "pull", "-q", "--ff-only"], capture_output=True)
    # editable: a restarted kernel imports the clone too; Colab's torch meets the floor, so pip keeps it
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{{clone}}[notebooks]"], check=True)
    if clone not in sys.path:  # a running kernel sees the new install only through sys.path
        sys.path.insert(0, clone)
        importlib.invalidate_caches()'''


def colab_url(notebook: str) -> str:
    """Return the URL that opens notebooks/<notebook> (a file name such as "01_temporal_drift.ipynb") in Colab."""
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/{BRANCH}/notebooks/{notebook}"


def badge(notebook: str) -> str:
    """Return the Markdown "Open In Colab" badge of notebooks/<notebook>."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook)})"

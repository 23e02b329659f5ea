"""Write every notebook's Colab badge (first line of the card) and install cell (first code cell) from
`epi.colab`, the one place that holds the repository URL and the cell text.

  python tools/colab_cells.py notebooks/*.ipynb          # in place
  python tools/colab_cells.py --check notebooks/*.ipynb  # exit 1 if any notebook would change

Only those two cells change; everything else in the file is left as it is.
"""
import importlib.util
import re
import sys
from pathlib import Path

import notebook_rewrite  # tools/ is on sys.path when a tool runs as a script


def _colab_module():
    """Return epi/colab.py loaded on its own (importing the epi package would import torch: seconds)."""
    path = Path(__file__).resolve().parents[1] / "epi" / "colab.py"
    spec = importlib.util.spec_from_file_location("epi_colab", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colab = _colab_module()

BADGE = re.compile(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)\n?")


def lines(text: str) -> list[str]:
    """Return a cell source as the list of lines the .ipynb files hold (each but the last ends in a newline)."""
    return text.splitlines(keepends=True)


def apply(nb: dict, name: str) -> dict:
    """Return `nb` with the badge of notebooks/<name> atop its card and the shared install cell first among code."""
    card = nb["cells"][0]
    text = "".join(card["source"])
    if card["cell_type"] != "markdown":
        raise ValueError(f"{name}: the first cell must be the markdown card that carries the Colab badge")
    text = BADGE.sub("", text, count=1).lstrip("\n")
    card["source"] = lines(f"{colab.badge(name)}\n\n{text}")
    install = next(c for c in nb["cells"] if c["cell_type"] == "code")
    if "google.colab" not in "".join(install["source"]):
        raise ValueError(f"{name}: the first code cell must be the Colab install cell (it would be overwritten)")
    install["source"] = lines(colab.INSTALL_CELL)
    return nb


def main() -> int:
    return notebook_rewrite.main(lambda nb, path: apply(nb, path.name),
                                 "badge or install cell differ from epi/colab.py (run python tools/colab_cells.py):")


if __name__ == "__main__":
    sys.exit(main())

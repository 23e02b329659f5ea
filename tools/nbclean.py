"""Strip notebook outputs except nbval-checked cells; drop papermill/execution metadata.

  python tools/nbclean.py notebooks/*.ipynb          # in place
  python tools/nbclean.py --check notebooks/*.ipynb  # exit 1 if any notebook would change

Checked cells (tag `nbval-check-output`) keep their outputs and execution count, so `pytest --nbval-lax`
can compare them; everything else is committed clean.
"""
import sys

import notebook_rewrite  # tools/ is on sys.path when a tool runs as a script

CHECK = "nbval-check-output"


def clean(nb: dict) -> dict:
    nb.get("metadata", {}).pop("papermill", None)
    nb.get("metadata", {}).pop("widgets", None)  # ipywidgets state of progress bars: noise
    nb["metadata"].setdefault("kernelspec", {"display_name": "Python 3", "language": "python", "name": "python3"})
    nb["metadata"]["kernelspec"]["name"] = "python3"
    counter = 0
    for cell in nb["cells"]:
        meta = cell.setdefault("metadata", {})
        for key in ("papermill", "execution", "collapsed", "scrolled"):
            meta.pop(key, None)
        tags = meta.get("tags", [])
        if "injected-parameters" in tags:
            continue
        if cell["cell_type"] != "code":
            continue
        if CHECK in tags:
            counter += 1
            cell["execution_count"] = counter
            for out in cell.get("outputs", []):
                if "execution_count" in out:
                    out["execution_count"] = counter
                out.pop("metadata", None) if out.get("output_type") == "stream" else None
        else:
            cell["outputs"], cell["execution_count"] = [], None
    nb["cells"] = [c for c in nb["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    return nb


def main() -> int:
    return notebook_rewrite.main(lambda nb, path: clean(nb), "would change:")


if __name__ == "__main__":
    sys.exit(main())

"""`make reproduce`: execute notebooks 01–06 with papermill on a profile, then write the report.

  python -m epi reproduce --profile cpu      # the main job (default); --profile smoke for a quick pass

Executed notebooks go to artifacts/notebooks/, each notebook's outputs and summary.json to
artifacts/<profile>/<notebook>/ (the notebooks' default, so `make test`'s smoke runs keep out of a cpu
reproduction), runs to artifacts/runs/<profile>/ (finished runs are reused), and the reproduction report
to artifacts/report.md.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .nb import repo_root
from .report import write_report

NOTEBOOKS = ("01", "02", "03", "04", "05", "06")


def main(profile: str = "cpu", seed: int = 0, out: str = "artifacts") -> int:
    """Run the notebooks in order and write <out>/report.md; return a process exit code."""
    import papermill as pm
    root = repo_root()
    out_dir = (root / out) if not Path(out).is_absolute() else Path(out)
    (out_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    # the kernels inherit this process's environment (papermill passes none of its own): epi.nb.quiet() is True
    # there, so no progress widgets pile up in the executed notebooks; EPI_QUIET=0 keeps them
    os.environ.setdefault("EPI_QUIET", "1")
    for prefix in NOTEBOOKS:
        (nb,) = sorted((root / "notebooks").glob(f"{prefix}_*.ipynb"))
        t0 = time.time()
        print(f"[reproduce] {nb.name} · profile {profile} · seed {seed}", flush=True)
        wanted = {"PROFILE": profile, "SEED": seed, "OUTPUT_DIR": str(out_dir / profile / nb.stem),
                  "RUNS_DIR": str(out_dir / "runs")}
        known = pm.inspect_notebook(str(nb))
        pm.execute_notebook(str(nb), str(out_dir / "notebooks" / nb.name), kernel_name="python3",
                            parameters={k: v for k, v in wanted.items() if k in known},
                            cwd=str(root / "notebooks"), progress_bar=False)
        print(f"[reproduce] {nb.name} done in {time.time() - t0:.0f} s", flush=True)
    report = write_report(out_dir / profile, out=out_dir / "report.md", notebooks=NOTEBOOKS,
                          title=f"EPI reproduction report (profile {profile}, seed {seed})")
    print(f"[reproduce] wrote {report} in {time.time() - t_all:.0f} s")
    return 0

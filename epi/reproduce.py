"""`make reproduce`: execute notebooks 01–06 with papermill on a profile, then write the report;
`make render`: executed copies of every notebook (01–07) with their figures, for readers on GitHub.

  python -m epi reproduce --profile cpu      # the main job (default; tier quick, ~30 min on 2 cores)
  python -m epi reproduce --tier full        # every notebook's own cpu grid (3 seeds of every arm, ~80 min)
  python -m epi render --profile smoke       # docs/notebooks/NN_name.ipynb, outputs included

Executed notebooks go to artifacts/notebooks/, each notebook's outputs and summary.json to
artifacts/<profile>/<notebook>/ (the notebooks' default, so `make test`'s smoke runs keep out of a cpu
reproduction), runs to artifacts/runs/<profile>/ (finished runs are reused), and the reproduction report
to artifacts/report.md.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Optional, Sequence

from .analysis.report import write_report
from .nb import repo_root

NOTEBOOKS = ("01", "02", "03", "04", "05", "06")

# Papermill parameters beyond each notebook's profile defaults, per tier. "quick" (the cpu default) sizes every
# grid to its lesson, so the whole job takes under half an hour on 2 cores from nothing (measured: README): one
# seed per arm where the notebook's defaults run three; 04 runs five methods and takes the claims X1 decides at
# eight seeds from its committed results (results/x1); 01 shows the committed X3 (results/x3); 05's from-scratch
# counter-case trains 250 steps per stage instead of 500; 06 sweeps the refresh interval T only. "full" runs every
# notebook's own defaults: three seeds of every arm, about 80 minutes — the run results/report_cpu comes from.
TIERS = {
    "quick": {"01": {"N_SEEDS": 2},
              "04": {"N_SEEDS": 1, "METHODS": "full_sft,static,epi,epi_per_task,ewc", "EXTRA_ARMS": False},
              "05": {"N_SEEDS": 1, "SCRATCH_STEPS": 250},
              "06": {"KNOBS": "refresh_every"}},
    "full": {},
}


def default_tier(profile: str) -> str:
    """Return the tier `make reproduce` runs at a profile: quick on cpu, the notebooks' own defaults elsewhere."""
    return "quick" if profile == "cpu" else "full"


def notebook(prefix: str) -> Path:
    """Return the path of the notebook whose name starts with `prefix` (e.g. "01")."""
    (nb,) = sorted((repo_root() / "notebooks").glob(f"{prefix}_*.ipynb"))
    return nb


def execute(prefix: str, profile: str, seed: int, executed: Path, out_dir: Path,
            extra: Optional[dict] = None) -> Path:
    """Execute one notebook with papermill into `executed`/<name>; outputs under `out_dir`/<profile>/<stem>,
    runs under `out_dir`/runs; `extra`: more papermill parameters (a reproduce tier's). Return the executed copy's
    path."""
    import papermill as pm
    # the kernels inherit this process's environment (papermill passes none of its own): epi.nb.quiet() is True
    # there, so no progress widgets pile up in the executed notebooks; EPI_QUIET=0 keeps them
    os.environ.setdefault("EPI_QUIET", "1")
    nb = notebook(prefix)
    executed.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[{profile}] {nb.name} · seed {seed}" + "".join(f" · {k}={v}" for k, v in (extra or {}).items()),
          flush=True)
    wanted = {"PROFILE": profile, "SEED": seed, "OUTPUT_DIR": str(out_dir / profile / nb.stem),
              "RUNS_DIR": str(out_dir / "runs")}
    known = pm.inspect_notebook(str(nb))
    unknown = sorted(set(extra or {}) - set(known))
    if unknown:
        raise ValueError(f"{nb.name} has no parameter(s) {unknown}; it has {sorted(known)}")
    wanted.update(extra or {})
    pm.execute_notebook(str(nb), str(executed / nb.name), kernel_name="python3",
                        parameters={k: v for k, v in wanted.items() if k in known},
                        cwd=str(repo_root() / "notebooks"), progress_bar=False)
    print(f"[{profile}] {nb.name} done in {time.time() - t0:.0f} s", flush=True)
    return executed / nb.name


RENDERED = ("01", "02", "03", "04", "05", "06", "07")


def render(profile: str = "smoke", seed: int = 0, out: str = "docs/notebooks", work: str = "artifacts/render",
           notebooks: Sequence[str] = RENDERED) -> int:
    """Write executed copies of the notebooks (figures and tables included) to `out`, each opening with a note
    of how it was made; return a process exit code."""
    import torch
    root = repo_root()
    out_dir, work_dir = (Path(p) if Path(p).is_absolute() else root / p for p in (out, work))
    hardware = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"{platform.machine()} CPU, {os.cpu_count()} cores"
    # figures are shown inline only by the notebook backend (the Agg backend CI uses shows nothing)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    for prefix in notebooks:
        t0 = time.time()
        path = execute(prefix, profile, seed, work_dir / "executed", work_dir)
        # the build machine's folders mean nothing to a reader: paths are shown relative to the repository
        nb = json.loads(path.read_text().replace(str(root) + "/", "").replace(str(root), "."))
        nb["metadata"].pop("papermill", None)
        for cell in nb["cells"]:
            cell.get("metadata", {}).pop("papermill", None)
            cell.get("metadata", {}).pop("execution", None)
        note = (f"> **Executed copy** of [`notebooks/{path.name}`](../../notebooks/{path.name}), made by "
                f"`python -m epi render --profile {profile} --seed {seed}` on {time.strftime('%Y-%m-%d')} "
                f"({hardware}, torch {torch.__version__}) in {time.time() - t0:.0f} s. Profile `{profile}`"
                + (": tiny sizes that show every step and figure; the numbers are not results — the measured "
                   "cpu-profile numbers are in each notebook's Results log and the report." if profile == "smoke"
                   else "."))
        nb["cells"].insert(0, {"cell_type": "markdown", "id": "rendered-note", "metadata": {}, "source": [note]})
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / path.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    print(f"[render] wrote {len(notebooks)} notebook(s) to {out_dir}")
    return 0


def main(profile: str = "cpu", seed: int = 0, out: str = "artifacts", tier: Optional[str] = None) -> int:
    """Run the notebooks in order at a tier (`TIERS`; None = `default_tier`) and write <out>/report.md; return a
    process exit code."""
    tier = tier or default_tier(profile)
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {sorted(TIERS)}, got {tier!r}")
    root = repo_root()
    out_dir = (root / out) if not Path(out).is_absolute() else Path(out)
    t_all = time.time()
    timings, parameters = {}, {}
    for prefix in NOTEBOOKS:
        t0 = time.time()
        extra = TIERS[tier].get(prefix, {})
        path = execute(prefix, profile, seed, out_dir / "notebooks", out_dir, extra)
        timings[path.stem], parameters[path.stem] = time.time() - t0, extra
    # a quick run is set against the committed full-tier run of the same profile, claim by claim
    full = root / "results" / f"report_{profile}" / profile
    report = write_report(out_dir / profile, out=out_dir / "report.md", notebooks=NOTEBOOKS,
                          title=f"EPI reproduction report (profile {profile}, tier {tier}, seed {seed})",
                          timings=timings, parameters=parameters,
                          reference=full if tier != "full" and full.is_dir() else None)
    for name, t in timings.items():   # the per-notebook time, printed at the end and written into the report
        print(f"[reproduce] {name}: {t / 60:.1f} min", flush=True)
    print(f"[reproduce] wrote {report} in {time.time() - t_all:.0f} s")
    return 0

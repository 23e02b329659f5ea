"""The reproduction report: artifacts/report.md assembled from what each notebook measured.

Each notebook ends by calling `write_summary(OUTPUT_DIR, ...)`, which stores `summary.json`: its claims
(claim, what was measured, verdict), markdown tables and figure paths. `write_report` collects them in
notebook order into one claim-by-claim table, a note on how many claims the report makes (multiplicity),
then each notebook's tables and figures. Claims comparing two arms are decided by the one rule
(`epi.analysis.evidence` → `epi.analysis.stats.verdict`, rule "bootstrap").
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from statistics import NormalDist
from typing import Dict, List, Optional, Sequence

from ..jsonio import write_json
from . import stats
from .evidence import claim, claim_from_frame, claim_from_runs, plain
from .tables import claims_table

VERDICTS = stats.VERDICTS  # the one list, with the rule that decides them
__all__ = ["VERDICTS", "claim", "reduction_claim", "multiplicity_note", "write_summary", "write_report"]


def reduction_claim(text: str, runs, column: str, method: str, baseline: str, margin: float = 0.03,
                    evidence: str = "") -> dict:
    """Return the claim "`method` has a lower `column` than `baseline`", decided by the one rule.

    runs: run records (a list of results dicts: per-prompt scores are used when recorded) or a summary frame
    (one row per run: method, seed, direction, `column`; per-seed numbers). Runs pair on seed, orders are
    averaged within a seed; reduction = baseline − method. Supported = the 95 % bootstrap interval of the
    reduction lies above 0 and the mean reduction exceeds `margin`; not supported = the interval lies below
    `margin`; not measured = the baseline's own mean is ≤ `margin` (nothing to reduce) or no pair exists;
    mixed otherwise.
    """
    if isinstance(runs, (list, tuple)):
        return claim_from_runs(text, runs, column, method, baseline, "decrease", margin, margin, evidence)
    return claim_from_frame(text, runs, column, method, baseline, "decrease", margin, margin, evidence)


def _hardware(runs: Optional[Sequence[dict]], threads) -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = f"CPU {platform.processor() or platform.machine()}"
    if runs:
        used = sorted({r["config"].get("threads") for r in runs} - {None})
        return f"{cpu}, runs used {'/'.join(map(str, used)) if used else 'unrecorded'} thread(s) each"
    if threads is not None:
        return f"{cpu}, {threads} thread(s)"
    return f"{cpu}, {torch.get_num_threads()} thread(s) in the notebook process"


def write_summary(out: str | Path, notebook: str, *, profile: str, seeds: Sequence[int], claims: List[dict],
                  tables: Optional[Dict[str, str]] = None, figures: Optional[List[str]] = None,
                  numbers: Optional[dict] = None, runs: Optional[Sequence[dict]] = None,
                  threads: Optional[int] = None) -> Path:
    """Write `<out>/summary.json` for the report; return its path.

    The hardware line states the threads the runs used: from `runs` (their records' config threads), else
    `threads`, else the notebook process's own torch threads, said as such (right for a notebook that
    trains in its own process)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hardware = _hardware(runs, threads)
    figs = []
    for f in figures or []:
        p = Path(f)
        # relative to this folder, so the report links work wherever the folders are copied together
        # (a committed figure, e.g. results/x3's, is reached through ..)
        figs.append(os.path.relpath(p, out) if p.is_absolute() else str(p))
    data = {"notebook": notebook, "profile": profile, "seeds": list(seeds), "hardware": hardware,
            "date": time.strftime("%Y-%m-%d"), "claims": claims, "tables": tables or {}, "figures": figs,
            "numbers": numbers or {}}
    return write_json(out / "summary.json", data)


def _bonferroni_supported(decision: dict, k: int, level: float = 0.05) -> Optional[bool]:
    """Return whether a claim decided "supported" stays so with its interval widened to 1 − level/k (normal
    approximation: se from the 95 % interval's width); None when the decision has no single interval."""
    lo, hi = decision.get("interval") or (None, None)
    effect = decision.get("effect")
    if lo is None or hi is None or effect is None:
        return None
    se = (hi - lo) / (2 * NormalDist().inv_cdf(1 - (1 - stats.BOOTSTRAP_LEVEL) / 2))
    z = NormalDist().inv_cdf(1 - level / (2 * k))
    tolerance = decision.get("tolerance") or 0.0
    return effect - z * se > -tolerance and effect > (decision.get("minimum") or 0.0) - tolerance


def multiplicity_note(claims: Sequence[dict]) -> str:
    """Return the report's note on multiplicity: how many claims it makes, how many a 95 % rule decides, how
    many wrong decisions that implies under no effect, and a Bonferroni reading of the supported ones."""
    k = len(claims)
    decided = [c for c in claims if isinstance(c.get("decision"), dict)]
    s = len(decided)
    lines = [f"This report makes {k} claim(s). {s} of them compare two arms and are decided by the one rule "
             "(a 95 % hierarchical-bootstrap interval); the other "
             f"{k - s} are direct checks (exactness, counts, thresholds named in the claim)."]
    if s:
        lines.append(f"Each interval leaves 2.5 % on either side, so where there is no effect at all a claim is "
                     f"still marked \"supported\" with probability ≤ 2.5 % and \"not supported\" with ≤ 2.5 %: "
                     f"among {s} such claims about {0.05 * s:.2f} wrong verdicts (about {0.025 * s:.2f} false "
                     "\"supported\") are expected by chance alone (≈ 0.05 per claim).")
        supported = [c for c in decided if c["verdict"] == "supported"]
        readings = [(c, _bonferroni_supported(c["decision"], s)) for c in supported]
        kept = [c for c, ok in readings if ok]
        unknown = [c for c, ok in readings if ok is None]
        if supported:
            lines.append(f"Bonferroni reading (family-wise 5 %: each interval at {100 * (1 - 0.05 / s):.2f} %, normal "
                         f"approximation to the bootstrap interval): {len(kept)} of the {len(supported)} supported "
                         "claim(s) stay supported" + (f", {len(unknown)} have several intervals and are not adjusted"
                                                       if unknown else "")
                         + (": " + "; ".join(c["claim"] for c in kept) if kept else "") + ".")
    return " ".join(lines)


def _minutes(seconds: float) -> str:
    """Return a wall time as "12 min 5 s" (or "41 s")."""
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m} min {sec} s" if m else f"{sec} s"


def verdict_changes(summaries: Sequence[dict], reference: Path) -> List[str]:
    """Return report lines: a table of the claims whose verdict differs between `summaries` and the summaries
    under `reference` (matched by notebook and claim text), or a sentence saying none does."""
    def verdicts(found: Sequence[dict]) -> Dict[tuple, tuple]:
        # (verdict, seeds the decision averaged: the rule's own count, else the notebook's seeds)
        return {(s["notebook"], c["claim"]): (c["verdict"], (c.get("decision") or {}).get("n_seeds")
                                              or len(s.get("seeds") or []) or None)
                for s in found for c in s["claims"]}
    theirs = verdicts([json.loads(p.read_text()) for p in sorted(Path(reference).glob("*/summary.json"))])
    ours = verdicts(summaries)
    notebooks = {nb for nb, _ in ours}

    def cell(v: Optional[tuple]) -> str:
        if v is None:
            return "not made"
        return f"{v[0]} ({v[1]} seed{'s' if v[1] != 1 else ''})" if v[1] else v[0]

    rows = [(nb, claim, ours.get((nb, claim)), theirs.get((nb, claim)))
            for nb, claim in list(ours) + [k for k in theirs if k not in ours and k[0] in notebooks]]
    rows = [(nb, claim, cell(a), cell(b)) for nb, claim, a, b in rows if (a or (None,))[0] != (b or (None,))[0]]
    root = Path(__file__).resolve().parents[2]
    try:  # a folder of the repository is named from its root, as a reader of the committed report finds it
        shown = Path(reference).resolve().relative_to(root).as_posix()
    except ValueError:
        shown = Path(reference).as_posix()
    head = [f"## Against {shown}", "",
            f"The same claims as decided by the run in `{shown}` (each notebook's own defaults: more seeds "
            "and arms); a claim is listed when its verdict differs or only one run makes it."]
    if not rows:
        return head + ["", "Every claim has the same verdict in both runs."]
    return head + ["", f"{len(rows)} of {len(set(ours) | {k for k in theirs if k[0] in notebooks})} claim(s):", "",
                   "| notebook | claim | this run (seeds) | that run (seeds) |", "|---|---|---|---|",
                   *[f"| {nb} | {claim} | {a} | {b} |" for nb, claim, a, b in rows]]


def write_report(artifacts: str | Path, out: Optional[str | Path] = None, title: str = "EPI reproduction report",
                 notebooks: Optional[Sequence[str]] = None, timings: Optional[Dict[str, float]] = None,
                 parameters: Optional[Dict[str, dict]] = None, reference: Optional[str | Path] = None) -> Path:
    """Collect `<artifacts>/*/summary.json` into `<artifacts>/report.md`; return its path.

    notebooks: folder-name prefixes to include (e.g. ("01", "02")), so a summary left by an earlier run of
    another notebook (another profile, another day) does not enter this report; None = every summary.
    timings: {notebook: wall seconds} of the run that made them, written as a table (with the total).
    parameters: {notebook: papermill parameters beyond the profile's defaults} (the reproduce tier), a column of
    that table.
    reference: a folder of another run's `*/summary.json` (the full tier's, results/report_cpu/cpu): a section lists
    every claim whose verdict differs from that run's, or that only one of the two makes.
    """
    artifacts = Path(artifacts)
    summaries = [json.loads(p.read_text()) | {"_dir": p.parent}
                 for p in sorted(artifacts.glob("*/summary.json"))
                 if notebooks is None or p.parent.name.startswith(tuple(notebooks))]
    if not summaries:
        raise FileNotFoundError(f"no */summary.json under {artifacts}: run the notebooks first (make reproduce)")
    out = Path(out) if out else artifacts / "report.md"
    lines = [f"# {title}", "",
             "Every number below was produced by the notebooks in this run, or read by them from a committed "
             "experiment folder (results/x1, results/x3, results/real_cpu), which the claim's evidence then names; "
             "profile, seeds and hardware are given per notebook. A claim the runs do not support is marked so.", "",
             "## Claims", "",
             claims_table([c for s in summaries for c in s["claims"]],
                          notebooks=[s["notebook"] for s in summaries for _ in s["claims"]]),
             "", "### How many claims (multiplicity)", "",
             multiplicity_note([c for s in summaries for c in s["claims"]])]
    if timings:
        given = parameters or {}
        lines += ["", "## Time per notebook", "", "| notebook | parameters beyond the profile's defaults | wall time |",
                  "|---|---|---|"]
        lines += [f"| {name} | {', '.join(f'{k}={v}' for k, v in given.get(name, {}).items()) or '–'} | "
                  f"{_minutes(t)} |" for name, t in timings.items()]
        lines.append(f"| **total** | | **{_minutes(sum(timings.values()))}** |")
    if reference is not None:
        lines += ["", *verdict_changes(summaries, Path(reference))]
    for s in summaries:
        rel = s["_dir"].relative_to(out.parent) if out.parent in s["_dir"].parents or s["_dir"] == out.parent \
            else s["_dir"]
        lines += ["", f"## {s['notebook']}", "",
                  f"Profile `{s['profile']}` · seeds {s['seeds']} · {s['hardware']} · {s['date']}", ""]
        for c in s["claims"]:
            if c.get("evidence"):
                lines.append(f"- {c['claim']}: {c['evidence']}")
        for name, table in s["tables"].items():
            lines += ["", f"**{name}**", "", table]
        for fig in s["figures"]:
            lines += ["", f"![{Path(fig).stem}]({rel / fig})"]
    out.write_text(plain("\n".join(lines)) + "\n")  # summaries written before plain() may hold numpy reprs
    return out

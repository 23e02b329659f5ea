"""The reproduction report: artifacts/report.md assembled from what each notebook measured.

Each notebook ends by calling `write_summary(OUTPUT_DIR, ...)`, which stores `summary.json`: its claims
(claim, what was measured, verdict), markdown tables and figure paths. `write_report` collects them in
notebook order into one claim-by-claim table followed by each notebook's tables and figures.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..jsonio import write_json
from . import stats
from .metrics import mean_sd
from .tables import claims_table

VERDICTS = stats.VERDICTS  # the one list, with the rule that decides them


def claim(claim: str, measured: str, verdict: str, evidence: str = "") -> dict:
    """Return one claim row; verdict is one of VERDICTS (say "not supported" when it is not)."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    return {"claim": claim, "measured": measured, "verdict": verdict, "evidence": evidence}


def reduction_claim(text: str, frame, column: str, method: str, baseline: str, margin: float = 0.03,
                    evidence: str = "") -> dict:
    """Return the claim "`method` has a lower `column` than `baseline`", decided on paired runs.

    Runs pair on seed (and direction when `frame` has one); reduction = baseline − method per pair, decided by
    `stats.verdict` with rule "every_pair": supported = every pair shows a reduction and the mean reduction
    exceeds `margin`; not supported = the mean reduction is ≤ 0; mixed otherwise; not measured = the
    baseline's own mean is ≤ `margin` (nothing to reduce) or no pair exists.
    """
    pairs = stats.pairs(frame, column, method, baseline)
    if pairs.empty:
        return claim(text, f"no paired runs of {method} and {baseline}", "not measured", evidence)
    base, other = pairs[f"{column}_base"], pairs[f"{column}_m"]
    decided = stats.verdict((other - base).tolist(), direction="decrease", rule="every_pair", minimum=margin,
                            floor=margin, baseline=base.tolist())
    measured = (f"{column}: {baseline} {mean_sd(base.tolist())}, {method} {mean_sd(other.tolist())}; "
                f"paired reduction {decided.effect:+.3f} ({decided.n_seeds} pairs)")
    return claim(text, measured, decided.verdict, evidence)


def write_summary(out: str | Path, notebook: str, *, profile: str, seeds: Sequence[int], claims: List[dict],
                  tables: Optional[Dict[str, str]] = None, figures: Optional[List[str]] = None,
                  numbers: Optional[dict] = None) -> Path:
    """Write `<out>/summary.json` for the report; return its path."""
    import torch
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hardware = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    figs = []
    for f in figures or []:
        p = Path(f)
        figs.append(str(p.relative_to(out)) if p.is_absolute() and out in p.parents else str(p))
    data = {"notebook": notebook, "profile": profile, "seeds": list(seeds), "hardware": hardware,
            "date": time.strftime("%Y-%m-%d"), "claims": claims, "tables": tables or {}, "figures": figs,
            "numbers": numbers or {}}
    return write_json(out / "summary.json", data)


def write_report(artifacts: str | Path, out: Optional[str | Path] = None, title: str = "EPI reproduction report",
                 notebooks: Optional[Sequence[str]] = None) -> Path:
    """Collect `<artifacts>/*/summary.json` into `<artifacts>/report.md`; return its path.

    notebooks: folder-name prefixes to include (e.g. ("01", "02")), so a summary left by an earlier run of
    another notebook (another profile, another day) does not enter this report; None = every summary.
    """
    artifacts = Path(artifacts)
    summaries = [json.loads(p.read_text()) | {"_dir": p.parent}
                 for p in sorted(artifacts.glob("*/summary.json"))
                 if notebooks is None or p.parent.name.startswith(tuple(notebooks))]
    if not summaries:
        raise FileNotFoundError(f"no */summary.json under {artifacts}: run the notebooks first (make reproduce)")
    out = Path(out) if out else artifacts / "report.md"
    lines = [f"# {title}", "",
             "Every number below was produced by the notebooks in this run; profile, seeds and hardware are "
             "given per notebook. A claim the runs do not support is marked so.", "",
             "## Claims", "",
             claims_table([c for s in summaries for c in s["claims"]],
                          notebooks=[s["notebook"] for s in summaries for _ in s["claims"]])]
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
    out.write_text("\n".join(lines) + "\n")
    return out

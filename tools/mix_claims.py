"""Decide the mix claims of a finished grid by the one verdict rule and write them as markdown.

  python tools/mix_claims.py artifacts/runs/cpu14 results/cpu14/claims.md [--minimum 0.02]

Reads every results.json under the runs folder (mix protocol), pairs arms by seed through
epi.analysis.evidence (per-prompt scores when the records hold them), and writes one table: claim, both
arms' means, effect, 95% interval, seeds, prompts, verdict. A claim whose arms are not both in the folder
is "not measured".
"""
import argparse
import sys
from pathlib import Path

from epi.analysis import evidence
from epi.analysis.compare import load_runs
from epi.analysis.report import multiplicity_note
from epi.analysis.tables import claims_table

# (claim, method arm, baseline arm): what each comparison separates
CLAIMS = [
    ("EPI per task beats full SFT", "epi_per_task", "full_sft"),
    ("EPI (global) beats full SFT", "epi", "full_sft"),
    ("Importance beats a count-matched random mask (one fixed global set)", "epi_per_task", "random"),
    ("Importance beats structure-matched random sets (per-task, same union size)", "epi_per_task", "random_per_task"),
    ("EPI (global) beats a random mask at its own share", "epi", "random_global"),
    ("EPI per task beats Half Fine-Tuning", "epi_per_task", "hft"),
    ("Freezing a random share beats full SFT (the 'freezing regularises' reading)", "random", "full_sft"),
]
LOWER_LR_CLAIM = "EPI per task beats full SFT at a lower learning rate"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs")
    p.add_argument("out")
    p.add_argument("--minimum", type=float, default=0.02, help="smallest effect a claim counts (score points / 100)")
    args = p.parse_args(argv)
    records = [r for r in load_runs(args.runs) if r["config"]["protocol"] == "mix"]
    if not records:
        print(f"no mix runs under {args.runs}", file=sys.stderr)
        return 2
    arms = sorted({evidence.label(r) for r in records})
    lower = [a for a in arms if a.startswith("full_sft@lr=")]
    claims = []
    for text, method, baseline in CLAIMS + [(LOWER_LR_CLAIM, "epi_per_task", a) for a in lower]:
        if method in arms and baseline in arms:
            claims.append(evidence.claim_from_runs(text, records, "mean_score", method, baseline,
                                                   minimum=args.minimum))
        else:
            claims.append(evidence.claim(text, f"{method} or {baseline} not in {args.runs}", "not measured"))
    seeds = sorted({r["seed"] for r in records})
    lines = [f"<!-- made by: python tools/mix_claims.py {args.runs} {args.out} --minimum {args.minimum} -->", "",
             f"# Mix claims by the one verdict rule ({len(records)} runs, arms {', '.join(arms)}; seeds {seeds})",
             "", claims_table(claims), "", multiplicity_note(claims)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

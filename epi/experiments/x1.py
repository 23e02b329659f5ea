"""X1 — importance vs structure vs dose vs learning rate, on the five-task mix (cpu profile).

Does EPI's mix gain come from *which* weights it protects (importance, tracked and refreshed), or would any
frozen share of the same size and structure do — or simply a smaller step? The arms, all from the same
tiny-base of their base seed and trained on the same data order of their training seed:

  full_sft                  every weight trains, lr as in the profile
  full_sft@lr=0.77×         a smaller step: 0.77 = 1 − 0.23, the share the per-task isolation arms freeze
  random                    one fixed random set at epi_per_task's realised union share (≈ 23 %)
  random_per_task           per-task random sets whose union matches epi_per_task's, drawn at warm-up end
  random_global             one random set at epi's share (p = 10 %)
  hft                       Half Fine-Tuning: a random half of every matrix frozen
  epi_per_task              per-task importance, refreshed every T steps
  epi_per_task@T=0          the same, frozen at warm-up end (static after warm-up: same share, no evolution)
  epi                       global importance at p, refreshed every T steps

Seeds 0–7 on two base seeds (0–3 start from tiny-base 0, 4–7 from tiny-base 1), 200 held-out prompts per task
with per-prompt scores, so the one verdict rule resamples seeds (blocked by nothing else) and prompts.

  python -m epi.experiments.x1 run [--workers 2] [--runs artifacts/runs/cpu]   # missing runs only
  python -m epi.experiments.x1 analyse [--runs artifacts/runs/cpu] [--out results/x1]

`analyse` writes summary.csv / summary.md (one row per run), claims.md (each claim: effect, 95 % interval,
verdict, and the smallest effect this design could have detected at 80 % power), claims.csv and the figure
figures/x1_effects.png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from statistics import NormalDist
from typing import Dict, List, Optional, Sequence

from ..analysis import evidence, plots, stats
from ..analysis.report import multiplicity_note
from ..analysis.tables import claims_table, markdown_table
from .profiles import NEVER_REFRESH, ExperimentConfig, resolve

PROFILE = "cpu"
SEEDS = tuple(range(8))
SEEDS_PER_BASE = 4                      # seeds 0–3 on tiny-base 0, 4–7 on tiny-base 1
FROZEN_SHARE = 0.23                     # epi_per_task's realised union share at the cpu profile (measured, p = 10 %)
MINIMUM = 0.02                          # the smallest mean-score effect a claim counts
POWER = 0.8


def base_seed_of(seed: int) -> int:
    """Return the tiny-base seed a training seed starts from (blocks of SEEDS_PER_BASE seeds)."""
    return seed // SEEDS_PER_BASE


def low_lr(lr: float) -> float:
    """Return the lower-lr arm's learning rate: lr × (1 − FROZEN_SHARE), rounded to 3 significant digits."""
    return float(f"{(1 - FROZEN_SHARE) * lr:.3g}")


def arms(profile: str = PROFILE) -> List[Dict[str, object]]:
    """Return the arms as resolve() overrides (method plus its arm settings)."""
    lr = resolve(profile).lr
    return [{"method": "full_sft"}, {"method": "full_sft", "lr": low_lr(lr)}, {"method": "random"},
            {"method": "random_per_task"}, {"method": "random_global"}, {"method": "hft"},
            {"method": "epi_per_task"}, {"method": "epi_per_task", "refresh_every": NEVER_REFRESH},
            {"method": "epi"}]


def configs(seeds: Sequence[int] = SEEDS, profile: str = PROFILE) -> list[ExperimentConfig]:
    """Return every run of the design: each arm at each seed, on its seed's base."""
    return [resolve(profile, protocol="mix", seed=s, base_seed=base_seed_of(s), **arm)
            for s in seeds for arm in arms(profile)]


def claims_spec(profile: str = PROFILE) -> List[tuple]:
    """Return (question, claim, method arm, baseline arm): the three questions of the design, then the context."""
    lower = resolve(profile, method="full_sft", lr=low_lr(resolve(profile).lr)).arm
    static = resolve(profile, method="epi_per_task", refresh_every=NEVER_REFRESH).arm
    return [
        ("importance vs structure", "EPI per task beats per-task random sets of the same union size",
         "epi_per_task", "random_per_task"),
        ("importance vs structure", "EPI (global) beats a random mask at its own share", "epi", "random_global"),
        ("importance vs structure", "EPI per task beats one random mask of the same realised share",
         "epi_per_task", "random"),
        ("evolving vs static", "EPI per task refreshed every T beats the same mask frozen at warm-up end",
         "epi_per_task", static),
        ("isolation vs learning rate", "EPI per task beats full SFT at 0.77× the learning rate",
         "epi_per_task", lower),
        ("context", "EPI per task beats full SFT", "epi_per_task", "full_sft"),
        ("context", "EPI (global) beats full SFT", "epi", "full_sft"),
        ("context", "Freezing a random share beats full SFT ('freezing regularises')", "random", "full_sft"),
        ("context", "A lower learning rate beats full SFT", lower, "full_sft"),
        ("context", "EPI per task beats Half Fine-Tuning", "epi_per_task", "hft"),
    ]


def detectable(decision: Optional[dict], power: float = POWER) -> float:
    """Return the smallest true effect this design would call beyond 0 with probability `power`: (z₀.₉₇₅ + z_power)
    × se, with se read from the 95 % interval's width (normal approximation); nan without an interval."""
    lo, hi = (decision or {}).get("interval") or (None, None)
    if lo is None or hi is None:
        return math.nan
    z = NormalDist().inv_cdf(1 - (1 - stats.BOOTSTRAP_LEVEL) / 2)
    return (z + NormalDist().inv_cdf(power)) * (hi - lo) / (2 * z)


def decide_claims(records: Sequence[dict], minimum: float = MINIMUM, profile: str = PROFILE) -> List[dict]:
    """Return the design's claims decided by the one rule on mean score, each with its question and the
    detectable effect (`detectable`); an arm missing from `records` makes its claim "not measured"."""
    present = {evidence.label(r) for r in records}
    out = []
    for question, text, method, baseline in claims_spec(profile):
        if method in present and baseline in present:
            c = evidence.claim_from_runs(text, records, "mean_score", method, baseline, minimum=minimum)
        else:
            c = evidence.claim(text, f"{method} or {baseline} has no runs", "not measured")
        c.update(question=question, method=method, baseline=baseline,
                 detectable=detectable(c.get("decision")))
        out.append(c)
    return out


RESULTS = Path(__file__).resolve().parents[2] / "results" / "x1"  # the committed results (repository root)


def committed_claim(text: str, method: str, baseline: str, results: str | Path | None = None) -> Optional[dict]:
    """Return X1's committed decision of `method` vs `baseline` (results/x1/claims.csv, 8 seeds) as a claim row
    named `text`, or None when X1 has no such comparison (or the file is absent).

    Notebook 04 decides a claim from it at the cpu profile when it ran fewer seeds than X1's or left one of the
    two arms out (`make reproduce`'s quick tier), so the claim keeps the better-powered verdict."""
    import pandas as pd
    path = Path(results) if results is not None else RESULTS
    if not (path / "claims.csv").is_file():
        return None
    rows = pd.read_csv(path / "claims.csv")
    hit = rows[(rows.method == method) & (rows.baseline == baseline)]
    if hit.empty:
        return None
    r = hit.iloc[0]
    decision = stats.Verdict(float(r.effect), (float(r.low), float(r.high)), int(r.seeds), int(r.prompts_per_task),
                             "bootstrap", str(r.verdict), float(r.minimum))
    return evidence.claim(text, f"X1 (results/x1, committed): {method} − {baseline} {decision.describe()}",
                          decision.verdict, f"X1, {int(r.seeds)} seeds, read from results/x1/claims.csv",
                          decision.to_dict())


def claims_frame(claims: Sequence[dict]):
    """Return one row per claim with plain columns (effect, interval, seeds, prompts, verdict, detectable)."""
    import pandas as pd
    rows = []
    for c in claims:
        d = c.get("decision") or {}
        lo, hi = d.get("interval") or (None, None)
        rows.append({"question": c["question"], "claim": c["claim"], "method": c["method"],
                     "baseline": c["baseline"], "effect": d.get("effect"), "low": lo, "high": hi,
                     "seeds": d.get("n_seeds"), "prompts_per_task": d.get("n_prompts"),
                     "minimum": d.get("minimum"), "detectable_80pct": None if math.isnan(c["detectable"])
                     else c["detectable"], "verdict": c["verdict"]})
    frame = pd.DataFrame(rows)
    for col in ("seeds", "prompts_per_task"):
        frame[col] = frame[col].astype("Int64")
    return frame


def figure(claims: Sequence[dict], out: Path, title: str) -> Path:
    """Draw every claim's effect with its 95 % interval (the rule's bootstrap) and save it under out/figures."""
    import matplotlib.pyplot as plt
    plots.set_style()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(claims) + 1.4))
    plots.effect_intervals(claims, ax=ax, minimum=MINIMUM, title=title)
    fig.tight_layout()
    path = plots.savefig(fig, "x1_effects", out)
    plt.close(fig)
    return path


def analyse(runs: str | Path, out: str | Path, minimum: float = MINIMUM) -> List[dict]:
    """Decide the claims from the finished runs under `runs` and write the results folder `out`."""
    import pandas as pd

    from ..analysis.compare import load_runs, run_row, write_tables
    records = select(load_runs(runs))
    if not records:
        raise FileNotFoundError(f"no X1 runs under {runs}: run `python -m epi.experiments.x1 run` first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tables(pd.DataFrame([run_row(r) for r in records]), out,
                 f"python -m epi.experiments.x1 analyse --runs {runs} --out {out}")
    claims = decide_claims(records, minimum)
    frame = claims_frame(claims)
    frame.to_csv(out / "claims.csv", index=False)
    seeds = sorted({r["seed"] for r in records})
    bases = sorted({base_seed_of(r["seed"]) for r in records})
    fig = figure(claims, out, f"X1: mean-score effects, {len(seeds)} seeds on base seeds {bases}")
    single = sum(r["wall_s"] for r in records)
    lines = [f"<!-- made by: python -m epi.experiments.x1 analyse --runs {runs} --out {out} -->", "",
             f"# X1 claims ({len(records)} runs; seeds {seeds}; base seeds {bases})", "",
             "Effect = the method's mean score minus the baseline's (fraction of prompts right, mean over the five "
             f"tasks), paired by seed; minimum {minimum}. `detectable` is the smallest true effect this design "
             f"would call beyond 0 with {POWER:.0%} power (1.96 + 0.84 standard errors, read from the interval).", "",
             claims_table(claims), "",
             markdown_table(frame[["question", "method", "baseline", "effect", "low", "high", "seeds",
                                   "detectable_80pct", "verdict"]]), "",
             multiplicity_note(claims), "",
             f"Training time: {single / 3600:.1f} h of single-thread run time in all ({len(records)} runs).", "",
             f"![effects]({fig.relative_to(out)})"]
    (out / "claims.md").write_text("\n".join(lines) + "\n")
    return claims


def select(records: Sequence[dict], profile: str = PROFILE) -> List[dict]:
    """Return the records that belong to the design: mix runs of its arms and seeds, each on its seed's base."""
    labels = {resolve(profile, **arm).arm for arm in arms(profile)}
    return [r for r in records if r["config"].get("protocol") == "mix" and r["config"].get("profile") == profile
            and r["seed"] in SEEDS and evidence.label(r) in labels
            and (r["config"].get("base_seed") if r["config"].get("base_seed") is not None else r["seed"])
            == base_seed_of(r["seed"])]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epi.experiments.x1", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the design's missing runs (finished ones are reused)")
    r.add_argument("--runs", default="artifacts/runs/cpu")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    a = sub.add_parser("analyse", help="decide the claims and write the results folder")
    a.add_argument("--runs", default="artifacts/runs/cpu")
    a.add_argument("--out", default="results/x1")
    a.add_argument("--minimum", type=float, default=MINIMUM)
    args = p.parse_args(argv)
    if args.command == "run":
        from .runner import run_grid
        t0 = time.time()
        run_grid(configs(args.seeds), args.runs, workers=args.workers, say=lambda m: print(m, flush=True))
        print(f"X1 runs ready in {time.time() - t0:.0f} s")
        return 0
    claims = analyse(args.runs, args.out, args.minimum)
    print(json.dumps([{k: c[k] for k in ("claim", "verdict")} for c in claims], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""X2 — evolving vs static where forgetting exists: SmolLM2-135M-Instruct, code → math and math → code.

Does refreshing the mask (EPI's evolving importance) protect the first task better than the same mask frozen, a
random mask of its share, Half Fine-Tuning or no isolation at all — in sequential SFT of a real model, where task A
is forgotten? Isolation starts at the stage boundary in every arm (warm-up = the first stage's length, the profile's
steps_per_task), so task A is learned identically by all arms (the same losses step for step) and the arms differ
only in how they protect it while B is trained:

  full_sft                 every weight trains in both stages
  epi                      global importance tracked from step 0, first mask at the boundary, refreshed every T
  epi@refresh_every=0      the same mask frozen at the boundary (static after it: same share, no evolution)
  random_global            a random mask at epi's share (ratio), drawn at the boundary and fixed
  hft@hft_from_stage=1     Half Fine-Tuning whose first half is drawn at the boundary (nothing frozen in stage A)

The real_cpu budget (epi.experiments.profiles: 24 steps per task, batch 4, lr 1e-4, bf16 autocast, general-ability
probe), seeds 0–3, both directions, 96 held-out prompts per task with per-prompt scores. The primary endpoint is
the retention of A, (A after B) / (A after A), per seed; secondary: absolute forgetting of A and learning of B
(per prompt; B non-inferior within 0.05), general-loss increase and final KL to the base model (per seed).
Directions are averaged inside a seed (epi.analysis.evidence), so the four seeds are the replicates.

  python -m epi.experiments.x2 run [--workers 2] [--runs artifacts/runs/x2]      # missing runs only
  python -m epi.experiments.x2 analyse [--runs artifacts/runs/x2] [--out results/x2]

`analyse` writes summary.csv (one row per run), summary.md (the CPI-FT Table 2 shape per arm and direction),
claims.md and claims.csv (each claim: effect, 95 % interval, verdict, and the smallest effect the design could
have detected at 80 % power), the figure figures/x2_effects.png and README.md (command, settings, wall time).

Time, measured (2026-12-01, seed 0, epi, code → math, `run --workers 1 --seeds 0 --arms epi --order code-math`): one
run took 620 s wall on the 2-core CPU (1 thread) while other jobs held the cores (the run got 51 % of a core; 320 s of
CPU time, peak 4.7 GB). The 40 runs at 2 workers therefore take ≈ 40 × 320 s / 2 ≈ 1.8 h on an idle machine and
≈ 3.4 h at that load — beyond real_cpu's 30 minutes. Most of it is evaluation: scoring 2 × 96 prompts by generation
before training and after each stage (real_cpu's runs at 32 prompts took ≈ 160 s; a straight line through the two
puts the 48 optimizer steps near 80 s).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..analysis import evidence, plots
from ..analysis.report import multiplicity_note
from ..analysis.tables import claims_table, markdown_table
from .profiles import NEVER_REFRESH, ExperimentConfig, resolve
from .x1 import POWER, detectable

PROFILE = "real_cpu"
SEEDS = tuple(range(4))
PAIR = ("code", "math")
EVAL_RECORDS = 96                       # prompts per task: a score's prompt-level se near 0.5 is ≈ 0.05
# retention is a ratio of A's own score: 0.05 = keeping 5 % more of what A had learned (≈ 2 prompts of 96 at an
# A-after-A score near 0.5); score effects (forgetting, learning) count from 0.02, as X1's mean score does
RETENTION_MINIMUM = 0.05
MINIMUM = 0.02
TOLERANCE = 0.05                        # learning of B: non-inferior within 5 points (issue 15)
RUNS = "artifacts/runs/x2"              # its own folder: warm-up and prompts differ from real_cpu's runs of one name


def directions(pair: Sequence[str] = PAIR) -> List[List[str]]:
    """Return the two task orders [A, B] of the design: the pair and its reverse."""
    a, b = pair
    return [[a, b], [b, a]]


def arms() -> List[Dict[str, object]]:
    """Return the arms as resolve() overrides (method plus its arm settings)."""
    return [{"method": "full_sft"}, {"method": "epi"}, {"method": "epi", "refresh_every": NEVER_REFRESH},
            {"method": "random_global"}, {"method": "hft", "hft_from_stage": 1}]


def configs(seeds: Sequence[int] = SEEDS, profile: str = PROFILE, eval_records: int = EVAL_RECORDS,
            pair: Sequence[str] = PAIR) -> List[ExperimentConfig]:
    """Return every run of the design: each arm at each seed in both directions, isolation from the boundary
    (warmup_steps = the profile's steps_per_task). Arm-major: the first arm's runs evaluate every (order, seed)'s
    A after A, and the other arms, which learn A identically, read it from the score cache (run.evaluate_cached)."""
    stage = resolve(profile).steps_per_task
    return [resolve(profile, protocol="sequential", tasks=order, seed=s, eval_records=eval_records,
                    warmup_steps=stage, **arm)
            for arm in arms() for order in directions(pair) for s in seeds]


def labels(profile: str = PROFILE) -> Dict[str, str]:
    """Return {short name: arm label} of the design's arms (e.g. "static": "epi@refresh_every=0")."""
    names = ("full_sft", "epi", "static", "random", "hft")
    return {n: resolve(profile, **arm).arm for n, arm in zip(names, arms())}


def claims_spec(profile: str = PROFILE) -> List[dict]:
    """Return the design's claims: question, claim, measure, method and baseline arm, direction and the
    minimum (superiority) or tolerance (non-inferiority) the one rule reads the interval against."""
    a = labels(profile)
    rivals = (("static", "EPI frozen at the boundary", "evolving vs static"),
              ("random", "a random mask of its share", "importance vs random"),
              ("full_sft", "full SFT", "isolation vs none"),
              ("hft", "HFT from the boundary", "EPI vs HFT"))
    out = [dict(question=q, claim=f"EPI refreshed every T retains more of A than {what}", measure="retention_A",
                method=a["epi"], baseline=a[r], direction="increase", minimum=RETENTION_MINIMUM, tolerance=0.0,
                primary=True) for r, what, q in rivals]
    out += [dict(question=q, claim=f"EPI forgets less of A than {what}", measure="forgetting_A",
                 method=a["epi"], baseline=a[r], direction="decrease", minimum=MINIMUM, tolerance=0.0, primary=False)
            for r, what, q in rivals]
    out += [dict(question=q, claim=f"EPI learns B as well as {what} (within {TOLERANCE:g})", measure="learning_B",
                 method=a["epi"], baseline=a[r], direction="increase", minimum=0.0, tolerance=TOLERANCE,
                 primary=False) for r, what, q in rivals]
    out += [dict(question="general ability", claim="EPI raises the general response loss less than full SFT",
                 measure="general_loss_increase", method=a["epi"], baseline=a["full_sft"], direction="decrease",
                 minimum=0.0, tolerance=0.0, primary=False),
            dict(question="general ability", claim="EPI ends closer to the base model (next-token KL) than full SFT",
                 measure="kl", method=a["epi"], baseline=a["full_sft"], direction="decrease", minimum=0.0,
                 tolerance=0.0, primary=False)]
    return out


def decide_claims(records: Sequence[dict], profile: str = PROFILE) -> List[dict]:
    """Return the design's claims decided by the one rule, each with its spec and the detectable effect (x1's
    `detectable`); an arm missing from `records` makes its claim "not measured". Retention and the general
    measures are per seed; forgetting and learning resample prompts too."""
    present = {evidence.label(r) for r in records}
    frame = None
    out = []
    for spec in claims_spec(profile):
        method, baseline, measure = spec["method"], spec["baseline"], spec["measure"]
        bound = dict(direction=spec["direction"], minimum=spec["minimum"], tolerance=spec["tolerance"])
        if method not in present or baseline not in present:
            c = evidence.claim(spec["claim"], f"{method} or {baseline} has no runs", "not measured")
        elif measure in evidence.MEASURES:
            c = evidence.claim_from_runs(spec["claim"], records, measure, method, baseline, **bound)
        else:  # general ability: a column of the run rows (epi.analysis.compare.run_row)
            if frame is None:
                frame = summary_frame(records)
            if measure not in frame or frame[measure].isna().all():
                c = evidence.claim(spec["claim"], f"{measure} was not recorded (general_eval off)", "not measured")
            else:
                c = evidence.claim_from_frame(spec["claim"], frame, measure, method, baseline, **bound)
        c.update({k: v for k, v in spec.items() if k != "claim"}, detectable=detectable(c.get("decision")))
        out.append(c)
    return out


def summary_frame(records: Sequence[dict]):
    """Return one row per run (epi.experiments.real_cpu.summarize: run_row plus direction and stage scores)."""
    from .real_cpu import summarize
    return summarize(records)


def claims_frame(claims: Sequence[dict]):
    """Return one row per claim with plain columns (measure, effect, interval, seeds, prompts, verdict, ...)."""
    import pandas as pd
    rows = []
    for c in claims:
        d = c.get("decision") or {}
        lo, hi = d.get("interval") or (None, None)
        rows.append({"question": c["question"], "claim": c["claim"], "measure": c["measure"], "primary": c["primary"],
                     "method": c["method"], "baseline": c["baseline"], "effect": d.get("effect"), "low": lo,
                     "high": hi, "seeds": d.get("n_seeds"), "prompts_per_task": d.get("n_prompts"),
                     "minimum": c["minimum"], "tolerance": c["tolerance"],
                     "detectable_80pct": None if math.isnan(c["detectable"]) else c["detectable"],
                     "verdict": c["verdict"]})
    frame = pd.DataFrame(rows)
    for col in ("seeds", "prompts_per_task"):
        frame[col] = frame[col].astype("Int64")
    return frame


def figure(claims: Sequence[dict], out: Path, title: str) -> Path:
    """Draw every claim's effect with its 95 % interval, one panel per measure (their units differ), and save it
    under out/figures; a dotted line marks a non-inferiority tolerance."""
    import matplotlib.pyplot as plt
    plots.set_style()
    measures = list(dict.fromkeys(c["measure"] for c in claims))
    sizes = [sum(c["measure"] == m for c in claims) for m in measures]
    fig, axes = plt.subplots(len(measures), 1, figsize=(7.5, 0.42 * sum(sizes) + 1.3 * len(measures)),
                             gridspec_kw={"height_ratios": sizes}, squeeze=False)
    for ax, m in zip(axes[:, 0], measures):
        mine = [c for c in claims if c["measure"] == m]
        plots.effect_intervals(mine, ax=ax, minimum=mine[0]["minimum"], title="",
                               xlabel=f"{m}: method − baseline (positive = the claim's way)")
        if mine[0]["tolerance"]:
            ax.axvline(-mine[0]["tolerance"], color="black", lw=0.8, ls=":")
    # one legend for every panel, above them: a legend inside a one-row panel would cover its interval
    handles = {h.get_label(): h for ax in axes[:, 0] if ax.get_legend() for h in ax.get_legend().legend_handles}
    for ax in axes[:, 0]:
        if ax.get_legend():
            ax.get_legend().remove()
    fig.suptitle(title, fontsize=11, y=0.995)
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.975),
               ncol=len(handles), fontsize=8, title="verdict · dot: effect · line: 95% interval of the one rule",
               title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = plots.savefig(fig, "x2_effects", out)
    plt.close(fig)
    return path


def select(records: Sequence[dict], profile: str = PROFILE, pair: Sequence[str] = PAIR) -> List[dict]:
    """Return the records that belong to the design: sequential runs of its arms in its two orders, isolation
    from the boundary (warm-up = stage length) and at least EVAL_RECORDS prompts per task."""
    wanted = set(labels(profile).values())
    orders = directions(pair)
    return [r for r in records if r["config"].get("protocol") == "sequential"
            and r["config"].get("profile") == profile and r["config"].get("tasks") in orders
            and evidence.label(r) in wanted
            and r["config"].get("warmup_steps") == r["config"].get("steps_per_task")
            and r["config"].get("eval_records", 0) >= EVAL_RECORDS]


SETTINGS = ("model", "steps_per_task", "batch_size", "lr", "max_length", "eval_records", "ratio", "refresh_every",
            "warmup_steps", "freeze_embeddings", "precision", "threads")


def analyse(runs: str | Path = RUNS, out: str | Path = "results/x2") -> List[dict]:
    """Decide the claims from the finished runs under `runs` and write the results folder `out`."""
    from ..analysis.compare import load_runs, write_provenance
    from .real_cpu import table2_markdown
    records = select(load_runs(runs))
    if not records:
        raise FileNotFoundError(f"no X2 runs under {runs}: run `python -m epi.experiments.x2 run --runs {runs}` first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    command = f"python -m epi.experiments.x2 analyse --runs {runs} --out {out}"
    df = summary_frame(records)
    df.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    (out / "summary.md").write_text(f"<!-- made by: {command} -->\n\n# X2 runs: the CPI-FT Table 2 shape\n\n"
                                    "Points (×100), mean ± sd over seeds, per arm and direction.\n\n"
                                    f"{table2_markdown(df)}\n")
    write_provenance(out, command, ["summary.csv", "summary.md"])
    claims = decide_claims(records)
    frame = claims_frame(claims)
    frame.to_csv(out / "claims.csv", index=False)
    seeds = sorted({r["seed"] for r in records})
    fig = figure(claims, out, f"X2: effects of EPI, {len(seeds)} seeds × 2 directions")
    lines = [f"<!-- made by: {command} -->", "",
             f"# X2 claims ({len(records)} runs; seeds {seeds}; orders "
             f"{', '.join(dict.fromkeys('->'.join(r['config']['tasks']) for r in records))})", "",
             "Each effect is EPI minus the baseline, oriented so that positive is the claim's way, paired by seed "
             "with the two orders averaged inside a seed. Primary: retention of A (per seed). Minimum "
             f"{RETENTION_MINIMUM} on retention, {MINIMUM} on forgetting; learning of B is a non-inferiority claim "
             f"(tolerance {TOLERANCE}). `detectable` is the smallest true effect this design would call beyond 0 "
             f"with {POWER:.0%} power (1.96 + 0.84 standard errors, read from the interval).", "",
             claims_table(claims), "",
             markdown_table(frame[["question", "measure", "method", "baseline", "effect", "low", "high", "seeds",
                                   "detectable_80pct", "verdict"]]), "",
             multiplicity_note(claims), "", f"![effects]({fig.relative_to(out)})"]
    (out / "claims.md").write_text("\n".join(lines) + "\n")
    (out / "README.md").write_text(readme(records, runs, command))
    return claims


def _arm_settings(records: Sequence[dict]) -> Dict[str, dict]:
    """Return {arm: the SETTINGS in which the runs differ, as that arm's runs have them}."""
    varying = [k for k in SETTINGS if len({json.dumps(r["config"].get(k)) for r in records}) > 1]
    return {evidence.label(r): {k: r["config"].get(k) for k in varying} for r in records}


def _shares(records: Sequence[dict]) -> Dict[str, float]:
    """Return {arm: mean protected share at the last step} (0 for full SFT)."""
    out: Dict[str, List[float]] = {}
    for r in records:
        out.setdefault(evidence.label(r), []).append((r.get("protected_fraction") or [0.0])[-1])
    return {a: sum(v) / len(v) for a, v in out.items()}


def readme(records: Sequence[dict], runs: str | Path, command: str) -> str:
    """Return the results folder's README: the commands, the settings the runs share and the time they took."""
    cfg = records[0]["config"]
    timing = Path(runs) / "grid_time.json"
    parts = json.loads(timing.read_text())["invocations"] if timing.is_file() else []
    total = sum(r.get("wall_s") or 0.0 for r in records)
    lines = ["# X2 — evolving vs static where forgetting exists", "",
             "Made by:", "", "```", f"python -m epi.experiments.x2 run --runs {runs}", command, "```", "",
             "Settings shared by every run: " + ", ".join(f"{k} {cfg.get(k)!r}" for k in SETTINGS
                                                         if all(r["config"].get(k) == cfg.get(k) for r in records))
             + "; per arm: " + "; ".join(f"{a}: " + ", ".join(f"{k} {v!r}" for k, v in d.items())
                                        for a, d in _arm_settings(records).items()) + ".", "",
             f"Arms: {', '.join(labels().values())}. Protected share while B trains (last step, mean over runs): "
             + ", ".join(f"{a} {v:.2f}" for a, v in _shares(records).items())
             + ": HFT freezes half of the block weights, about five times what EPI and the random mask protect, so "
             "EPI vs HFT compares two amounts of freezing as well as two ways of choosing.", "",
             f"Time: {len(records)} runs, {total / 60:.1f} min of run time in all (mean {total / len(records):.0f} s "
             "per run, 1 thread each)"
             + (f"; trained in {len(parts)} invocation(s) of `run` taking {sum(p['wall_s'] for p in parts) / 60:.1f} "
                "min wall in all (" + "; ".join(f"{p['runs']} run(s), {p['workers']} worker(s), {p['wall_s'] / 60:.1f} "
                                               f"min, {p['date']}" for p in parts) + ")." if parts else "."), "",
             "Files: summary.csv (one row per run), summary.md (Table 2 shape per arm and direction), claims.md / "
             "claims.csv (the decided claims), "
             "figures/x2_effects.png."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epi.experiments.x2", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the design's missing runs (finished ones are reused)")
    r.add_argument("--runs", default=RUNS)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    r.add_argument("--arms", nargs="+", choices=list(labels()), default=list(labels()),
                   help="a subset of the arms (e.g. to time one run)")
    r.add_argument("--order", choices=["both", "-".join(PAIR), "-".join(PAIR[::-1])], default="both",
                   help="one task order only, A-B (default: both)")
    a = sub.add_parser("analyse", help="decide the claims and write the results folder")
    a.add_argument("--runs", default=RUNS)
    a.add_argument("--out", default="results/x2")
    args = p.parse_args(argv)
    if args.command == "run":
        from .runner import run_grid
        keep = {labels()[n] for n in args.arms}
        todo = [c for c in configs(args.seeds) if c.arm in keep
                and (args.order == "both" or "-".join(c.tasks) == args.order)]
        missing = sum(not (Path(args.runs) / c.run_name / "results.json").exists() for c in todo)
        t0 = time.time()
        run_grid(todo, args.runs, workers=args.workers, say=lambda m: print(m, flush=True))
        wall = time.time() - t0
        if missing:  # each invocation that trained runs adds its wall time (a grid may be run in parts)
            timing = Path(args.runs) / "grid_time.json"
            parts = json.loads(timing.read_text())["invocations"] if timing.is_file() else []
            parts.append({"wall_s": round(wall, 1), "runs": missing, "workers": args.workers,
                          "date": time.strftime("%Y-%m-%d %H:%M")})
            timing.write_text(json.dumps({"invocations": parts}, indent=1) + "\n")
        print(f"X2: {len(todo)} runs ready ({missing} trained) in {wall:.0f} s")
        return 0
    claims = analyse(args.runs, args.out)
    print(json.dumps([{k: c[k] for k in ("claim", "verdict")} for c in claims], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

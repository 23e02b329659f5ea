"""The `real_cpu` experiment: forgetting in sequential SFT of a real pretrained model on two CPU cores.

  python -m epi.real_cpu --out artifacts/runs/real_cpu --results results/real_cpu --seeds 0 1

SmolLM2-135M-Instruct (offline, `epi.models`) is fine-tuned on ability A, then on ability B (and, in a
second grid, B then A) with `full_sft`, `static` (CPI-FT), `epi` and `epi_per_task`: same data, steps and
seeds, only the method differs. Every run also measures general ability (`epi.experiments.general`: response loss on
held-out general pairs and next-token KL to the base model) before training and after each stage.

Writes, under --results:
  base.json    -- the base model before any fine-tuning: general loss, EPI-Mini scores, and real GSM8K /
                  LogiQA slice scores when `../shared/data/real` (or --real-data) is present;
  summary.csv  -- one row per method × seed × direction (forgetting_A, learning_B, general_loss_increase,
                  kl, ... ; A and B are the run's first and second task);
  summary.md   -- the base scores, the CPI-FT Table 2 shape (mean ± sd over seeds) and the general columns;
  claims.csv   -- each claim decided by the one rule on the runs' per-prompt scores (effect, 95 % interval,
                  seeds, prompts, verdict), for readers without the runs (`load_claims`; notebook 05);
  summary.provenance.json -- the command that wrote them (summary.csv stays plain CSV).

Notebook 05 reads the results with `load_summary()` and shows them with `table2_frame()`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from ..analysis import metrics
from ..analysis.compare import run_row
from .profiles import ExperimentConfig, parse_sets, resolve

log = logging.getLogger(__name__)

METHODS = ("full_sft", "static", "epi", "epi_per_task")  # this experiment's selection from epi.methods.METHODS
PAIR = ("math", "code")
RESULTS = Path(__file__).resolve().parents[2] / "results" / "real_cpu"
REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"
# real slices for the base measurement: (task, folder, records, decoding budget in tokens)
REAL_SLICES = (("gsm8k", "gsm8k", 8, 160), ("logiqa", "logiqa", 24, 6))


def grid_configs(pair: Sequence[str] = PAIR, methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0, 1),
                 both_directions: bool = True, **overrides) -> List[ExperimentConfig]:
    """Return the grid's run configs: method × seed × direction (A→B, and B→A when both_directions)."""
    a, b = pair
    directions = [(a, b), (b, a)] if both_directions else [(a, b)]
    return [resolve("real_cpu", method=m, seed=s, tasks=[x, y], **overrides)
            for x, y in directions for s in seeds for m in methods]


def measure_base(config: ExperimentConfig, real_data: Optional[Path] = REAL_DATA, threads: int = 2) -> dict:
    """Return the base model's general ability, EPI-Mini scores and real-slice scores (before any SFT)."""
    import torch

    from ..models import load_model
    from ..tasks import ABILITIES, evaluate, load_task
    from ..training.data import eval_records
    from .base_build import ensure_base
    from .general import GeneralProbe
    torch.set_num_threads(threads)
    t0 = time.time()
    # tiny-base is built per profile and seed (epi.experiments.base_build); any other name loads as it is
    model, tokenizer = load_model(str(ensure_base(config)) if config.model == "tiny-base" else config.model,
                                  seed=config.seed)
    out = {"model": config.model, "eval_records": config.eval_records,
           "general": GeneralProbe(model, tokenizer, max_length=config.max_length).measure(model), "scores": {}}
    sets = {t: eval_records(t, config.eval_records, config.difficulty) for t in ABILITIES}
    for t, r in evaluate(model, tokenizer, sets).items():
        out["scores"][t] = {"score": r["score"], "loss": r["loss"], "n": r["n"], "source": "EPI-Mini"}
    if real_data is not None and Path(real_data).is_dir():
        for task, folder, n, budget in REAL_SLICES:
            recs = load_task(task, Path(real_data) / folder)[:n]
            r = evaluate(model, tokenizer, {task: recs}, max_new_tokens=budget)[task]
            out["scores"][task] = {"score": r["score"], "loss": r["loss"], "n": r["n"],
                                   "source": f"{Path(real_data).name}/{folder} (first {n})"}
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def summarize(records: Sequence[dict]) -> pd.DataFrame:
    """Return one row per run: `compare.run_row` plus direction, task names and the stage scores."""
    rows = []
    for rec in records:
        a, b = rec["config"]["tasks"]
        s, general = rec["stage_scores"], rec.get("general") or []
        row = run_row(rec)
        row.update(direction=f"{a}->{b}", task_A=a, task_B=b, A_base=rec["base_scores"][a]["score"],
                   A_after_A=s[0][a]["score"], A_after_B=s[1][a]["score"], B_base=rec["base_scores"][b]["score"],
                   B_after_A=s[0][b]["score"], B_after_B=s[1][b]["score"])
        if general:
            row.update(general_loss_base=general[0]["general_loss"],
                       general_loss_after_A=general[1]["general_loss"],
                       general_loss_end=general[-1]["general_loss"], kl_after_A=general[1]["kl"])
        rows.append(row)
    first = ["method", "seed", "direction", "task_A", "task_B", "forgetting_A", "learning_B", "learning_A",
             "general_loss_increase", "kl"]
    df = pd.DataFrame(rows)
    df = df[[c for c in first if c in df] + [c for c in df if c not in first]]
    order = {m: i for i, m in enumerate(METHODS)}
    return df.sort_values(["direction", "method", "seed"], key=lambda c: c.map(order) if c.name == "method" else c,
                          kind="stable").reset_index(drop=True)


def load_summary(results: str | Path = RESULTS) -> pd.DataFrame:
    """Return summary.csv of a finished real_cpu experiment (plain CSV; the command that made it is in
    summary.provenance.json)."""
    path = Path(results) / "summary.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; create it with `python -m epi.real_cpu --results {results}`")
    return pd.read_csv(path)


def load_base_measurements(results: str | Path = RESULTS) -> dict:
    """Return base.json of a finished real_cpu experiment (the base model's measurements)."""
    path = Path(results) / "base.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; create it with `python -m epi.real_cpu --results {results}`")
    return json.loads(path.read_text())


def table2_frame(df: pd.DataFrame, scale: float = 100.0) -> pd.DataFrame:
    """Return the CPI-FT Table 2 shape: one row per method, mean and sd over seeds of each column.

    Columns (scores × `scale`, i.e. points): for the first direction A→B, ΔA = A after B − A after A
    (negative = forgetting, CPI-FT's sign) and ΔB = B after B − B before B (learning); for B→A the same
    with the roles swapped; then the general-loss increase and the final KL of each direction (unscaled).
    """
    directions = list(dict.fromkeys(df["direction"]))
    out = {}
    for method, g in df.groupby("method", sort=False):
        row = {}
        for d in directions:
            sub = g[g["direction"] == d]
            if sub.empty:
                continue
            a, b = d.split("->")
            cols = {f"{d}: Δ{a} (forgetting)": -scale * sub["forgetting_A"],
                    f"{d}: Δ{b} (learning)": scale * sub["learning_B"]}
            if "general_loss_increase" in sub:
                cols[f"{d}: general loss increase"] = sub["general_loss_increase"]
                cols[f"{d}: KL"] = sub["kl"]
            for name, values in cols.items():
                mean, sd = metrics.summarize_seeds(values.astype(float).tolist())
                row[(name, "mean")], row[(name, "sd")], row[(name, "seeds")] = mean, sd, len(values)
        out[method] = row
    frame = pd.DataFrame.from_dict(out, orient="index")
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame


def _cell(mean: float, sd: float, digits: int) -> str:
    return f"{mean:+.{digits}f}" if pd.isna(sd) else f"{mean:+.{digits}f} ± {sd:.{digits}f}"


def markdown(df: pd.DataFrame, base: Optional[dict], command: str, wall_s: Optional[float],
             settings: Optional[dict] = None, records: Optional[Sequence[dict]] = None) -> str:
    """Return summary.md: base scores, the Table 2 shape, the general-ability columns and the claims (decided
    from `records` when given — per-prompt scores — else from `df`, per seed)."""
    lines = [f"<!-- made by: {command} -->", "", "# real_cpu: sequential SFT of SmolLM2-135M-Instruct", ""]
    seeds = sorted(df["seed"].unique().tolist())
    lines.append(f"Methods {', '.join(dict.fromkeys(df['method']))}; seeds {seeds}; directions "
                 f"{', '.join(dict.fromkeys(df['direction']))}. Scores in points (×100, exact-match / pass "
                 "rate on held-out EPI-Mini prompts); mean ± sd over seeds.")
    if settings:
        lines.append("Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".")
    if wall_s is not None:
        lines.append(f"Grid wall time: {wall_s / 60:.1f} min ({len(df)} runs; mean run "
                     f"{df['wall_s'].mean():.0f} s, sum {df['wall_s'].sum() / 60:.1f} min).")
    if base:
        lines += ["", "## Base model (before any fine-tuning)", "", base_markdown(base)]
    lines += ["", "## CPI-FT Table 2 shape", "",
              "Δ on the first task = score after the second stage − after the first (negative = forgotten); "
              "Δ on the second task = its learning during the second stage. General loss increase = general "
              "response loss at the end − at the start; KL = next-token KL(base ‖ final) on the general "
              "pairs (top-256 + rest).", "", table2_markdown(df), "",
              "## Claims", "", "| claim | measured | verdict |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['measured']}; {c['evidence']} | {c['verdict']} |"
              for c in claims(list(records) if records else df)]
    lines += ["", "Per run: `summary.csv` (one row per method × seed × direction)."]
    return "\n".join(lines) + "\n"


def base_markdown(base: dict) -> str:
    """Return the base model's measurements (`load_base_measurements()`) as a sentence and a markdown table."""
    g = base["general"]
    lines = [f"General pairs: response loss {g['general_loss']:.3f} (Alpaca-style "
             f"{g.get('general_loss_alpaca', float('nan')):.3f}, chat-style {g.get('general_loss_chat', float('nan')):.3f}), "
             f"KL to itself {g['kl']:.1f}.", "", "| task | source | n | score | loss |", "|---|---|---|---|---|"]
    lines += [f"| {t} | {s['source']} | {s['n']} | {100 * s['score']:.1f} | {s['loss']:.3f} |"
              for t, s in base["scores"].items()]
    return "\n".join(lines)


def table2_markdown(df: pd.DataFrame) -> str:
    """Return the Table 2 shape of `table2_frame(df)` as a markdown table (mean ± sd over seeds)."""
    frame = table2_frame(df)
    names = list(dict.fromkeys(c[0] for c in frame.columns))
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method, row in frame.iterrows():
        cells = [_cell(row[(n, "mean")], row[(n, "sd")], 3 if ("loss" in n or "KL" in n) else 1) for n in names]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(runs, baseline: str = "full_sft", margin: float = 0.03) -> List[dict]:
    """Return report claims: does each isolating method forget less of the first task than `baseline`?

    runs: the grid's run records (per-prompt scores used when recorded) or its summary frame (`summarize`,
    `load_summary`: per-seed numbers). Decided by the one rule (`epi.analysis.report.reduction_claim`):
    pairs by seed, the two directions averaged within a seed (2 seeds × 2 directions = 2 replicates);
    minimum and floor `margin`. The evidence adds the learning of the second task against `baseline`, with
    its own interval from the same rule."""
    from ..analysis import evidence
    from ..analysis.report import reduction_claim
    records = isinstance(runs, (list, tuple))
    df = summarize(runs) if records else runs
    out = []
    for method in [m for m in dict.fromkeys(df["method"]) if m != baseline]:
        learned = df[df["method"] == method]["learning_B"].mean() / max(
            df[df["method"] == baseline]["learning_B"].mean(), 1e-9)
        paired = (evidence.paired_effects(runs, "learning_B", method, baseline) if records else
                  evidence.pair_units(evidence.frame_units(df, "learning_B"), method, baseline))
        learning = (f"; learning of the second task − {baseline}: {evidence.decide(paired).describe()}"
                    if paired.seeds else "")
        out.append(reduction_claim(f"SmolLM2-135M (real_cpu): {method} forgets less of the first task than "
                                   f"{baseline} (CPI-FT Table 2 shape)", runs, "forgetting_A", method, baseline,
                                   margin, f"second task learned {100 * learned:.0f}% as much as {baseline}"
                                   f"{learning}"))
    return out


CLAIM_COLUMNS = ("claim", "measured", "evidence", "verdict", "effect", "low", "high", "seeds", "prompts_per_task",
                 "minimum", "rule")


def claims_frame(decided: Sequence[dict]) -> pd.DataFrame:
    """Return one plain row per decided claim (`claims`): its text, measured line, evidence, verdict and the rule's
    effect, 95 % interval, seeds, prompts per task, minimum and rule name (empty where a claim has no decision)."""
    rows = []
    for c in decided:
        d = c.get("decision") or {}
        lo, hi = d.get("interval") or (None, None)
        rows.append({"claim": c["claim"], "measured": c["measured"], "evidence": c.get("evidence", ""),
                     "verdict": c["verdict"], "effect": d.get("effect"), "low": lo, "high": hi,
                     "seeds": d.get("n_seeds"), "prompts_per_task": d.get("n_prompts"), "minimum": d.get("minimum"),
                     "rule": d.get("rule")})
    frame = pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))
    for col in ("seeds", "prompts_per_task"):
        frame[col] = frame[col].astype("Int64")
    return frame


def load_claims(results: str | Path = RESULTS) -> List[dict]:
    """Return the claims `python -m epi.real_cpu` decided on its runs' per-prompt scores (claims.csv), as claim
    rows with their decision (so a report counts them); [] when the file is absent."""
    from ..analysis import evidence
    path = Path(results) / "claims.csv"
    if not path.is_file():
        return []
    out = []
    for row in pd.read_csv(path, keep_default_na=False, na_values=[""]).to_dict(orient="records"):
        decision = None
        if isinstance(row.get("rule"), str) and row["rule"]:
            num = lambda v: None if v is None or v != v else float(v)  # noqa: E731 (nan → None)
            decision = {"effect": num(row["effect"]), "interval": [num(row["low"]), num(row["high"])],
                        "n_seeds": int(row["seeds"]), "n_prompts": None if row["prompts_per_task"] != row["prompts_per_task"]
                        else int(row["prompts_per_task"]), "rule": row["rule"], "verdict": row["verdict"],
                        "minimum": num(row["minimum"]) or 0.0, "tolerance": 0.0}
        out.append(evidence.claim(row["claim"], row["measured"], row["verdict"], row["evidence"] or "", decision))
    return out


def write_results(df: pd.DataFrame, base: Optional[dict], results: str | Path, command: str,
                  wall_s: Optional[float] = None, settings: Optional[dict] = None,
                  records: Optional[Sequence[dict]] = None) -> None:
    """Write summary.csv (plain CSV), summary.md, summary.provenance.json (the command) and, when `base` is
    given, base.json under `results`; `records` (the runs) let the claims read per-prompt scores and are decided
    into claims.csv."""
    from ..analysis.compare import write_provenance
    from ..jsonio import write_json
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    if base is not None:
        write_json(results / "base.json", base)
    df.to_csv(results / "summary.csv", index=False, float_format="%.4f")
    (results / "summary.md").write_text(markdown(df, base, command, wall_s, settings, records))
    written = ["summary.csv", "summary.md"] + (["base.json"] if base is not None else [])
    if records:  # the claims on per-prompt scores: what a reader without the runs (notebook 05) can still show
        claims_frame(claims(list(records))).to_csv(results / "claims.csv", index=False, float_format="%.4f")
        written.append("claims.csv")
    write_provenance(results, command, written)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m epi.real_cpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="artifacts/runs/real_cpu", help="run folders (resumable)")
    p.add_argument("--results", default="results/real_cpu", help="folder for base.json, summary.csv, summary.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--pair", nargs=2, default=list(PAIR), metavar=("A", "B"))
    p.add_argument("--one-direction", action="store_true", help="A→B only")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (each with the profile's 1 thread)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the profile's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any experiment setting")
    p.add_argument("--real-data", default=str(REAL_DATA), help="folder with gsm8k/ and logiqa/ slices")
    p.add_argument("--skip-base", action="store_true", help="keep an existing base.json (or write none)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .runner import run_grid
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides: Dict[str, object] = parse_sets(args.set)
    if args.threads:
        overrides["threads"] = args.threads
    configs = grid_configs(args.pair, args.methods, args.seeds, not args.one_direction, **overrides)
    command = "python -m epi.real_cpu " + " ".join(argv if argv is not None else sys.argv[1:])
    results = Path(args.results)
    base = None
    if not args.skip_base:
        print("measuring the base model ...", flush=True)
        base = measure_base(configs[0], Path(args.real_data) if args.real_data else None)
        print(json.dumps(base, indent=1), flush=True)
    elif (results / "base.json").is_file():
        base = load_base_measurements(results)
    todo = [c for c in configs if not (Path(args.out) / c.run_name / "results.json").exists()]
    print(f"running {len(todo)} of {len(configs)} runs into {args.out} with {args.workers} worker(s)", flush=True)
    t0 = time.time()
    records = run_grid(configs, args.out, workers=args.workers, say=lambda s: print(s, flush=True))
    timing = results / "grid_time.json"
    if todo:  # the wall time of the invocation that actually ran the grid (a rerun that only summarises keeps it)
        results.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps({"wall_s": round(time.time() - t0, 1), "runs": len(todo),
                                      "workers": args.workers, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    wall = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
    df = summarize(records)
    cfg = configs[0]
    settings = {k: getattr(cfg, k) for k in ("steps_per_task", "batch_size", "lr", "max_length", "eval_records",
                                             "ratio", "refresh_every", "warmup_steps", "probe_steps",
                                             "freeze_embeddings", "precision", "threads")}
    settings["workers"] = args.workers
    write_results(df, base, results, command, wall, settings=settings, records=records)
    print(table2_frame(df).round(3).to_string())
    print(f"grid wall time {wall / 60:.1f} min; wrote {results}/summary.csv and summary.md" if wall else
          f"wrote {results}/summary.csv and summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compare finished runs: one row per run (method × seed × protocol) and a method × task table.

  python -m epi compare artifacts/runs [--out results/cpu]

This module reads records only (rows, tables, paired differences); collecting every run under a folder,
with runs of one method pooled only when their settings match, is epi.experiments.collect.compare.

Per protocol, the metrics that make it meaningful (all in epi.metrics):
  mix        — per-task final score (mean of the last evaluations), mean score, average normalised score
               and seesaw against the single-task references of the same seed (when a reference run exists);
  forgetting — per task: forgetting = base score − final score (positive = forgot) for the tasks not trained,
               learning = final − base for the trained ones;
  sequential — the CPI-FT Table 2 shape: forgetting of A (score on A after A − after B), retention of A
               (after B / after A, epi.analysis.metrics.retention) and learning of B.

Every row carries `n_prompts` (evaluation prompts per task), and every summary table states the prompt-level
standard error of its scores at that count (epi.analysis.tables.prompt_se_line).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from . import metrics
from .tables import mean_sd_cell, prompt_se_line

log = logging.getLogger(__name__)

MIN_REFERENCE = 0.05
REQUIRED = ("protocol", "method", "profile", "tasks")  # config fields every row needs
# row columns that name a run rather than measure it (never averaged in a summary table)
ID_COLUMNS = ("protocol", "method", "variant", "seed", "base_seed", "profile", "n_prompts", "wall_s")


def _problem(rec) -> Optional[str]:
    """Return why a parsed results.json cannot be a row (None when it can)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
        return "no 'config' object"
    missing = [k for k in REQUIRED if k not in rec["config"]] + [k for k in ("seed", "final_scores") if k not in rec]
    return f"missing field(s) {missing}" if missing else None


def load_runs(root: str | Path) -> List[dict]:
    """Return every results record under `root` (recursively), each with its folder under "_path".

    A file that is not JSON, or not a results record, is skipped with a warning naming it (the other runs
    are still compared)."""
    runs = []
    for path in sorted(Path(root).rglob("results.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("compare: skipped %s: not readable JSON (%s)", path, e)
            continue
        problem = _problem(rec)
        if problem:
            log.warning("compare: skipped %s: not a results record (%s)", path, problem)
            continue
        rec["_path"] = str(path.parent)
        runs.append(rec)
    return runs


def reference_scores(runs: List[dict]) -> Dict[int, Dict[str, float]]:
    """Return {seed: {task: final score}} of the single-task reference runs among `runs` (a seed whose two
    reference runs differ is left out, with a warning)."""
    refs: Dict[int, Dict[str, float]] = {}
    for r in runs:
        if r["config"]["protocol"] != "reference":
            continue
        if r["seed"] in refs and refs[r["seed"]] != r["final_scores"]:
            log.warning("compare: two reference runs of seed %s differ (%s); seed %s is normalised by neither",
                        r["seed"], r["_path"], r["seed"])
            refs[r["seed"]] = None
        elif r["seed"] not in refs:
            refs[r["seed"]] = r["final_scores"]
    return {s: v for s, v in refs.items() if v is not None}


def run_row(rec: dict, references: Optional[Dict[str, float]] = None) -> dict:
    """Return one flat row of scores and metrics for a results record."""
    cfg = rec["config"]
    row = {"protocol": cfg["protocol"], "method": rec.get("arm") or cfg["method"],  # an arm: "full_sft@lr=0.0003"
           "seed": rec["seed"], "profile": cfg["profile"]}
    # the start model's seed (ExperimentConfig.start_seed): seeds that share a base form a block
    row["base_seed"] = rec["seed"] if cfg.get("base_seed") is None else cfg["base_seed"]
    tasks = cfg["tasks"]
    final = rec["final_scores"]
    counts = [s.get("n") for t, s in (rec.get("base_scores") or {}).items() if t in tasks and isinstance(s, dict)]
    # prompts per task: as evaluated (a hub split may hold fewer than eval_records), else as configured
    row["n_prompts"] = min(counts) if counts and None not in counts else cfg.get("eval_records")
    for t in tasks:
        row[f"score_{t}"] = final[t]
    row["mean_score"] = sum(final[t] for t in tasks) / len(tasks)
    if cfg["protocol"] == "reference":
        return row
    base = {t: rec["base_scores"][t]["score"] for t in tasks}
    if cfg["protocol"] == "mix" and references and all(t in references for t in tasks):
        scores = [final[t] for t in tasks]
        refs = [references[t] for t in tasks]
        # a reference near zero makes a ratio meaningless (nothing was learned to normalise by)
        row["avg_normalized"] = (metrics.average_normalized_score(scores, refs)
                                 if min(refs) >= MIN_REFERENCE else None)
        see = metrics.seesaw(scores, [references[t] for t in tasks])
        row["seesaw_count"], row["seesaw_spread"], row["worst_drop"] = see["count"], see["spread"], see["worst"]
    if cfg["protocol"] == "forgetting":
        kept = [t for t in tasks if t not in cfg["train_tasks"]]
        for t in kept:
            row[f"forgetting_{t}"] = base[t] - final[t]
        for t in cfg["train_tasks"]:
            row[f"learning_{t}"] = final[t] - base[t]
        row["forgetting_mean"] = sum(base[t] - final[t] for t in kept) / len(kept)
        row["learning_mean"] = sum(final[t] - base[t] for t in cfg["train_tasks"]) / len(cfg["train_tasks"])
    if cfg["protocol"] == "sequential":
        a, b = tasks
        s = rec["stage_scores"]
        t2 = metrics.table2(a_after_a=s[0][a]["score"], a_after_b=s[1][a]["score"],
                            b_after_a=s[0][b]["score"], b_after_b=s[1][b]["score"], a_before=base[a])
        row["forgetting_A"] = t2["forgetting_A"]
        # A after B / A after A, next to the absolute forgetting; nan when A was never learnt
        row["retention_A"] = metrics.retention(a_after_a=s[0][a]["score"], a_after_b=s[1][a]["score"])
        row["learning_B"], row["learning_A"] = t2["learning_B"], t2["learning_A"]
    general = rec.get("general") or []
    if general:  # general ability (epi.experiments.general): loss increase over the run and the final KL to the start
        row["general_loss_increase"] = general[-1]["general_loss"] - general[0]["general_loss"]
        row["kl"] = general[-1]["kl"]
    row["protected_fraction"] = rec.get("protected_fraction_mean", 0.0)
    drift = rec.get("drift") or []
    later = [d["jaccard_prev"] for d in drift if d.get("jaccard_prev") is not None]
    row["jaccard_prev_mean"] = sum(later) / len(later) if later else None
    row["wall_s"] = rec.get("wall_s")
    return row


def summary_table(df: pd.DataFrame, digits: int = 2, n_prompts: Optional[int] = None) -> str:
    """Return a markdown table per protocol: method × (score and metric columns), mean ± sd over seeds, each
    followed by its prompt-level standard error line (`prompt_se_line`).

    The prompt count is `n_prompts`, else the frame's "n_prompts" column (run_row's; the smallest when runs
    differ); a frame with neither says that the line cannot be computed. With a "variant" column (compare's
    runs of one method with different settings), each variant is its own row, labelled by the settings that
    tell it apart."""
    parts = []
    keys = ["method", "variant"] if "variant" in df else ["method"]
    for protocol, sub in df.groupby("protocol", sort=False):
        cols = [c for c in sub.columns if c not in ID_COLUMNS and sub[c].notna().any()]
        header = "| method | seeds | " + " | ".join(cols) + " |"
        lines = [f"### protocol: {protocol}", "", header, "|" + "---|" * (len(cols) + 2)]
        for key, g in sub.groupby(keys, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            method, variant = key[0], (key[1] if len(key) > 1 else "")
            name = f"{method} ({variant})" if variant else method
            cells = [mean_sd_cell(g[c].tolist(), digits) for c in cols]
            lines.append(f"| {name} | {len(g)} | " + " | ".join(cells) + " |")
        n = n_prompts if n_prompts is not None else (
            int(sub["n_prompts"].min()) if "n_prompts" in sub and sub["n_prompts"].notna().any() else None)
        task_means = [sub[c].mean() for c in sub.columns if c.startswith("score_") and sub[c].notna().any()]
        lines += ["", prompt_se_line(n, task_means)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def write_provenance(out: str | Path, command: str, files: List[str]) -> Path:
    """Write `<out>/summary.provenance.json`: the command that made `files` (the CSV stays plain CSV)."""
    path = Path(out) / "summary.provenance.json"
    path.write_text(json.dumps({"command": command, "files": files}, indent=1) + "\n")
    return path


def write_tables(df: pd.DataFrame, out: str | Path, command: str) -> None:
    """Write summary.csv (one row per run, plain CSV), summary.md (mean ± sd, the command in its header) and
    summary.provenance.json (the command that made them)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    (out / "summary.md").write_text(f"<!-- made by: {command} -->\n\n{summary_table(df)}\n")
    write_provenance(out, command, ["summary.csv", "summary.md"])


def paired(df: pd.DataFrame, method: str, baseline: str, column: str = "mean_score",
           protocol: Optional[str] = None) -> dict:
    """Return the per-seed difference method − baseline on `column`: mean, sd, seeds, how many > 0.

    Seeds pair the runs (same base model, data order and evaluation prompts), which removes most of the
    between-seed variance that unpaired mean ± sd tables carry.
    """
    sub = df if protocol is None else df[df["protocol"] == protocol]
    for m in (method, baseline):
        if "variant" in sub and sub[sub["method"] == m]["variant"].nunique() > 1:
            variants = sorted(set(sub[sub["method"] == m]["variant"]))
            raise ValueError(f"paired: {m} has runs with different settings ({variants}); select one variant first")
    a = sub[sub["method"] == method].set_index("seed")[column]
    b = sub[sub["method"] == baseline].set_index("seed")[column]
    diff = (a - b).dropna()
    mean, sd = metrics.summarize_seeds(diff.tolist()) if len(diff) else (float("nan"), float("nan"))
    return {"method": method, "baseline": baseline, "column": column, "mean": mean, "sd": sd,
            "seeds": len(diff), "positive": int((diff > 0).sum())}

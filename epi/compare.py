"""Compare finished runs: one row per run (method × seed × protocol) and a method × task table.

  python -m epi compare artifacts/runs [--out results/cpu]

Per protocol, the metrics that make it meaningful (all in epi.metrics):
  mix        — per-task final score (mean of the last evaluations), mean score, average normalised score
               and seesaw against the single-task references of the same seed (when a reference run exists);
  forgetting — per task: forgetting = base score − final score (positive = forgot) for the tasks not trained,
               learning = final − base for the trained ones;
  sequential — the CPI-FT Table 2 shape: forgetting of A (score on A after A − after B) and learning of B.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from . import metrics


MIN_REFERENCE = 0.05


def load_runs(root: str | Path) -> List[dict]:
    """Return every results record under `root` (recursively), each with its folder under "_path"."""
    runs = []
    for path in sorted(Path(root).rglob("results.json")):
        rec = json.loads(path.read_text())
        rec["_path"] = str(path.parent)
        runs.append(rec)
    return runs


def _references(runs: List[dict]) -> Dict[int, Dict[str, float]]:
    return {r["seed"]: r["final_scores"] for r in runs if r["config"]["protocol"] == "reference"}


def run_row(rec: dict, references: Optional[Dict[str, float]] = None) -> dict:
    """Return one flat row of scores and metrics for a results record."""
    cfg = rec["config"]
    row = {"protocol": cfg["protocol"], "method": cfg["method"], "seed": rec["seed"], "profile": cfg["profile"]}
    tasks = cfg["tasks"]
    final = rec["final_scores"]
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
        row["forgetting_A"], row["learning_B"], row["learning_A"] = t2["forgetting_A"], t2["learning_B"], t2["learning_A"]
    general = rec.get("general") or []
    if general:  # general ability (epi.general): loss increase over the run and the final KL to the start
        row["general_loss_increase"] = general[-1]["general_loss"] - general[0]["general_loss"]
        row["kl"] = general[-1]["kl"]
    row["protected_fraction"] = rec.get("protected_fraction_mean", 0.0)
    drift = rec.get("drift") or []
    later = [d["jaccard_prev"] for d in drift if d.get("jaccard_prev") is not None]
    row["jaccard_prev_mean"] = sum(later) / len(later) if later else None
    row["wall_s"] = rec.get("wall_s")
    return row


def compare(root: str | Path) -> pd.DataFrame:
    """Return one row per finished run under `root`, sorted by protocol, method and seed."""
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no results.json under {root}; create runs with `python -m epi run ... --out {root}`")
    refs = _references(runs)
    rows = [run_row(r, refs.get(r["seed"])) for r in runs]
    return pd.DataFrame(rows).sort_values(["protocol", "method", "seed"]).reset_index(drop=True)


def summary_table(df: pd.DataFrame, digits: int = 2) -> str:
    """Return a markdown table per protocol: method × (score and metric columns), mean ± sd over seeds."""
    parts = []
    for protocol, sub in df.groupby("protocol", sort=False):
        cols = [c for c in sub.columns if c not in ("protocol", "method", "seed", "profile", "wall_s")
                and sub[c].notna().any()]
        header = "| method | seeds | " + " | ".join(cols) + " |"
        lines = [f"### protocol: {protocol}", "", header, "|" + "---|" * (len(cols) + 2)]
        for method, g in sub.groupby("method", sort=True):
            cells = [metrics.mean_sd(g[c].dropna().astype(float).tolist(), digits) if g[c].notna().any() else "–"
                     for c in cols]
            lines.append(f"| {method} | {len(g)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def write_summary(df: pd.DataFrame, out: str | Path, command: str) -> None:
    """Write summary.csv (one row per run) and summary.md (mean ± sd) with the command that made them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "summary.csv").open("w") as fh:
        fh.write(f"# made by: {command}\n")
        df.to_csv(fh, index=False, float_format="%.4f")
    (out / "summary.md").write_text(f"<!-- made by: {command} -->\n\n{summary_table(df)}\n")


def paired(df: pd.DataFrame, method: str, baseline: str, column: str = "mean_score",
           protocol: Optional[str] = None) -> dict:
    """Return the per-seed difference method − baseline on `column`: mean, sd, seeds, how many > 0.

    Seeds pair the runs (same base model, data order and evaluation prompts), which removes most of the
    between-seed variance that unpaired mean ± sd tables carry.
    """
    sub = df if protocol is None else df[df["protocol"] == protocol]
    a = sub[sub["method"] == method].set_index("seed")[column]
    b = sub[sub["method"] == baseline].set_index("seed")[column]
    diff = (a - b).dropna()
    mean, sd = metrics.summarize_seeds(diff.tolist()) if len(diff) else (float("nan"), float("nan"))
    return {"method": method, "baseline": baseline, "column": column, "mean": mean, "sd": sd,
            "seeds": len(diff), "positive": int((diff > 0).sum())}

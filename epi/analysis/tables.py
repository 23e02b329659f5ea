"""Markdown tables for summaries and reports: a DataFrame, a list of claims, a mean ± sd cell, and the line that
states a table's prompt-level standard error.

The notebooks print pandas tables for reading and pass these markdown strings to `write_summary`, so the
report shows the same numbers with the same rounding.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd

from . import stats
from .metrics import mean_sd

MISSING = "–"  # a cell with no value to show (a method not run, a statistic with no finite values)


def _cell(value, float_format: str) -> str:
    # numpy float64 is a float; ints, strings and the rest are shown as str() gives them
    return format(value, float_format) if isinstance(value, float) else str(value)


def markdown_table(frame: pd.DataFrame, *, float_format: str = ".3f", index: bool = False) -> str:
    """Return `frame` as a GitHub markdown table: floats formatted with `float_format` (e.g. ".3f", ".4g"),
    other values as str(); index=True adds the index as the first column, headed by its name."""
    header = [str(c) for c in frame.columns]
    rows = [[_cell(v, float_format) for v in row] for row in frame.itertuples(index=index)]
    if index:
        header = [frame.index.name or ""] + header
        rows = [[str(row[0])] + cells[1:] for row, cells in zip(frame.itertuples(index=True), rows)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def claims_table(claims: Sequence[dict], notebooks: Optional[Sequence[str]] = None) -> str:
    """Return claims (dicts with claim, measured, verdict) as a markdown table, the verdict in bold; with
    `notebooks` (one name per claim), a first column names the notebook each claim comes from."""
    claims = list(claims)
    if notebooks is not None and len(notebooks) != len(claims):
        raise ValueError(f"notebooks must name one notebook per claim: {len(notebooks)} names, {len(claims)} claims")
    lead = [f"| {n} " for n in notebooks] if notebooks is not None else [""] * len(claims)
    lines = [("| notebook " if notebooks is not None else "") + "| claim | measured | verdict |",
             "|---" * (4 if notebooks is not None else 3) + "|"]
    lines += [f"{first}| {c['claim']} | {c['measured']} | **{c['verdict']}** |" for first, c in zip(lead, claims)]
    return "\n".join(lines)


def mean_sd_cell(values: Sequence, digits: int = 2) -> str:
    """Return `epi.metrics.mean_sd` over the values that are numbers (None and nan skipped), MISSING when none
    is left: the cell of a method × column table where some runs lack the column."""
    kept = [float(v) for v in values if v is not None and not pd.isna(v)]
    return mean_sd(kept, digits) if kept else MISSING


def prompt_se_line(n_prompts: Optional[int], task_scores: Sequence[float] = ()) -> str:
    """Return the caption line that states a table's prompt-level standard error at `n_prompts` per task.

    The se of one task score is `epi.analysis.stats.score_se` (Agresti–Coull) at the mean of `task_scores`
    (at 0.5, its largest, when none are given); the se of the mean over the tasks is `stats.mean_score_se` at
    those scores. A difference of two runs carries up to √2 times these (less when the same prompts pair them).
    Without a prompt count the line says so rather than guess one."""
    if n_prompts is None:
        return "_prompt-level se: not stated (no prompt count for this table; pass n_prompts)_"
    kept = [float(v) for v in task_scores if v is not None and not pd.isna(v)]
    if not kept:
        return (f"_prompt-level se of a task score at {n_prompts} prompts ≤ {stats.score_se(0.5, n_prompts):.3f} "
                "(at score 0.5, its largest); a difference of two runs: up to √2 × that, less where shared prompts "
                "pair them_")
    one = stats.score_se(sum(kept) / len(kept), n_prompts)
    line = f"_prompt-level se of a task score at {n_prompts} prompts ≈ {one:.3f}"
    if len(kept) > 1:
        line += f", of the mean over {len(kept)} tasks ≈ {stats.mean_score_se(kept, n_prompts):.3f}"
    return line + (" (at this table's mean scores); a difference of two runs: up to √2 × these, less where shared "
                   "prompts pair them_")

"""Markdown tables for summaries and the report (epi.analysis.tables), checked against hand-written strings."""
import math

import numpy as np
import pandas as pd
import pytest

from epi.analysis.tables import MISSING, claims_table, markdown_table, mean_sd_cell


def frame():
    return pd.DataFrame({"method": ["full_sft", "epi"], "score": [0.12345, 1.0], "steps": [200, 100]})


def test_markdown_table_formats_floats_and_leaves_the_rest_as_text():
    assert markdown_table(frame()) == ("| method | score | steps |\n"
                                       "|---|---|---|\n"
                                       "| full_sft | 0.123 | 200 |\n"
                                       "| epi | 1.000 | 100 |")
    # ".4g" keeps four significant digits and drops trailing zeros (notebook 02's tables)
    assert markdown_table(frame(), float_format=".4g").splitlines()[2:] == ["| full_sft | 0.1235 | 200 |",
                                                                            "| epi | 1 | 100 |"]


def test_markdown_table_with_index_puts_its_name_first():
    t = frame().set_index("method")
    assert markdown_table(t, index=True, float_format=".4f") == ("| method | score | steps |\n"
                                                                 "|---|---|---|\n"
                                                                 "| full_sft | 0.1235 | 200 |\n"
                                                                 "| epi | 1.0000 | 100 |")
    t.index.name = None
    assert markdown_table(t, index=True).splitlines()[0] == "|  | score | steps |"
    # negative control: without index=True the method names are not in the table
    assert "full_sft" not in markdown_table(t)


def test_markdown_table_keeps_integer_columns_integer_next_to_floats():
    # numpy float64 cells are floats; int64 cells are not formatted as floats, nor is nan hidden
    t = pd.DataFrame({"a": np.array([1, 2], dtype=np.int64), "b": [np.float64(0.5), math.nan]})
    assert markdown_table(t).splitlines()[2:] == ["| 1 | 0.500 |", "| 2 | nan |"]


def test_claims_table_bolds_the_verdict_and_can_name_notebooks():
    claims = [{"claim": "EPI forgets less", "measured": "0.15 vs 0.30", "verdict": "supported"},
              {"claim": "static beats full SFT", "measured": "−0.10", "verdict": "not supported"}]
    assert claims_table(claims) == ("| claim | measured | verdict |\n|---|---|---|\n"
                                    "| EPI forgets less | 0.15 vs 0.30 | **supported** |\n"
                                    "| static beats full SFT | −0.10 | **not supported** |")
    named = claims_table(claims, notebooks=["05", "04"]).splitlines()
    assert named[:2] == ["| notebook | claim | measured | verdict |", "|---|---|---|---|"]
    assert named[3] == "| 04 | static beats full SFT | −0.10 | **not supported** |"
    with pytest.raises(ValueError, match="one notebook per claim"):
        claims_table(claims, notebooks=["05"])


def test_mean_sd_cell_skips_missing_values():
    # mean 0.6, sample sd √((0.01 + 0.01)/1) = 0.1414
    assert mean_sd_cell([0.5, None, math.nan, 0.7]) == "0.60 ± 0.14"
    assert mean_sd_cell([0.5, None], digits=3) == "0.500 (1 seed)"
    assert mean_sd_cell([None, math.nan]) == MISSING == "–"
    assert mean_sd_cell(pd.Series([0.2, np.nan, 0.4])) == "0.30 ± 0.14"


# ---------------------------------------------------------------- forgetting next to retention, prompt-level se

def seq_record(method, seed, a_after_a, a_after_b, n=200):
    """A sequential A → B record by hand: B goes 0.1 → 0.6, A starts at 0.1."""
    stage = [{"math": {"score": a_after_a}, "code": {"score": 0.1}},
             {"math": {"score": a_after_b}, "code": {"score": 0.6}}]
    return {"config": {"protocol": "sequential", "method": method, "profile": "cpu", "tasks": ["math", "code"]},
            "seed": seed, "final_scores": {"math": a_after_b, "code": 0.6}, "stage_scores": stage,
            "base_scores": {"math": {"score": 0.1, "n": n}, "code": {"score": 0.1, "n": n}}}


def test_a_sequential_row_has_retention_next_to_forgetting():
    from epi.analysis.compare import run_row
    row = run_row(seq_record("full_sft", 0, a_after_a=0.8, a_after_b=0.4))
    assert row["forgetting_A"] == pytest.approx(0.4) and row["retention_A"] == pytest.approx(0.5)  # 0.4 / 0.8
    assert row["n_prompts"] == 200
    keys = list(row)
    assert keys.index("retention_A") == keys.index("forgetting_A") + 1
    # A never learnt: nothing to retain (nan), while the absolute forgetting is a number
    unlearnt = run_row(seq_record("full_sft", 1, a_after_a=0.0, a_after_b=0.0))
    assert math.isnan(unlearnt["retention_A"]) and unlearnt["forgetting_A"] == 0.0


def test_summary_tables_show_forgetting_and_retention_side_by_side_with_their_prompt_se():
    from epi.analysis.compare import run_row, summary_table
    df = pd.DataFrame([run_row(seq_record("full_sft", 0, 0.8, 0.4)), run_row(seq_record("full_sft", 1, 0.6, 0.3)),
                       run_row(seq_record("epi", 0, 0.5, 0.5)), run_row(seq_record("epi", 1, 0.0, 0.0))])
    table = summary_table(df)
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert "| forgetting_A | retention_A |" in header
    assert "n_prompts" not in header and "base_seed" not in header  # run ids, not measures
    # full_sft retention 0.5 and 0.5; epi 1.0 and nan (skipped: one seed left)
    assert "| full_sft | 2 |" in table and "0.50 ± 0.00" in table and "1.00 (1 seed)" in table
    # the table's mean task scores: math (0.4 + 0.3 + 0.5 + 0) / 4 = 0.3, code 0.6, at 200 prompts.
    # task score at 0.45: p̃ = 91/202 = 0.4505, √(0.4505 · 0.5495 / 202) = 0.0350; mean over the two tasks:
    # p̃ = 61/202 and 121/202, variances 0.0010435 + 0.0011891 -> √0.0022326 / 2 = 0.0236
    assert table.splitlines()[-1] == ("_prompt-level se of a task score at 200 prompts ≈ 0.035, of the mean over 2 "
                                      "tasks ≈ 0.024 (at this table's mean scores); a difference of two runs: up to "
                                      "√2 × these, less where shared prompts pair them_")


def test_prompt_se_line_by_hand_and_when_the_prompt_count_is_unknown():
    from epi.analysis.compare import summary_table
    from epi.analysis.tables import prompt_se_line
    # Agresti–Coull at 0.5 and n = 200: √(0.25 / 202) = 0.0352; at 80: √(0.25 / 82) = 0.0552
    assert prompt_se_line(200).startswith("_prompt-level se of a task score at 200 prompts ≤ 0.035 (at score 0.5")
    assert "at 80 prompts ≤ 0.055" in prompt_se_line(80)
    # scores 0.2 and 0.8: p̃ = 41/202 and 161/202, each variance 0.2030 · 0.7970 / 202 = 0.000801;
    # mean over the two tasks √(2 · 0.000801) / 2 = 0.020
    assert "≈ 0.035, of the mean over 2 tasks ≈ 0.020" in prompt_se_line(200, [0.2, 0.8])
    # a frame without n_prompts (a notebook's column subset) says so; n_prompts= supplies it
    df = pd.DataFrame({"protocol": ["mix"], "method": ["epi"], "seed": [0], "mean_score": [0.5]})
    assert summary_table(df).splitlines()[-1].startswith("_prompt-level se: not stated")
    assert "at 80 prompts ≤ 0.055" in summary_table(df, n_prompts=80).splitlines()[-1]

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

"""The reproduction report collects each notebook's summary.json into one claim-by-claim table."""
import json

import numpy as np
import pytest

from epi.analysis.drift import jaccard_matrix, random_jaccard, spearman_matrix
from epi.analysis.report import claim, reduction_claim, write_report, write_summary


def test_report_collects_claims_tables_and_figures(tmp_path):
    (tmp_path / "01_x" / "figures").mkdir(parents=True)
    (tmp_path / "01_x" / "figures" / "a.png").write_bytes(b"png")
    write_summary(tmp_path / "01_x", "01 · X", profile="smoke", seeds=[0],
                  claims=[claim("importance drifts", "J=0.4", "supported", "J(first,last)=0.4 vs random 0.05")],
                  tables={"drift": "| a |\n|---|\n| 1 |"}, figures=[str(tmp_path / "01_x" / "figures" / "a.png")])
    write_summary(tmp_path / "04_y", "04 · Y", profile="smoke", seeds=[0, 1],
                  claims=[claim("EPI beats static", "0.31 vs 0.35", "not supported")])
    report = write_report(tmp_path).read_text()
    assert "| 01 · X | importance drifts | J=0.4 | **supported** |" in report
    assert "| 04 · Y | EPI beats static | 0.31 vs 0.35 | **not supported** |" in report
    assert "![a](01_x/figures/a.png)" in report and "**drift**" in report
    assert json.loads((tmp_path / "04_y" / "summary.json").read_text())["seeds"] == [0, 1]
    # a reproduction of 01 only leaves 04's older summary out of its report
    only = write_report(tmp_path, notebooks=("01",)).read_text()
    assert "importance drifts" in only and "04 · Y" not in only


def test_claim_verdicts_are_checked_and_missing_summaries_explained(tmp_path):
    with pytest.raises(ValueError, match="verdict"):
        claim("x", "y", "probably")
    with pytest.raises(FileNotFoundError, match="make reproduce"):
        write_report(tmp_path)


def test_drift_matrices_from_masks_and_samples():
    masks = {1: {"w": np.array([1, 1, 0, 0], bool)}, 2: {"w": np.array([0, 1, 1, 0], bool)}}
    j = jaccard_matrix(masks, [1, 2])
    assert j.tolist() == [[1.0, 1 / 3], [1 / 3, 1.0]]
    s = spearman_matrix({1: np.array([1.0, 2, 3, 4]), 2: np.array([4.0, 3, 2, 1])}, [1, 2])
    assert s[0, 1] == pytest.approx(-1.0)
    assert random_jaccard(0.1) == pytest.approx(0.1 / 1.9)


def test_reduction_claim_pairs_runs_by_seed_and_direction_and_applies_the_margin():
    import pandas as pd
    rows = [("full_sft", 0, "a→b", 0.40), ("epi", 0, "a→b", 0.10), ("full_sft", 1, "a→b", 0.30),
            ("epi", 1, "a→b", 0.20), ("full_sft", 0, "b→a", 0.50), ("epi", 0, "b→a", 0.55)]
    df = pd.DataFrame(rows, columns=["method", "seed", "direction", "forgetting_A"])
    mixed = reduction_claim("x", df, "forgetting_A", "epi", "full_sft")
    # reductions 0.30, 0.10, −0.05 over 3 pairs: mean +0.117 > margin but one pair worse → mixed
    assert mixed["verdict"] == "mixed" and "paired reduction +0.117 (3 pairs)" in mixed["measured"]
    both_better = reduction_claim("x", df[df.direction == "a→b"], "forgetting_A", "epi", "full_sft")
    assert both_better["verdict"] == "supported"
    assert reduction_claim("x", df[df.direction == "b→a"], "forgetting_A", "epi", "full_sft")["verdict"] == "not supported"
    assert reduction_claim("x", df, "forgetting_A", "epi", "full_sft", margin=0.5)["verdict"] == "not measured"
    assert reduction_claim("x", df, "forgetting_A", "random", "full_sft")["verdict"] == "not measured"

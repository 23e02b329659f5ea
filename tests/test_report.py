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
    assert "Time per notebook" not in only                      # no timings given: no made-up table
    timed = write_report(tmp_path, timings={"01_x": 185.2, "04_y": 41.0},
                         parameters={"04_y": {"N_SEEDS": 1, "EXTRA_ARMS": False}}).read_text()
    assert "| 01_x | – | 3 min 5 s |" in timed and "| 04_y | N_SEEDS=1, EXTRA_ARMS=False | 41 s |" in timed
    assert "| **total** | | **3 min 46 s** |" in timed


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


def _forgetting_frame(epi_by_seed):
    import pandas as pd
    rows = []
    for seed, (ab, ba) in enumerate(epi_by_seed):
        rows += [("full_sft", seed, "a→b", 0.40), ("epi", seed, "a→b", ab),
                 ("full_sft", seed, "b→a", 0.50), ("epi", seed, "b→a", ba)]
    return pd.DataFrame(rows, columns=["method", "seed", "direction", "forgetting_A"])


def test_reduction_claim_pairs_by_seed_averages_directions_and_applies_the_margin():
    # reductions per seed (directions averaged): (0.30 + 0.20)/2 = 0.25, 0.25, 0.20, 0.275 → 4 replicates, not 8
    df = _forgetting_frame([(0.10, 0.30), (0.20, 0.20), (0.20, 0.30), (0.10, 0.25)])
    c = reduction_claim("x", df, "forgetting_A", "epi", "full_sft")
    assert c["verdict"] == "supported" and c["decision"]["n_seeds"] == 4
    assert c["decision"]["effect"] == pytest.approx(0.24375)
    assert "orders a→b, b→a averaged within each" in c["measured"] and "rule: bootstrap, minimum 0.03" in c["measured"]
    # a seed against the claim keeps the interval across 0: mixed, not "3 of 4 pairs"
    assert reduction_claim("x", _forgetting_frame([(0.10, 0.30), (0.20, 0.20), (0.20, 0.30), (0.60, 0.70)]),
                           "forgetting_A", "epi", "full_sft")["verdict"] == "mixed"
    worse = _forgetting_frame([(0.50, 0.60), (0.45, 0.55), (0.50, 0.65), (0.45, 0.60)])
    assert reduction_claim("x", worse, "forgetting_A", "epi", "full_sft")["verdict"] == "not supported"
    # the margin is also the floor: a baseline forgetting less than it has nothing to reduce
    assert reduction_claim("x", df, "forgetting_A", "epi", "full_sft", margin=0.5)["verdict"] == "not measured"
    assert reduction_claim("x", df, "forgetting_A", "random", "full_sft")["verdict"] == "not measured"
    # two seeds as numbers cannot reach the 95 % level, however consistent (the audit's "4/4 pairs")
    two = reduction_claim("x", df[df.seed < 2], "forgetting_A", "epi", "full_sft")
    assert two["verdict"] == "mixed" and "range of 2 seed(s)" in two["measured"]


def test_reduction_claim_reads_records_too():
    def rec(method, seed, forgot):
        entry = lambda s: {"score": s, "loss": 1.0, "n": 4}
        return {"config": {"protocol": "sequential", "method": method, "tasks": ["a", "b"], "profile": "smoke"},
                "seed": seed, "stage_scores": [{"a": entry(0.8), "b": entry(0.0)}, {"a": entry(0.8 - forgot),
                                                                                       "b": entry(0.6)}]}
    runs = [rec("full_sft", s, 0.5 + 0.01 * s) for s in range(4)] + [rec("epi", s, 0.1) for s in range(4)]
    c = reduction_claim("x", runs, "forgetting_A", "epi", "full_sft")
    assert c["verdict"] == "supported" and c["decision"]["effect"] == pytest.approx(0.415)


def test_no_numpy_repr_reaches_a_report_line(tmp_path):
    per_seed = [np.float64(-0.105), np.float64(-0.103)]
    write_summary(tmp_path / "04_y", "04 · Y", profile="smoke", seeds=[0, 1],
                  claims=[claim("static beats full SFT", f"Δ {np.float64(-0.1)!r}", "not supported",
                                f"per seed: {per_seed}")])
    # a summary written before claims were cleaned (a stored numpy repr) is cleaned by the report
    (tmp_path / "05_z").mkdir()
    (tmp_path / "05_z" / "summary.json").write_text(json.dumps(
        {"notebook": "05 · Z", "profile": "smoke", "seeds": [0], "hardware": "CPU", "date": "2026-01-01",
         "claims": [{"claim": "c", "measured": "[np.float64(0.031), np.int64(2)]", "verdict": "mixed",
                     "evidence": "np.float64(0.5)"}], "tables": {}, "figures": [], "numbers": {}}))
    report = write_report(tmp_path).read_text()
    assert "per seed: [-0.105, -0.103]" in report and "[0.031, 2]" in report
    assert not [line for line in report.splitlines() if "np.float" in line or "np.int" in line]


def test_the_hardware_line_states_the_threads_the_runs_used(tmp_path):
    import torch
    runs = [{"config": {"threads": 1}}, {"config": {"threads": 1}}]
    hw = json.loads(write_summary(tmp_path / "a", "A", profile="smoke", seeds=[0], claims=[], runs=runs)
                    .read_text())["hardware"]
    if not torch.cuda.is_available():
        assert hw.endswith("runs used 1 thread(s) each")
        # negative control: without records the line says whose threads it counts
        own = json.loads(write_summary(tmp_path / "b", "B", profile="smoke", seeds=[0], claims=[]).read_text())
        assert own["hardware"].endswith(f"{torch.get_num_threads()} thread(s) in the notebook process")
        given = json.loads(write_summary(tmp_path / "c", "C", profile="smoke", seeds=[0], claims=[], threads=2)
                           .read_text())
        assert given["hardware"].endswith(", 2 thread(s)")


def test_the_report_counts_its_claims_for_multiplicity(tmp_path):
    from epi.analysis.report import multiplicity_note
    tight = {"effect": 0.2, "interval": [0.15, 0.25], "minimum": 0.0, "tolerance": 0.0, "rule": "bootstrap"}
    barely = {"effect": 0.02, "interval": [0.001, 0.04], "minimum": 0.0, "tolerance": 0.0, "rule": "bootstrap"}
    claims = [claim("exact", "max drift 0", "supported"),
              claim("big", "…", "supported", decision=tight), claim("small", "…", "supported", decision=barely),
              claim("none", "…", "mixed", decision=dict(barely, effect=0.0, interval=[-0.02, 0.02]))]
    note = multiplicity_note(claims)
    assert note.startswith("This report makes 4 claim(s). 3 of them compare two arms")
    assert "the other 1 are direct checks" in note and "among 3 such claims about 0.15 wrong verdicts" in note
    assert "1 of the 2 supported claim(s) stay supported: big." in note    # the barely-supported one does not
    write_summary(tmp_path / "01_x", "01 · X", profile="smoke", seeds=[0], claims=claims)
    report = write_report(tmp_path).read_text()
    assert "### How many claims (multiplicity)" in report and "This report makes 4 claim(s)" in report


def test_a_report_lists_the_claims_whose_verdict_differs_from_a_reference_run(tmp_path):
    for folder, verdicts in (("quick", ("supported", "mixed")), ("full", ("supported", "not supported"))):
        write_summary(tmp_path / folder / "05_x", "05 · X", profile="cpu", seeds=[0],
                      claims=[claim("A forgets less", "m", verdicts[0]), claim("B learns as well", "m", verdicts[1])])
    write_summary(tmp_path / "full" / "06_y", "06 · Y", profile="cpu", seeds=[0],
                  claims=[claim("ratio matters", "m", "mixed")])          # a notebook the quick run left out
    text = write_report(tmp_path / "quick", reference=tmp_path / "full").read_text()
    assert "| 05 · X | B learns as well | mixed (1 seed) | not supported (1 seed) |" in text
    assert "A forgets less |" not in text.split("## Against")[1].split("## 05")[0]   # same verdict: not listed
    assert "06 · Y" not in text and "1 of 2 claim(s)" in text
    same = write_report(tmp_path / "full", reference=tmp_path / "full").read_text()
    assert "Every claim has the same verdict in both runs." in same

"""`make reproduce`'s tiers: every parameter a tier passes is one its notebook declares, the cpu default is the
quick tier, and the committed experiments the quick tier reads (X1's claims, X3's results) are found and matched."""
import math

import pandas as pd
import pytest

from epi import reproduce
from epi.experiments import x1, x3
from epi.nb import repo_root


def test_every_tier_parameter_is_a_parameter_of_its_notebook():
    papermill = pytest.importorskip("papermill")
    for tier, plan in reproduce.TIERS.items():
        for prefix, params in plan.items():
            declared = papermill.inspect_notebook(str(reproduce.notebook(prefix)))
            assert set(params) <= set(declared), (tier, prefix, sorted(set(params) - set(declared)))
            for name, value in params.items():   # papermill passes them through as the declared type
                assert declared[name]["inferred_type_name"] == type(value).__name__, (tier, prefix, name)


def test_cpu_reproduces_at_the_quick_tier_and_other_profiles_at_their_own_defaults():
    assert reproduce.default_tier("cpu") == "quick"
    assert reproduce.default_tier("smoke") == "full" and reproduce.TIERS["full"] == {}
    with pytest.raises(ValueError, match="tier must be one of"):
        reproduce.main(tier="medium")


def test_x1_committed_claim_is_the_csv_row_and_absent_pairs_are_none(tmp_path):
    rows = pd.read_csv(repo_root() / "results" / "x1" / "claims.csv")
    row = rows[(rows.method == "epi_per_task") & (rows.baseline == "random_per_task")].iloc[0]
    c = x1.committed_claim("EPI (per-task) beats random per-task sets", "epi_per_task", "random_per_task")
    d = c["decision"]
    assert c["verdict"] == row.verdict and d["n_seeds"] == row.seeds == 8 and d["n_prompts"] == row.prompts_per_task
    assert math.isclose(d["effect"], row.effect) and [round(v, 12) for v in d["interval"]] == \
        [round(row.low, 12), round(row.high, 12)]
    assert c["claim"] == "EPI (per-task) beats random per-task sets" and "results/x1" in c["measured"]
    assert x1.committed_claim("t", "epi_per_task", "static") is None       # X1 never ran static
    assert x1.committed_claim("t", "epi_per_task", "random", results=tmp_path) is None


def test_x3_committed_results_match_only_their_own_profile_seed_and_design(tmp_path):
    res = x3.committed("cpu", 0)
    assert res is not None and res.summary["profile"] == "cpu" and res.out == repo_root() / "results" / "x3"
    assert x3.committed("cpu", 1) is None and x3.committed("smoke", 0) is None
    assert x3.committed("cpu", 0, folder=tmp_path) is None

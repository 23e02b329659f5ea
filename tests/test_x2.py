"""X2's design (epi.experiments.x2): five arms × four seeds × both orders with isolation from the stage boundary;
in a real sequential run every isolating arm trains stage A exactly as full SFT does and installs its first mask at
the boundary (HFT only with hft_from_stage=1); the claims it decides on synthetic sequential records."""
import math

import numpy as np
import pytest
from helpers import one_thread  # noqa: F401  (autouse: one thread per test)
from test_evidence import seq_record

from epi.experiments import x2
from epi.experiments.profiles import NEVER_REFRESH, resolve
from epi.experiments.runner import run_experiment

STAGE = 6  # steps per task of the tiny runs below


def test_design_has_five_arms_at_four_seeds_in_both_orders_with_isolation_from_the_boundary():
    cs = x2.configs()
    assert len(cs) == 5 * 4 * 2
    assert len({c.run_name for c in cs}) == len(cs)                        # no two runs share a folder
    assert {c.seed for c in cs} == {0, 1, 2, 3}
    assert {tuple(c.tasks) for c in cs} == {("code", "math"), ("math", "code")}
    assert {c.arm for c in cs} == {"full_sft", "epi", "epi@refresh_every=0", "random_global",
                                   "hft@hft_from_stage=1"}
    real = resolve("real_cpu")
    for c in cs:
        assert c.protocol == "sequential" and c.model == "smollm2-135m" and c.general_eval
        assert c.warmup_steps == c.steps_per_task == real.steps_per_task      # warm-up = stage A's length
        assert c.eval_records >= 96 and c.lr == real.lr and c.batch_size == real.batch_size
    static = [c for c in cs if c.arm == "epi@refresh_every=0"]
    assert static and all(c.refresh_every == NEVER_REFRESH and c.epi_config().refresh_every is None for c in static)
    assert all(c.refresh_every == real.refresh_every > 0 for c in cs if c.arm == "epi")
    assert x2.configs(seeds=[0, 1, 2, 3, 4], eval_records=128)[0].eval_records == 128


def test_hft_from_stage_is_validated_and_is_an_arm_of_its_own():
    hft = resolve("real_cpu", method="hft", hft_from_stage=1)
    assert hft.arm == "hft@hft_from_stage=1" and hft.run_name.endswith("-hft-from1-s0")
    assert resolve("real_cpu", method="hft").arm == "hft"                    # the default is no arm
    assert resolve("real_cpu", method="epi", hft_from_stage=1).arm == "epi"  # a setting of HFT only
    with pytest.raises(ValueError, match="hft_from_stage"):
        resolve("smoke", method="hft", protocol="mix", hft_from_stage=1)     # a mix has one stage
    with pytest.raises(ValueError, match="hft_from_stage"):
        resolve("real_cpu", method="hft", hft_from_stage=2)                  # stages 0 and 1 only
    with pytest.raises(ValueError, match="hft_from_stage must be an int >= 0"):
        resolve("real_cpu", method="hft", hft_from_stage=-1)


def _tiny(method, **arm):
    settings = dict(steps_per_task=STAGE, warmup_steps=STAGE, refresh_every=2, eval_records=4, eval_every=0)
    return resolve("smoke", method=method, protocol="sequential", tasks=["math", "code"], seed=0,
                   **{**settings, **arm})


def test_every_arm_learns_stage_a_as_full_sft_does_and_isolates_from_the_boundary_only(tmp_path, monkeypatch):
    monkeypatch.setenv("EPI_CACHE", str(tmp_path / "cache"))
    runs = {name: run_experiment(_tiny(m, **arm), tmp_path)
            for name, m, arm in (("full_sft", "full_sft", {}), ("epi", "epi", {}),
                                 ("static", "epi", {"refresh_every": NEVER_REFRESH}),
                                 ("random", "random_global", {}), ("hft", "hft", {"hft_from_stage": 1}))}
    full = runs["full_sft"]
    for name, rec in runs.items():
        # stage A: the same losses step for step and the same scores after it — nothing was isolated
        assert rec["losses"][:STAGE] == full["losses"][:STAGE], name
        assert rec["stage_scores"][0] == full["stage_scores"][0], name
        if name != "full_sft":  # stage B: isolation changed the training
            assert rec["losses"][STAGE:] != full["losses"][STAGE:], name
    # the protected share is logged after each step that leaves a mask in force: from the last step of A (the
    # boundary) for the engine's schedule, from B's first step for HFT, whose half comes at the stage start
    for name in ("epi", "static", "random"):
        pf = runs[name]["protected_fraction"]
        assert len(pf) == STAGE + 1 and all(abs(s - 0.1) < 0.02 for s in pf), name
    assert len(runs["hft"]["protected_fraction"]) == STAGE
    assert all(abs(s - 0.5) < 0.1 for s in runs["hft"]["protected_fraction"])
    assert [d["step"] for d in runs["epi"]["drift"]] == [STAGE, STAGE + 2, STAGE + 4, 2 * STAGE]  # refreshed every T
    assert [d["step"] for d in runs["static"]["drift"]] == [STAGE]                              # frozen at the boundary
    assert runs["random"]["random_control"]["draw_steps"] == [STAGE]
    assert [d["draw"] for d in runs["hft"]["hft"]["draws"]] == ["stage1"] and runs["hft"]["hft"]["from_stage"] == 1
    # negative controls: the default HFT freezes a half in stage A, and EPI's usual short warm-up isolates in A
    hft0 = run_experiment(_tiny("hft"), tmp_path)
    early = run_experiment(_tiny("epi", warmup_steps=2), tmp_path / "early")
    for rec in (hft0, early):
        assert rec["losses"][:STAGE] != full["losses"][:STAGE]
    assert [d["draw"] for d in hft0["hft"]["draws"]] == ["stage0", "stage1"]
    assert len(hft0["protected_fraction"]) == 2 * STAGE
    # A after A was evaluated once for the five arms (the score cache is keyed by the weights); the two negative
    # controls trained other weights in A, so each added its own entry; the last stage is never cached
    stage_cache = tmp_path / "cache" / "stage_scores"
    assert len(list(stage_cache.glob("*.json"))) == 3
    # and a cached entry equals a fresh evaluation of the same weights
    for entry in stage_cache.glob("*.json"):
        entry.unlink()
    fresh = run_experiment(_tiny("epi"), tmp_path / "fresh")
    assert fresh["stage_scores"][0] == full["stage_scores"][0] and fresh["losses"] == runs["epi"]["losses"]


def _design_records(epi_keeps, n=96, seeds=range(4)):
    """Return sequential records of every X2 arm at each seed in both orders; A after A is the same for every
    arm (A is learned identically) and EPI keeps `epi_keeps` of it, every other arm 0.5 of it."""
    out = []
    labels = x2.labels()
    for s in seeds:
        rng = np.random.default_rng(s)
        for order in (("code", "math"), ("math", "code")):
            a_after_a = (rng.random(n) < 0.8).astype(float)
            b_after_a = (rng.random(n) < 0.1).astype(float)
            b_after_b = (rng.random(n) < 0.7).astype(float)
            keep = rng.random(n)
            for short, arm in labels.items():
                share = epi_keeps if short == "epi" else 0.5
                a_after_b = np.where(keep < share, a_after_a, 0.0)
                rec = seq_record(arm, s, order, a_after_a, a_after_b, b_after_a, b_after_b)
                rec["arm"] = arm
                rec["base_scores"] = {order[0]: {"score": 0.0, "n": n}, order[1]: {"score": 0.1, "n": n}}
                end = {"general_loss": 2.1, "kl": 0.2} if short == "epi" else {"general_loss": 2.4, "kl": 0.8}
                rec["general"] = [{"general_loss": 2.0, "kl": 0.0}, end]
                out.append(rec)
    return out


def test_claims_follow_retention_and_learning_and_say_what_the_design_could_detect():
    claims = x2.decide_claims(_design_records(epi_keeps=0.9))
    by = {(c["measure"], c["baseline"]): c for c in claims}
    primary = [c for c in claims if c["primary"]]
    assert len(primary) == 4 and {c["measure"] for c in primary} == {"retention_A"}
    assert {c["baseline"] for c in primary} == {"epi@refresh_every=0", "random_global", "full_sft",
                                                "hft@hft_from_stage=1"}
    for c in primary:
        assert c["verdict"] == "supported" and c["decision"]["n_seeds"] == 4
        assert c["decision"]["effect"] == pytest.approx(0.4, abs=0.1)
        assert 0 < c["detectable"] < c["decision"]["effect"]
    assert by[("forgetting_A", "full_sft")]["verdict"] == "supported"
    learning = by[("learning_B", "full_sft")]    # the same B scores in every arm: non-inferior within 0.05
    assert learning["verdict"] == "supported" and learning["decision"]["effect"] == 0.0
    assert by[("general_loss_increase", "full_sft")]["verdict"] == "supported"
    assert by[("kl", "full_sft")]["verdict"] == "supported"
    frame = x2.claims_frame(claims)
    assert len(frame) == len(x2.claims_spec()) and frame["seeds"].eq(4).all()


def test_no_difference_is_not_supported_and_a_missing_arm_is_not_measured():
    same = x2.decide_claims(_design_records(epi_keeps=0.5))              # negative control: EPI keeps as much
    primary = [c for c in same if c["primary"]]
    assert all(c["verdict"] != "supported" for c in primary)
    assert all(abs(c["decision"]["effect"]) < x2.RETENTION_MINIMUM for c in primary)
    no_hft = [r for r in _design_records(epi_keeps=0.9) if r["arm"] != "hft@hft_from_stage=1"]
    claims = x2.decide_claims(no_hft)
    assert all(c["verdict"] == "not measured" and math.isnan(c["detectable"])
               for c in claims if c["baseline"] == "hft@hft_from_stage=1")


def test_select_keeps_the_designs_runs_only():
    recs = _design_records(epi_keeps=0.9, seeds=[0])
    for r in recs:
        r["config"].update(profile="real_cpu", warmup_steps=24, steps_per_task=24, eval_records=96)
    short_warmup = dict(recs[1], config={**recs[1]["config"], "warmup_steps": 4})
    few_prompts = dict(recs[1], config={**recs[1]["config"], "eval_records": 32})
    other_arm = dict(recs[1], arm="epi_per_task", config={**recs[1]["config"], "method": "epi_per_task"})
    assert x2.select(recs + [short_warmup, few_prompts, other_arm]) == recs


def test_analyse_writes_the_results_folder(tmp_path):
    import json
    runs = tmp_path / "runs"
    for r in _design_records(epi_keeps=0.9):
        r["config"].update(profile="real_cpu", warmup_steps=24, steps_per_task=24, eval_records=96)
        a, b = r["config"]["tasks"]
        r["wall_s"] = 100.0
        folder = runs / f"{r['arm']}-{a}-{b}-s{r['seed']}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(r))
    parts = [{"wall_s": 600.0, "runs": 30, "workers": 2, "date": "d1"}, {"wall_s": 300.0, "runs": 10, "workers": 2,
                                                                          "date": "d2"}]
    (runs / "grid_time.json").write_text(json.dumps({"invocations": parts}))  # a grid run in two parts
    out = tmp_path / "x2"
    claims = x2.analyse(runs, out)
    assert {p.name for p in out.iterdir()} >= {"summary.csv", "summary.md", "claims.md", "claims.csv", "README.md",
                                               "figures"}
    assert (out / "figures" / "x2_effects.png").is_file()
    text = (out / "claims.md").read_text()
    assert "retains more of A" in text and "supported" in text
    readme = (out / "README.md").read_text()
    assert "python -m epi.experiments.x2 run" in readme and "40 runs" in readme and "warmup_steps 24" in readme
    assert "2 invocation(s) of `run` taking 15.0 min wall in all" in readme
    assert len(claims) == len(x2.claims_spec())

"""CPI-FT: its pieces (core regions, Jaccard grouping, SLERP with its counted linear fallback, transplant fusion)
and the `static` method as the paper describes it (1 % cores, τ against chance, a brief Stage 4, fusion over every
changed tensor, the fused model evaluated)."""
import math
from collections import Counter

import pytest
import torch

from helpers import interrupt_at_stage_end
from epi.analysis.drift import random_jaccard
from epi.experiments.profiles import resolve
from epi.experiments.run import Run, differing_settings, load_start
from epi.experiments.runner import run_experiment
from epi.methods import cpift


def test_core_regions_are_the_global_top_p_of_update_magnitude():
    deltas = {"a": [torch.tensor([[0.0, -5.0], [1.0, 0.1]]), torch.tensor([4.0, -0.2, 0.0, 3.0])]}
    cores = cpift.core_regions(deltas, ratio=3 / 8)
    assert cores["a"][0].tolist() == [[False, True], [False, False]]
    assert cores["a"][1].tolist() == [True, False, False, True]


def test_grouping_is_connected_components_at_tau():
    names = ["a", "b", "c", "d"]
    s = [[1, 0.3, 0.0, 0.0], [0.3, 1, 0.12, 0.0], [0.0, 0.12, 1, 0.05], [0.0, 0.0, 0.05, 1]]
    assert cpift.group_tasks(names, s, 0.1) == [["a", "b", "c"], ["d"]]  # a–b–c chain, d alone
    assert cpift.group_tasks(names, s, 0.2) == [["a", "b"], ["c"], ["d"]]
    assert cpift.group_tasks(names, s, 1.1) == [["a"], ["b"], ["c"], ["d"]]  # no grouping


def test_core_similarity_is_the_jaccard_index_of_the_cores():
    cores = {"a": [torch.tensor([True, True, False, False])], "b": [torch.tensor([False, True, True, False])]}
    assert cpift.core_similarity(cores) == [[1.0, 1 / 3], [1 / 3, 1.0]]


def test_slerp_follows_the_great_circle_and_falls_back_to_lerp():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = cpift.slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))  # unit norm kept, unlike lerp
    assert torch.allclose(cpift.slerp(a, b, 0.0), a) and torch.allclose(cpift.slerp(a, b, 1.0), b)
    c = torch.tensor([2.0, 0.0])  # collinear with a: linear fallback
    assert torch.allclose(cpift.slerp(a, c, 0.25), torch.tensor([1.25, 0.0]))


def test_fuse_transplants_cores_and_slerps_the_rest():
    base = [torch.tensor([1.0, 1.0, 1.0, 1.0])]
    probes = {"a": [torch.tensor([5.0, 1.0, 1.0, 2.0])], "b": [torch.tensor([1.0, -3.0, 1.0, 1.5])]}
    cores = {"a": [torch.tensor([True, False, False, True])], "b": [torch.tensor([False, True, False, True])]}
    fused = cpift.fuse(base, probes, cores, weight=0.5)[0]
    assert fused[0] == 5.0 and fused[1] == -3.0  # each task's core from its own probe
    assert fused[3] == 2.0  # overlap: the larger |Δθ| (a: 1.0 vs b: 0.5) wins
    mean = cpift.slerp(probes["a"][0], probes["b"][0], 0.5)
    expected = cpift.slerp(base[0], mean, 0.5)
    assert fused[2] == pytest.approx(float(expected[2]))  # non-core coordinate: SLERP result


# ---- CPI-FT as the paper describes it: defaults, τ against chance, brief Stage 4, fusion scope, fallbacks ----

TINY = dict(tasks=["math", "instruction", "chat"], steps_per_task=10, eval_records=4, eval_every=0)


def test_defaults_are_the_papers_core_share_and_tau_with_a_brief_stage_4_over_every_changed_tensor():
    cfg = resolve("cpu", method="static")
    assert (cfg.core_ratio, cfg.group_tau, cfg.tau_mode) == (0.01, 0.1, "absolute")
    assert (cfg.stage4, cfg.stage4_fraction, cfg.fusion_scope) == ("groups", 0.1, "changed")
    assert cfg.ratio == 0.1  # the other isolating methods keep their shared ratio
    # the paper's τ = 0.1 at p = 1 % is about 20× chance; at p = 10 % it is under 2× chance
    assert cpift.chance_jaccard(0.01) == pytest.approx(random_jaccard(0.01))
    assert 0.1 / cpift.chance_jaccard(0.01) == pytest.approx(19.9) and 0.1 / cpift.chance_jaccard(0.1) < 2


def test_tau_relative_to_chance_groups_as_a_multiple_of_p_over_2_minus_p():
    p = 0.01
    chance = cpift.chance_jaccard(p)  # 0.005025
    names = ["a", "b", "c", "d"]
    s = [[1.0, 2.4 * chance, 0.0, 0.0],      # a–b at 2.4× chance
         [2.4 * chance, 1.0, 1.6 * chance, 0.0],  # b–c at 1.6× chance
         [0.0, 1.6 * chance, 1.0, 0.8 * chance],  # c–d below chance
         [0.0, 0.0, 0.8 * chance, 1.0]]
    at = {m: cpift.grouping_threshold(m, "chance", p) for m in (1.0, 1.5, 2.0, 3.0)}
    assert at[2.0] == pytest.approx(2 * chance)
    assert cpift.group_tasks(names, s, at[3.0]) == [["a"], ["b"], ["c"], ["d"]]
    assert cpift.group_tasks(names, s, at[2.0]) == [["a", "b"], ["c"], ["d"]]
    assert cpift.group_tasks(names, s, at[1.5]) == [["a", "b", "c"], ["d"]]  # chains through b
    assert cpift.group_tasks(names, s, at[1.0]) == [["a", "b", "c"], ["d"]]  # d is below chance: stays alone
    # negative control: the same multiples read as absolute Jaccards merge nothing
    assert cpift.grouping_threshold(0.1, "absolute", p) == 0.1
    assert cpift.group_tasks(names, s, cpift.grouping_threshold(0.1, "absolute", p)) == [[n] for n in names]
    with pytest.raises(ValueError, match="tau_mode must be one of"):
        cpift.grouping_threshold(2.0, "relative", p)


def test_bad_cpift_settings_fail_with_the_field_and_what_it_allows():
    with pytest.raises(ValueError, match=r"core_ratio must be in \(0, 1\)"):
        resolve("smoke", method="static", core_ratio=0.0)
    with pytest.raises(ValueError, match=r"stage4_fraction must be in \(0, 1\]"):
        resolve("smoke", method="static", stage4_fraction=1.5)
    with pytest.raises(ValueError, match="stage4 must be one of 'groups', 'mixed'"):
        resolve("smoke", method="static", stage4="single")
    with pytest.raises(ValueError, match="fusion_scope must be one of 'changed', 'isolatable'"):
        resolve("smoke", method="static", fusion_scope="all")
    with pytest.raises(ValueError, match="tau_mode must be one of 'absolute', 'chance'"):
        resolve("smoke", method="static", tau_mode="relative")
    with pytest.raises(ValueError, match=r"group_tau must be in \[0, 1\] with tau_mode='absolute'"):
        resolve("smoke", method="static", group_tau=2.0)
    # chance mode: the default 0.1 would be a tenth of chance; a multiple beyond 1 / chance is unreachable
    with pytest.raises(ValueError, match=r"group_tau must be >= 1 with tau_mode='chance'"):
        resolve("smoke", method="static", tau_mode="chance")
    with pytest.raises(ValueError, match="exceeds 1, a Jaccard no two tasks can reach"):
        resolve("smoke", method="static", tau_mode="chance", group_tau=500.0)
    assert resolve("smoke", method="static", tau_mode="chance", group_tau=2.0).group_tau == 2.0


def test_slerp_fallbacks_of_a_short_probe_are_counted_with_their_reason():
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(8, 8, generator=g), torch.randn(16, generator=g), torch.zeros(4)]
    # a short probe: tensor 0 moves by a tiny angle (collinear), tensor 1 by a large one, tensor 2 from zero
    probes = {t: [base[0] + 1e-4 * torch.randn(8, 8, generator=g), base[1] + torch.randn(16, generator=g),
                  base[2] + 0.1 * torch.randn(4, generator=g)] for t in ("a", "b")}
    cores = {t: [torch.zeros_like(b, dtype=torch.bool) for b in base] for t in probes}
    fused, report = cpift.fuse_and_count(base, probes, cores, weight=0.5, names=["w", "v", "z"])
    assert report["tensors"] == 3 and report["interpolations"] == 6  # per tensor: one mean step, one base step
    assert report["fallbacks"] == {"w": "collinear", "z": "zero norm"} and report["tensors_linear"] == 2
    # the two probes of "w" are collinear too; those of "z" are not (independent noise from zero)
    assert report["reasons"] == {"collinear": 2, "zero norm": 1} and report["linear"] == 3
    assert report["angle_deg"]["max"] > 10 and report["fallback_below_deg"] == pytest.approx(0.81, abs=0.01)
    mean_w = torch.lerp(probes["a"][0], probes["b"][0], 0.5)
    assert torch.equal(fused[0], torch.lerp(base[0], mean_w, 0.5))  # what a fallback computes: the chord
    mean_v = cpift.slerp(probes["a"][1], probes["b"][1], 0.5)
    spherical = cpift.slerp(base[1], mean_v, 0.5)
    assert torch.allclose(fused[1], spherical) and not torch.allclose(fused[1], torch.lerp(base[1], mean_v, 0.5))
    assert cpift.fuse(base, probes, cores, 0.5)[1].equal(fused[1])  # fuse = fuse_and_count without the report


def built(tmp_path, **settings) -> Run:
    """Return a static Run after build(): probes, cores, grouping, fusion and the fused evaluation done."""
    run = Run(resolve("smoke", method="static", seed=0, **{**TINY, **settings}), tmp_path)
    run.build()
    run.schedule_steps()
    return run


def test_fusion_over_changed_tensors_moves_norms_and_embeddings_and_isolatable_scope_leaves_them(tmp_path):
    start, _, _ = load_start(resolve("smoke", method="static", seed=0, **TINY))
    theta0 = dict(start.named_parameters())
    for scope in ("changed", "isolatable"):
        run = built(tmp_path / scope, fusion_scope=scope)
        moved = {n: not torch.equal(p.detach(), theta0[n]) for n, p in run.model.named_parameters()}
        norms = [n for n in moved if "norm" in n]
        blocks = set(run.engine.names)
        assert norms and all(moved[n] for n in blocks)  # the block matrices are fused in both scopes
        fusion = run.method.fusion
        if scope == "changed":
            assert all(moved[n] for n in norms) and moved["model.embed_tokens.weight"]
            assert fusion["tensors"] == len(moved) and fusion["tensors_outside_cores"] == len(moved) - len(blocks)
        else:  # negative control: norms and embeddings stay at θ₀
            assert not any(moved[n] for n in norms) and not moved["model.embed_tokens.weight"]
            assert fusion["tensors"] == len(blocks) and fusion["tensors_outside_cores"] == 0


def test_the_fused_model_is_evaluated_before_stage_4_in_the_records_format(tmp_path):
    run = built(tmp_path)
    fused = run.method.fused_scores
    assert set(fused) == set(run.base_eval) and all(set(fused[t]) == set(run.base_eval[t]) for t in fused)
    assert all("per_prompt" in fused[t] for t in fused)
    assert run.evaluate() == fused  # it is this model's evaluation, taken before any Stage-4 step
    assert run.method.record_extra()["cpift"]["fused_scores"] is fused


def test_stage_4_is_brief_one_stage_per_group_each_on_a_balanced_mix_of_its_tasks(tmp_path):
    run = built(tmp_path, stage4_fraction=0.2)  # 0.2 × 10 = 2 steps per task
    groups = run.method.groups
    assert run.stage_list == groups and sorted(t for g in groups for t in g) == sorted(TINY["tasks"])
    assert len(run.schedule) == 2 * len(TINY["tasks"])  # a fifth of full SFT's 3 × 10 steps
    for (lo, hi), group in zip(run.bounds, groups):
        assert Counter(run.schedule[lo:hi]) == {t: 2 for t in group}
    assert run.method.record_extra()["cpift"]["stage4"] == {"mode": "groups", "fraction": 0.2, "steps_per_task": 2,
                                                            "steps": 6}


def test_stage_4_mixed_is_one_brief_stage_on_all_tasks_with_every_core_frozen(tmp_path):
    rec = run_experiment(resolve("smoke", method="static", seed=0, stage4="mixed", stage4_fraction=0.3, **TINY),
                         tmp_path)
    assert rec["stages"] == [TINY["tasks"]]
    assert Counter(rec["loss_tasks"]) == {t: 3 for t in TINY["tasks"]}  # 0.3 × 10 steps per task, balanced
    # every task's core frozen from the first step: the union of three 1 % cores
    assert all(0.01 <= f <= 0.03 + 1e-3 for f in rec["protected_fraction"])
    assert rec["cpift"]["fused_scores"] is not None and rec["cpift"]["fusion"]["scope"] == "changed"
    assert rec["arm"] == "static@stage4=mixed,stage4_fraction=0.3"  # its own arm and folder
    # negative control: the paper's grouped Stage 4 freezes nothing while its first group trains
    grouped = run_experiment(resolve("smoke", method="static", seed=0, stage4_fraction=0.3, **TINY), tmp_path)
    assert grouped["protected_fraction"][0] == 0.0 and rec["protected_fraction"][0] > 0.0


def test_forgetting_and_sequential_keep_the_protocol_budget_and_fuse_nothing(tmp_path):
    cfg = resolve("smoke", method="static", seed=0, protocol="sequential", tasks=["math", "chat"],
                  steps_per_task=4, eval_records=4, eval_every=0)
    rec = run_experiment(cfg, tmp_path)
    assert len(rec["losses"]) == 8 and rec["stages"] == [["math"], ["chat"]]
    assert rec["cpift"]["fusion"] is None and rec["cpift"]["fused_scores"] is None and rec["cpift"]["stage4"] is None


def test_a_static_record_from_before_cpifts_settings_is_not_taken_for_a_run_under_the_new_defaults():
    old = resolve("smoke", method="static", seed=0).to_dict()
    for name in ("core_ratio", "tau_mode", "stage4", "stage4_fraction", "fusion_scope"):
        del old[name]  # a record written before these settings existed (cores at `ratio`, full-length Stage 4)
    differ = differing_settings(old, resolve("smoke", method="static", seed=0))
    assert "core_ratio=0.1 vs 0.01" in differ and "stage4_fraction=1.0 vs 0.1" in differ
    assert "fusion_scope='isolatable' vs 'changed'" in differ
    legacy = resolve("smoke", method="static", seed=0, core_ratio=0.1, stage4_fraction=1.0, fusion_scope="isolatable")
    assert differing_settings(old, legacy) == ""  # the old behaviour, asked for by its settings
    # negative control: other methods' old records never ran CPI-FT, so the new settings' defaults apply
    plain = resolve("smoke", method="full_sft", seed=0).to_dict()
    for name in ("core_ratio", "stage4_fraction", "fusion_scope"):
        del plain[name]
    assert differing_settings(plain, resolve("smoke", method="full_sft", seed=0)) == ""


def test_an_interrupted_static_run_resumes_without_probing_again_and_ends_identically(tmp_path, monkeypatch):
    cfg = resolve("smoke", method="static", seed=0, stage4_fraction=0.5, checkpoint_every=3, **TINY)
    full = run_experiment(cfg, tmp_path / "a")

    interrupt_at_stage_end(cfg, tmp_path / "b", "stage 1/")
    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed static run probed again")
    monkeypatch.setattr("epi.experiments.run.probe_fine_tunes", no_probe)
    resumed = run_experiment(cfg, tmp_path / "b")
    assert resumed["losses"] == full["losses"] and resumed["final_scores"] == full["final_scores"]
    assert resumed["cpift"] == full["cpift"]  # fusion report and fused scores kept from before the interruption

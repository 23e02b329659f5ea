"""The controls that match: per-task random sets (union sized to epi_per_task's realised share), a global random
set at EPI's share, each fixed or re-drawn on EPI's schedule; HFT (a random half frozen per stage/round); and
learning-rate arms (their own folder, their own method label)."""
import json
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch

from helpers import interrupt_at_stage_end
from epi.engine.config import EPIConfig
from epi.engine.core import EvolvingIsolation
from epi.experiments.collect import compare
from epi.experiments.profiles import resolve
from epi.experiments.runner import run_experiment
from epi.methods.base import MethodContext, RunRefused
from epi.methods.hft import HFT, categories, half_masks
from epi.methods.random_mask import (RandomGlobal, RandomMask, RandomPerTask, draw_generator,
                                     per_task_random_sets)
from epi.methods.registry import METHODS
from epi.models.shapes import small_llama

TASKS = ["math", "code", "logic"]
TINY = dict(tasks=["math", "code"], steps_per_task=4, eval_records=2, eval_every=2)


def flat(masks):
    return torch.cat([m.reshape(-1) for m in masks])


def union_of_others(sets, task):
    out = torch.zeros_like(flat(next(iter(sets.values()))))
    for other, masks in sets.items():
        if other != task:
            out |= flat(masks)
    return out


def engine_context(method, tmp_path, stage_list, **settings):
    """Return (ctx, engine) as the runner builds them, on a small Llama (no data: the hooks only install masks)."""
    cfg = resolve("smoke", method=method.name, seed=0, **settings)
    model = small_llama()
    given = dict(config=cfg, model=model, batchers={}, base_scores={}, out=tmp_path / cfg.run_name)
    unused = {f.name: None for f in fields(MethodContext)  # the runner's helpers (probes, evaluation): not called here
              if f.default is MISSING and f.default_factory is MISSING and f.name not in given}
    ctx = MethodContext(**given, **unused)
    ctx.engine = EvolvingIsolation(model, method.engine_config(ctx))
    method.prepare(ctx)
    ctx.stage_list = stage_list
    return ctx, ctx.engine


def digests_over_steps(method, ctx, steps):
    """Return the engine's mask digest after each step 1..steps (None while nothing is installed)."""
    out = []
    for n in range(1, steps + 1):
        method.after_step(n)
        out.append(ctx.engine.mask_digest() if ctx.engine.sets else None)
    return out


# ---- per-task random sets ------------------------------------------------------------------------------
@pytest.mark.parametrize("tasks", [["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d", "e"]])
@pytest.mark.parametrize("share", [0.05, 0.23, 0.5])
def test_per_task_random_unions_cover_the_target_share_exactly_for_every_task(tasks, share):
    shapes = [torch.Size([40, 30]), torch.Size([30]), torch.Size([7, 11, 3])]
    n = sum(s.numel() for s in shapes)
    sets = per_task_random_sets(shapes, tasks, share, draw_generator("t", 0, 0))
    assert [m.shape for m in sets["a"]] == shapes
    q = 1 - (1 - share) ** (1 / (len(tasks) - 1))
    for t in tasks:
        assert int(union_of_others(sets, t).sum()) == round(share * n)  # exact: the same for every task
        own_only = flat(sets[t]) & ~union_of_others(sets, t)
        assert own_only.any()  # coordinates the task holds alone stay trainable by it
        assert abs(float(flat(sets[t]).float().mean()) - q) < 0.02  # each set's density as if drawn independently
    # negative control: independent draws at that density miss the target by chance, the dealt counts do not
    g = torch.Generator().manual_seed(1)
    independent = {t: [torch.rand(s, generator=g) < q for s in shapes] for t in tasks}
    assert any(int(union_of_others(independent, t).sum()) != round(share * n) for t in tasks)


def test_per_task_random_sets_are_reproducible_per_draw_and_refuse_bad_inputs():
    shapes = [torch.Size([50, 20])]
    a = per_task_random_sets(shapes, ["x", "y"], 0.2, draw_generator("random_per_task", 0, 0))
    b = per_task_random_sets(shapes, ["x", "y"], 0.2, draw_generator("random_per_task", 0, 0))
    c = per_task_random_sets(shapes, ["x", "y"], 0.2, draw_generator("random_per_task", 0, 1))
    assert torch.equal(flat(a["x"]), flat(b["x"])) and not torch.equal(flat(a["x"]), flat(c["x"]))
    with pytest.raises(ValueError, match="at least two distinct tasks"):
        per_task_random_sets(shapes, ["x"], 0.2, draw_generator("t", 0, 0))
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\)"):
        per_task_random_sets(shapes, ["x", "y"], 1.0, draw_generator("t", 0, 0))


def test_each_task_trains_its_own_set_while_the_others_sets_stay_exact_under_adamw_with_weight_decay():
    model = small_llama()
    engine = EvolvingIsolation(model, EPIConfig(scope="per_task", refresh_every=None))
    sets = per_task_random_sets([p.shape for p in engine.params], TASKS, 0.3, draw_generator("t", 0, 0))
    engine.set_sets(sets)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine.attach(opt)
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(0))
    for step in range(6):
        task = TASKS[step % len(TASKS)]
        before = [p.detach().clone() for p in engine.params]
        model(input_ids=ids, labels=ids).loss.backward()
        engine.observe(task)
        opt.step()
        opt.zero_grad(set_to_none=True)
        moved = flat([(p.detach() != b) for p, b in zip(engine.params, before)])
        protected = union_of_others(sets, task)
        assert not (moved & protected).any()  # the other tasks' sets moved exactly 0.0
        assert (moved & flat(sets[task]) & ~protected).any()  # its own set trains on its own batches
        assert moved[~protected].float().mean() > 0.9  # and so does everything free
    # negative control: without the engine the same coordinates move
    plain = small_llama()
    before = [p.detach().clone() for p in plain.parameters()]
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    plain(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert any((p.detach() != b).any() for p, b in zip(plain.parameters(), before))


# ---- the schedule: first sets at warm-up end, re-drawn at EPI's refreshes only when asked --------------------
@pytest.mark.parametrize("refresh", [False, True])
def test_random_per_task_installs_at_warmup_end_and_redraws_at_refresh_steps_only_when_asked(tmp_path, refresh):
    method = RandomPerTask()
    ctx, engine = engine_context(method, tmp_path, [TASKS], tasks=TASKS, random_ratio=0.3, random_refresh=refresh,
                                 warmup_steps=3, refresh_every=5)
    method.stage_start(ctx, 0, TASKS)
    assert engine.state == "tracking" and not engine.sets  # warm-up: nothing protected, no refresh of its own
    digests = digests_over_steps(method, ctx, 18)
    assert digests[:2] == [None, None] and digests[2] is not None  # after step 3 = warmup_steps
    changes = [n for n in range(2, 19) if digests[n - 1] != digests[n - 2]]
    assert changes == ([3, 8, 13, 18] if refresh else [3])  # warmup + k·refresh_every, like EPI's refreshes
    assert method.record_extra()["random_control"] == {"share": 0.3, "refresh": refresh,
                                                       "draw_steps": [3, 8, 13, 18] if refresh else [3]}
    assert sorted(engine.sets) == sorted(TASKS)
    assert abs(engine.protected_fraction(None) - 0.3) < 1e-9 + 1 / sum(engine.numels)


def test_random_per_task_brings_a_tasks_set_into_force_with_its_stage(tmp_path):
    """Sequential A → B: in stage A only A's set exists (nothing protects A, as in epi_per_task); B is isolated by it."""
    method = RandomPerTask()
    ctx, engine = engine_context(method, tmp_path, [["math"], ["code"]], protocol="sequential",
                                 tasks=["math", "code"], random_ratio=0.2, warmup_steps=2)
    method.stage_start(ctx, 0, ["math"])
    digests_over_steps(method, ctx, 4)
    assert list(engine.sets) == ["math"] and engine.active("math").count == 0
    method.stage_start(ctx, 1, ["code"])
    assert sorted(engine.sets) == ["code", "math"]
    assert engine.active("code").count == int(flat(engine._bools(engine.sets["math"])).sum())
    assert abs(engine.active("code").count / sum(engine.numels) - 0.2) < 1e-3


def test_random_global_protects_ratio_and_redraws_on_epis_schedule(tmp_path):
    method = RandomGlobal()
    ctx, engine = engine_context(method, tmp_path, [TASKS], tasks=TASKS, ratio=0.1, random_refresh=True,
                                 warmup_steps=2, refresh_every=4)
    method.stage_start(ctx, 0, TASKS)
    digests = digests_over_steps(method, ctx, 10)
    assert [n for n in range(2, 11) if digests[n - 1] != digests[n - 2]] == [2, 6, 10]
    assert abs(engine.protected_fraction() - 0.1) < 1 / sum(engine.numels) + 1e-9
    fixed = RandomGlobal()  # negative control: without random_refresh the first set stays
    ctx, engine = engine_context(fixed, tmp_path, [TASKS], tasks=TASKS, warmup_steps=2, refresh_every=4)
    digests = digests_over_steps(fixed, ctx, 10)
    assert len({d for d in digests if d is not None}) == 1


def test_random_per_task_matches_epi_per_task_in_a_smoke_run_and_random_still_matches_by_count(tmp_path):
    runs = {}
    for method, extra in (("epi_per_task", {}), ("random_per_task", {}), ("random_per_task", {"random_refresh": True}),
                          ("random", {})):
        cfg = resolve("smoke", method=method, seed=0, **TINY, **extra)
        runs[cfg.run_name] = run_experiment(cfg, tmp_path)
    epi = runs["mix-epi_per_task-s0"]
    fixed, redrawn = runs["mix-random_per_task-s0"], runs["mix-random_per_task-redraw-s0"]
    target = sum(s for s in epi["protected_fraction"] if s > 0) / sum(1 for s in epi["protected_fraction"] if s > 0)
    for rec in (fixed, redrawn):
        assert rec["random_control"]["share"] == pytest.approx(target)
        assert rec["protected_fraction_mean"] == pytest.approx(target, abs=1e-4)  # union size: rounding only
        assert len(rec["protected_fraction"]) == len(epi["protected_fraction"])  # protects from the same step
    assert fixed["random_control"]["draw_steps"] == [3] and len(redrawn["random_control"]["draw_steps"]) > 1
    assert fixed["arm"] == "random_per_task" and redrawn["arm"] == "random_per_task@random_refresh=True"
    assert fixed["mask_digest"] != redrawn["mask_digest"]
    assert runs["mix-random-s0"]["protected_fraction_mean"] == pytest.approx(epi["protected_fraction_mean"], abs=1e-3)


def test_random_per_task_refuses_one_trained_task_and_a_missing_match(tmp_path):
    one = resolve("smoke", method="random_per_task", protocol="forgetting", tasks=["math", "code"],
                  train_tasks=["math"], random_ratio=0.2)
    with pytest.raises(RunRefused, match="at least two trained tasks"):
        RandomPerTask().check(one, tmp_path / one.run_name)
    cfg = resolve("smoke", method="random_per_task", seed=0, **TINY)
    with pytest.raises(RunRefused, match="random_ratio or a finished 'epi_per_task' run") as e:
        RandomPerTask().check(cfg, tmp_path / cfg.run_name)
    assert str(tmp_path / "mix-epi_per_task-s0" / "results.json") in str(e.value)
    (tmp_path / "mix-epi_per_task-s0").mkdir()
    (tmp_path / "mix-epi_per_task-s0" / "results.json").write_text(json.dumps(
        {"protected_fraction": [0.0, 0.0], "protected_fraction_mean": 0.0}))
    with pytest.raises(RunRefused, match="nothing to match; give random_ratio"):
        RandomPerTask().check(cfg, tmp_path / cfg.run_name)


# ---- HFT -------------------------------------------------------------------------------------------------
LLAMA = [f"model.layers.{i}.self_attn.{x}_proj.weight" for i in range(4) for x in "qkvo"] + \
        [f"model.layers.{i}.mlp.{x}_proj.weight" for i in range(4) for x in ("gate", "up", "down")]
SHAPES = [torch.Size([16, 16])] * 16 + [torch.Size([32, 16])] * 12


def test_hft_freezes_half_of_each_blocks_attention_and_ffn_matrices():
    masks = half_masks(LLAMA, SHAPES, "matrix", draw_generator("hft", 0, "stage0"))
    whole = [bool(m.all()) for m in masks]
    assert all(m.all() or not m.any() for m in masks)  # whole matrices
    groups = categories(LLAMA)
    assert sorted({kind for _, kind in groups}) == ["attention", "feed_forward"] and len(groups) == 8
    ffn_counts = []
    for (block, kind), idx in groups.items():
        frozen = sum(whole[i] for i in idx)
        if kind == "attention":
            assert frozen == 2  # 2 of q/k/v/o in every block
        else:
            ffn_counts.append(frozen)
    assert sorted(ffn_counts) == [1, 1, 2, 2]  # 1 or 2 of gate/up/down, alternating: half over the model
    assert sum(int(m.sum()) for m in masks) == sum(m.numel() for m in masks) // 2
    other = half_masks(LLAMA, SHAPES, "matrix", draw_generator("hft", 0, "stage1"))
    assert [bool(m.all()) for m in other] != whole  # a new round draws another half
    again = half_masks(LLAMA, SHAPES, "matrix", draw_generator("hft", 0, "stage0"))
    assert [bool(m.all()) for m in again] == whole  # the same draw is the same half (resume-safe)


def test_hft_element_unit_freezes_half_of_every_matrix():
    masks = half_masks(LLAMA, SHAPES, "element", draw_generator("hft", 0, "stage0"))
    assert all(int(m.sum()) == m.numel() // 2 for m in masks)
    assert not any(m.all() for m in masks)  # negative control: no matrix is frozen whole
    with pytest.raises(ValueError, match="hft_unit must be one of 'matrix', 'element'"):
        half_masks(LLAMA, SHAPES, "half", draw_generator("hft", 0, 0))


@pytest.mark.parametrize("round_", ["stage", "refresh"])
def test_hft_redraws_at_every_stage_and_every_round_when_asked(tmp_path, round_):
    method = HFT()
    ctx, engine = engine_context(method, tmp_path, [["math"], ["code"]], protocol="sequential",
                                 tasks=["math", "code"], hft_round=round_, refresh_every=4)
    assert bool(method.plugins(ctx)) == (round_ == "refresh")
    method.stage_start(ctx, 0, ["math"])
    first = engine.mask_digest()
    assert abs(engine.protected_fraction() - 0.5) < 0.01 and engine.state == "static"
    digests = digests_over_steps(method, ctx, 6) if method.plugins(ctx) else [first] * 6
    changes = [n for n in range(1, 7) if digests[n - 1] != (digests[n - 2] if n > 1 else first)]
    assert changes == ([4] if round_ == "refresh" else [])
    method.stage_start(ctx, 1, ["code"])
    assert engine.mask_digest() not in (first, digests[-1])  # a new stage: a new half
    draws = [d["draw"] for d in method.record_extra()["hft"]["draws"]]
    assert draws == (["stage0", "step4", "stage1"] if round_ == "refresh" else ["stage0", "stage1"])


def test_hft_frozen_half_moves_exactly_zero_under_adamw_with_weight_decay():
    model = small_llama()
    engine = EvolvingIsolation(model, EPIConfig(refresh_every=None))
    masks = half_masks(engine.names, [p.shape for p in engine.params], "matrix", draw_generator("hft", 0, "stage0"))
    engine.set_masks(masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine.attach(opt)
    before = [p.detach().clone() for p in engine.params]
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        engine.observe("math")
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p, b, m in zip(engine.params, before, masks):
        if m.all():
            assert torch.equal(p.detach(), b)  # frozen: exactly 0.0 movement
        else:
            assert (p.detach() != b).all()  # the trained half moves everywhere


def test_hft_runs_in_the_smoke_profile_with_half_frozen(tmp_path):
    rec = run_experiment(resolve("smoke", method="hft", seed=0, **TINY), tmp_path)
    assert rec["protected_fraction_mean"] == pytest.approx(0.5)
    assert rec["hft"]["unit"] == "matrix" and [d["draw"] for d in rec["hft"]["draws"]] == ["stage0"]


@pytest.mark.parametrize("method, every", [("random_per_task", 5), ("random_per_task", 8), ("hft", 5)])
def test_an_interrupted_control_resumes_with_the_same_draws(tmp_path, method, every):
    """A checkpoint inside stage A (step 5) or at its end (step 8, where a re-draw and the next stage's set come)."""
    cfg = resolve("smoke", method=method, protocol="sequential", tasks=["math", "code"], steps_per_task=8,
                  eval_records=2, eval_every=0, checkpoint_every=every, random_ratio=0.2, random_refresh=True,
                  hft_round="refresh")
    full = run_experiment(cfg, tmp_path / "a")

    interrupt_at_stage_end(cfg, tmp_path / "b", "stage 1/2")
    said = []
    resumed = run_experiment(cfg, tmp_path / "b", say=said.append)
    assert any(m.startswith("resumed") and f"at step {every}/16" in m for m in said)
    assert resumed["losses"] == full["losses"] and resumed["mask_digest"] == full["mask_digest"]
    assert resumed["protected_fraction"] == full["protected_fraction"]
    extra = "hft" if method == "hft" else "random_control"
    assert resumed[extra] == full[extra]


# ---- learning-rate arms ----------------------------------------------------------------------------------
def test_an_lr_arm_gets_its_own_folder_and_method_label_and_pools_apart(tmp_path):
    default = resolve("smoke", method="full_sft", seed=0, **TINY)
    arm = resolve("smoke", method="full_sft", seed=0, lr=3e-4, **TINY)
    assert default.run_name == "mix-full_sft-s0" and default.arm == "full_sft"
    assert arm.run_name == "mix-full_sft-lr0.0003-s0" and arm.arm == "full_sft@lr=0.0003"
    assert resolve("real_cpu", lr=1e-4).arm == "full_sft"  # the profile's own lr is no arm
    assert resolve("real_cpu", lr=1e-3).run_name.endswith("-full_sft-lr0.001-s0")
    for cfg in (default, arm, resolve("smoke", method="full_sft", seed=1, lr=3e-4, **TINY)):
        run_experiment(cfg, tmp_path)
    df = compare(tmp_path)
    assert sorted(zip(df["method"], df["seed"])) == [("full_sft", 0), ("full_sft@lr=0.0003", 0),
                                                     ("full_sft@lr=0.0003", 1)]
    assert "variant" not in df  # each arm's runs have one setting: pooled, nothing to tell apart


def test_random_finds_the_match_of_its_own_lr_arm(tmp_path):
    for name, share in (("mix-epi_per_task-s0", 0.2), ("mix-epi_per_task-lr0.0003-s0", 0.3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"protected_fraction_mean": share,
                                                                  "protected_fraction": [share]}))
    arm = resolve("smoke", method="random", seed=0, lr=3e-4)
    assert arm.run_name == "mix-random-lr0.0003-s0"
    assert RandomMask.matched_ratio(arm, tmp_path / arm.run_name) == 0.3
    assert RandomMask.matched_ratio(resolve("smoke", method="random"), tmp_path / "x") == 0.2
    per_task = resolve("smoke", method="random_per_task", lr=3e-4, random_refresh=True)
    assert per_task.run_name == "mix-random_per_task-lr0.0003-redraw-s0"
    assert RandomPerTask().target_share(per_task, tmp_path / per_task.run_name) == 0.3


# ---- settings ----------------------------------------------------------------------------------------------
def test_the_new_controls_follow_random_in_the_registry():
    names = list(METHODS)
    i = names.index("random")
    assert names[i:i + 4] == ["random", "random_global", "random_per_task", "hft"]


@pytest.mark.parametrize("settings, message", [
    (dict(method="hft", hft_unit="half"), "hft_unit must be one of 'matrix', 'element', got 'half'"),
    (dict(method="hft", hft_round="epoch"), "hft_round must be one of 'stage', 'refresh', got 'epoch'"),
    (dict(method="random_global", random_refresh="yes"), "random_refresh must be true or false, got 'yes'"),
    (dict(method="random_global", random_refresh=True, refresh_every=0), "random_refresh=true re-draws every"),
    (dict(method="random_per_task", random_refresh=True, refresh_every=0), "set refresh_every > 0"),
    (dict(method="hft", hft_round="refresh", refresh_every=0), "hft_round='refresh' re-draws every"),
    (dict(method="full_sft", lr=0.0), "lr must be > 0"),
])
def test_bad_control_settings_fail_with_the_field_named(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve("smoke", **settings)


def test_options_of_other_methods_are_not_arms():
    cfg = resolve("smoke", method="full_sft", random_refresh=True, hft_round="refresh", refresh_every=0)
    assert cfg.run_name == "mix-full_sft-s0" and cfg.arm == "full_sft"  # settings a method ignores name nothing
    assert Path(resolve("smoke", method="hft", hft_unit="element").run_name).name == "mix-hft-unit_element-s0"

"""From run records to decided claims (epi.analysis.evidence): measures read per prompt, pairing by seed with
orders averaged inside a seed, the per-seed fallback for records without per-prompt scores, arm labels, the
floor, and the seesaw read as the papers define it (with interference as its negative control)."""
import numpy as np
import pandas as pd
import pytest

from epi.analysis import evidence, stats

TASKS = ["math", "code", "logic"]


def _binary(p, n, rng):
    return (rng.random(n) < p).astype(float)


def _final(scores: dict) -> dict:
    return {"final_scores": {t: float(np.mean(a)) for t, a in scores.items()},
            "final_prompt_scores": {t: [float(x) for x in a] for t, a in scores.items()}}


def mix_record(method, seed, scores, protocol="mix", per_prompt=True, **config):
    cfg = {"protocol": protocol, "method": method, "tasks": list(scores), "profile": "smoke", "threads": 1, **config}
    rec = {"config": cfg, "seed": seed, **_final(scores)}
    if not per_prompt:
        del rec["final_prompt_scores"]
    return rec


def _entry(a, per_prompt=True):
    out = {"score": float(np.mean(a)), "loss": 1.0, "n": len(a)}
    if per_prompt:
        out["per_prompt"] = [float(x) for x in a]
    return out


def seq_record(method, seed, order, a_after_a, a_after_b, b_after_a, b_after_b, per_prompt=True):
    a, b = order
    stage = [{a: _entry(a_after_a, per_prompt), b: _entry(b_after_a, per_prompt)},
             {a: _entry(a_after_b, per_prompt), b: _entry(b_after_b, per_prompt)}]
    return {"config": {"protocol": "sequential", "method": method, "tasks": [a, b], "profile": "smoke",
                       "threads": 1}, "seed": seed, "stage_scores": stage,
            "final_scores": {a: float(np.mean(a_after_b)), b: float(np.mean(b_after_b))}}


def forgetting_record(method, seed, base, final, train=("math",)):
    rec = {"config": {"protocol": "forgetting", "method": method, "tasks": list(base), "train_tasks": list(train),
                      "profile": "smoke", "threads": 1}, "seed": seed,
           "base_scores": {t: _entry(a) for t, a in base.items()}, **_final(final)}
    return rec


def mix_grid(gain, seeds=range(4), n=200, per_prompt=True, methods=("full_sft", "epi")):
    # the same prompts per seed; `epi` flips a share `gain` of full SFT's wrong prompts to right
    out = []
    for s in seeds:
        rng = np.random.default_rng(s)
        base = {t: _binary(0.4, n, rng) for t in TASKS}
        better = {t: np.where((a == 0) & (rng.random(n) < gain), 1.0, a) for t, a in base.items()}
        out += [mix_record(methods[0], s, base, per_prompt=per_prompt),
                mix_record(methods[1], s, better, per_prompt=per_prompt)]
    return out


# ---------------------------------------------------------------- measures and decisions from records

def test_a_clear_gain_on_the_mix_is_supported_with_prompts_resampled():
    records = mix_grid(0.3)
    c = evidence.claim_from_runs("epi beats full SFT", records, "mean_score", "epi", "full_sft", minimum=0.02)
    assert c["verdict"] == "supported"
    d = c["decision"]
    assert d["rule"] == "bootstrap" and d["n_seeds"] == 4 and d["n_prompts"] == 200
    assert d["interval"][0] > 0.1 and d["effect"] == pytest.approx(0.18, abs=0.03)   # 0.3 of the 60 % wrong
    assert "95% hierarchical bootstrap" in c["measured"] and "full_sft 0.398 ± 0.025, epi 0.569" in c["measured"]
    assert "200 prompts per task" in c["measured"]
    # the same runs claimed the other way round are not supported
    back = evidence.claim_from_runs("x", records, "mean_score", "full_sft", "epi")
    assert back["verdict"] == "not supported"


def test_a_gain_smaller_than_the_minimum_is_not_counted():
    records = mix_grid(0.02, n=400)
    small = evidence.claim_from_runs("x", records, "mean_score", "epi", "full_sft", minimum=0.05)
    assert small["verdict"] in ("mixed", "not supported") and small["decision"]["effect"] < 0.05
    assert evidence.claim_from_runs("x", mix_grid(0.0), "mean_score", "epi", "full_sft")["verdict"] == "mixed"


def test_records_without_per_prompt_fall_back_to_seeds_and_say_so():
    records = mix_grid(0.3, per_prompt=False)
    paired = evidence.paired_effects(records, "mean_score", "epi", "full_sft")
    assert not paired.prompts_recorded and all(isinstance(e, float) for e in paired.effects)
    c = evidence.claim_from_runs("x", records, "mean_score", "epi", "full_sft")
    assert "prompts: not recorded" in c["measured"] and c["decision"]["n_prompts"] is None
    assert c["verdict"] == "supported"                                 # 4 seeds, all clearly up
    # one record without per_prompt sends the whole comparison to per-seed numbers
    mixed_kinds = mix_grid(0.3)
    mixed_kinds[0] = {k: v for k, v in mixed_kinds[0].items() if k != "final_prompt_scores"}
    assert not evidence.paired_effects(mixed_kinds, "mean_score", "epi", "full_sft").prompts_recorded
    # a summary frame (no prompts) decides as the fallback does
    frame = pd.DataFrame([{"method": r["config"]["method"], "seed": r["seed"],
                           "mean_score": np.mean(list(r["final_scores"].values()))} for r in records])
    f = evidence.claim_from_frame("x", frame, "mean_score", "epi", "full_sft")
    assert f["verdict"] == c["verdict"] and f["decision"]["interval"] == pytest.approx(c["decision"]["interval"])


def _seq_grid(orders=(("math", "code"), ("code", "math")), seeds=(0, 1), per_prompt=True):
    recs = []
    for s in seeds:
        rng = np.random.default_rng(10 + s)
        for o in orders:
            learned, b_learned = _binary(0.8, 32, rng), _binary(0.7, 32, rng)
            zero = np.zeros(32)
            full_after_b = np.where(rng.random(32) < 0.6, 0.0, learned)     # full SFT loses ~60 % of A
            epi_after_b = np.where(rng.random(32) < 0.1, 0.0, learned)      # EPI loses ~10 %
            recs += [seq_record("full_sft", s, o, learned, full_after_b, zero, b_learned, per_prompt),
                     seq_record("epi", s, o, learned, epi_after_b, zero, b_learned, per_prompt)]
    return recs


def test_two_seeds_by_two_orders_are_two_replicates():
    recs = _seq_grid()
    paired = evidence.paired_effects(recs, "forgetting_A", "epi", "full_sft")
    assert len(paired.seeds) == 2 and paired.orders == ["code->math", "math->code"]
    assert all(len(rows) == 2 for rows in paired.effects)             # one row of 32 prompts per order
    # the seed's effect is the mean over its two orders
    by_hand = []
    for s in (0, 1):
        diffs = []
        for o in ("math->code", "code->math"):
            f = {r["config"]["method"]: r for r in recs if r["seed"] == s and "->".join(r["config"]["tasks"]) == o}
            a = f["epi"]["config"]["tasks"][0]
            forget = {m: f[m]["stage_scores"][0][a]["score"] - f[m]["stage_scores"][1][a]["score"] for m in f}
            diffs.append(forget["epi"] - forget["full_sft"])
        by_hand.append(np.mean(diffs))
    v = evidence.decide(paired, direction="decrease")
    assert v.n_seeds == 2 and v.effect == pytest.approx(-np.mean(by_hand))
    c = evidence.claim_from_runs("epi forgets less", recs, "forgetting_A", "epi", "full_sft", "decrease", 0.03)
    assert "2 paired seed(s) (orders code->math, math->code averaged within each)" in c["measured"]
    assert c["decision"]["n_seeds"] == 2 and c["verdict"] == "supported"
    # without prompts, 2 seeds cannot reach the level: the rule does not decide (the old "4/4 pairs" reading)
    flat = evidence.claim_from_runs("x", _seq_grid(per_prompt=False), "forgetting_A", "epi", "full_sft",
                                    "decrease", 0.03)
    assert flat["verdict"] == "mixed" and "range of 2 seed(s)" in flat["measured"]


def test_learning_and_retention_are_measured_per_order():
    recs = _seq_grid()
    learn = evidence.paired_effects(recs, "learning_B", "epi", "full_sft")
    assert all(np.allclose(np.concatenate(rows), 0.0) for rows in learn.effects)   # same B learned
    ret = evidence.paired_effects(recs, "retention_A", "epi", "full_sft")
    assert not ret.prompts_recorded and all(0 < v <= 1 for v in ret.method_values)
    # a run that never learned A has no retention: it (and its partner) is left out
    never = [seq_record(m, 5, ("math", "code"), np.zeros(4), np.zeros(4), np.zeros(4), np.ones(4))
             for m in ("full_sft", "epi")]
    assert len(evidence.paired_effects(recs + never, "retention_A", "epi", "full_sft").seeds) == 2


def test_the_baseline_below_the_floor_is_not_measured():
    rng = np.random.default_rng(0)
    recs = []
    for s in range(4):
        base = {t: _binary(0.5, 100, rng) for t in TASKS}
        full = {t: a.copy() for t, a in base.items()}
        full["code"][:1] = 0.0                                         # full SFT forgets almost nothing
        epi = {t: a.copy() for t, a in base.items()}
        recs += [forgetting_record("full_sft", s, base, full), forgetting_record("epi", s, base, epi)]
    c = evidence.claim_from_runs("epi forgets less", recs, "forgetting_mean", "epi", "full_sft", "decrease",
                                 minimum=0.01, floor=0.01)
    assert c["verdict"] == "not measured" and "nothing to reduce" in c["measured"]
    # negative control: without a floor the same runs get a verdict
    assert evidence.claim_from_runs("x", recs, "forgetting_mean", "epi", "full_sft", "decrease")["verdict"] \
        != "not measured"
    kept = evidence.paired_effects(recs, "forgetting_mean", "epi", "full_sft")
    assert all(len(rows) == 2 for rows in kept.effects)                 # code and logic: the untrained tasks


def test_arms_are_labels_so_a_method_at_another_lr_does_not_pair_with_itself():
    recs = mix_grid(0.3)
    slow = [dict(r, arm="full_sft@lr=0.0003") for r in mix_grid(0.1, methods=("x", "full_sft"))
            if r["config"]["method"] == "full_sft"]
    both = recs + slow
    assert evidence.label(slow[0]) == "full_sft@lr=0.0003" and evidence.label(recs[0]) == "full_sft"
    c = evidence.claim_from_runs("x", both, "mean_score", "full_sft@lr=0.0003", "full_sft")
    assert c["decision"]["n_seeds"] == 4 and c["verdict"] == "supported"
    # a caller's own labelling (e.g. by learning rate) is accepted too
    by_lr = evidence.paired_effects(both, "mean_score", "full_sft@lr=0.0003", "epi", label=evidence.label)
    assert len(by_lr.seeds) == 4


def test_runs_that_cannot_pair_are_refused_with_the_reason():
    recs = mix_grid(0.3)
    short = mix_grid(0.3, n=150)[1]                                     # epi at seed 0 on 150 prompts
    with pytest.raises(ValueError, match="two runs of arm 'epi' at seed 0"):
        evidence.paired_effects(recs + [short], "mean_score", "epi", "full_sft")
    bad = [r for r in recs if not (r["seed"] == 0 and r["config"]["method"] == "epi")] + [short]
    with pytest.raises(ValueError, match="different numbers of prompts"):
        evidence.paired_effects(bad, "mean_score", "epi", "full_sft")
    with pytest.raises(ValueError, match="measure must be one of"):
        evidence.paired_effects(recs, "accuracy", "epi", "full_sft")
    none = evidence.claim_from_runs("x", recs, "mean_score", "epi", "random")
    assert none["verdict"] == "not measured" and "no paired runs" in none["measured"]


# ---------------------------------------------------------------- the seesaw

def _seesaw_runs(shift: dict, seeds=range(4), n=200):
    # the mix's per-prompt scores against the reference's: shift[t] > 0 flips wrong prompts right, < 0 right wrong
    out = []
    for s in seeds:
        rng = np.random.default_rng(100 + s)
        ref = {t: _binary(0.5, n, rng) for t in TASKS}
        mix = {}
        for t, a in ref.items():
            flip = rng.random(n) < abs(shift[t])
            mix[t] = np.where(flip, 1.0 if shift[t] > 0 else 0.0, a)
        out += [mix_record("full_sft", s, mix), mix_record("full_sft", s, ref, protocol="reference")]
    return out


def test_seesaw_needs_a_task_above_and_another_below():
    s = evidence.seesaw(_seesaw_runs({"math": 0.4, "code": -0.4, "logic": 0.0}))
    assert s.reading == "seesaw" and s.verdict == "supported"
    assert s.above == ["math"] and s.below == ["code"]
    assert s.per_task["math"].interval[0] > 0 and s.per_task["code"].interval[1] < 0
    assert s.per_task["math"].n_prompts == 200


def test_below_on_every_task_is_interference_not_a_seesaw():
    s = evidence.seesaw(_seesaw_runs({"math": -0.4, "code": -0.3, "logic": -0.5}))
    assert s.reading == "interference (below on all)" and s.verdict == "not supported"
    assert s.above == [] and sorted(s.below) == sorted(TASKS)
    c = evidence.seesaw_claim(_seesaw_runs({"math": -0.4, "code": -0.3, "logic": -0.5}))
    assert c["verdict"] == "not supported" and "interference (below on all)" in c["measured"]
    assert "math −" not in c["measured"] and "math -0." in c["measured"]


def test_other_seesaw_readings():
    assert evidence.seesaw(_seesaw_runs({"math": 0.0, "code": 0.0, "logic": 0.0})).reading == \
        "no detectable difference"
    some = evidence.seesaw(_seesaw_runs({"math": -0.4, "code": 0.0, "logic": 0.0}))
    assert some.reading == "below on some, above on none" and some.verdict == "mixed"
    assert evidence.seesaw(_seesaw_runs({"math": 0.4, "code": 0.4, "logic": 0.4})).reading == "gain on all"
    no_refs = [r for r in _seesaw_runs({"math": 0.4, "code": -0.4, "logic": 0.0})
               if r["config"]["protocol"] == "mix"]
    assert evidence.seesaw(no_refs).verdict == "not measured"
    assert evidence.seesaw_claim(no_refs)["verdict"] == "not measured"


# ---------------------------------------------------------------- claim rows

def test_claim_rows_hold_plain_numbers_and_checked_verdicts():
    c = evidence.claim("x", f"per seed: {[np.float64(-0.105), np.float64(0.2)]}", "mixed",
                       f"{np.int64(3)} seeds, {np.float32(0.5)!r}")
    assert c["measured"] == "per seed: [-0.105, 0.2]" and c["evidence"] == "3 seeds, 0.5"
    assert "decision" not in c
    with pytest.raises(ValueError, match="verdict must be one of"):
        evidence.claim("x", "y", "probably")
    assert stats.VERDICTS == ("supported", "not supported", "mixed", "not measured")

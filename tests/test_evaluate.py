"""epi.tasks.evaluate: greedy generation under left padding, response loss, scoring, model mode."""

from __future__ import annotations

import pytest
import torch

from epi.models import load_model
from epi.tasks.evaluate import evaluate, generate
from epi.tasks.formatting import MODEL_KEYS, encode_prompts, encode_sft, render

torch.set_num_threads(1)


def rec(i: int, prompt: str, answer: str) -> dict:
    return {"task": "instruction", "id": str(i), "prompt": prompt, "response": answer, "answer": answer}


RECORDS = [rec(0, "Reverse: abc", "cba"), rec(1, "Sort: 3, 1, 2", "1, 2, 3"),
           rec(2, "Upper: hi there", "HI THERE"), rec(3, "Count the words: a a b", "3")]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0, num_hidden_layers=2)


@pytest.fixture(scope="module")
def memorised():
    """A 2-layer tiny model that has memorised RECORDS (about 30 steps, under a second)."""
    model, tok = load_model("tiny", seed=0, num_hidden_layers=2)
    enc = encode_sft(RECORDS, tok, 64)
    batch = {k: enc[k] for k in MODEL_KEYS}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.02:
            break
    return model, tok


def test_left_padded_batch_generation_equals_single_prompt_generation(tiny):
    model, tok = tiny
    batched = generate(model, tok, RECORDS, max_new_tokens=12)
    single = [generate(model, tok, [r], max_new_tokens=12)[0] for r in RECORDS]
    assert batched == single
    # an independent reference: transformers' own greedy search on each unpadded prompt
    for record, ours in zip(RECORDS, batched):
        ids = tok(render(record, tok)[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == ours


def test_evaluate_loss_is_the_models_loss_on_response_tokens(tiny):
    model, tok = tiny
    result = evaluate(model, tok, {"instruction": RECORDS}, max_new_tokens=1)["instruction"]
    enc = encode_sft(RECORDS, tok, None)
    with torch.no_grad():
        expected = model.eval()(**{k: enc[k] for k in MODEL_KEYS}).loss.item()
    assert result["n"] == len(RECORDS)
    assert result["loss"] == pytest.approx(expected, rel=1e-4)


def test_memorised_answers_score_one_and_generation_stops_at_eos(memorised):
    model, tok = memorised
    assert generate(model, tok, RECORDS, max_new_tokens=20) == [r["answer"] for r in RECORDS]
    result = evaluate(model, tok, {"instruction": RECORDS})["instruction"]
    assert result["score"] == 1.0 and result["loss"] < 0.05
    wrong = [dict(r, answer="nope") for r in RECORDS]  # negative control: the scorer really compares
    assert evaluate(model, tok, {"instruction": wrong})["instruction"]["score"] == 0.0


def test_per_prompt_scores_follow_record_order_and_average_to_the_score(memorised):
    model, tok = memorised
    mixed = [dict(r, answer="nope") if i % 2 else r for i, r in enumerate(RECORDS)]  # odd prompts wrong
    result = evaluate(model, tok, {"instruction": mixed})["instruction"]
    assert result["per_prompt"] == [1.0, 0.0, 1.0, 0.0]
    assert sum(result["per_prompt"]) / len(result["per_prompt"]) == result["score"] == 0.5
    assert evaluate(model, tok, {"instruction": []})["instruction"]["per_prompt"] == []


def test_evaluate_restores_the_models_previous_mode(tiny):
    model, tok = tiny
    model.train()
    evaluate(model, tok, {"instruction": RECORDS[:1]}, max_new_tokens=2)
    assert model.training
    model.eval()
    evaluate(model, tok, {"instruction": RECORDS[:1]}, max_new_tokens=2)
    assert not model.training


def test_evaluate_selects_a_split_and_honours_limit(tiny):
    model, tok = tiny
    tasks = {"instruction": {"validation": RECORDS, "test": RECORDS[:2]}}
    assert evaluate(model, tok, tasks, "test", max_new_tokens=2)["instruction"]["n"] == 2
    assert evaluate(model, tok, tasks, "validation", max_new_tokens=2, limit=3)["instruction"]["n"] == 3
    with pytest.raises(KeyError, match="split"):
        evaluate(model, tok, tasks, max_new_tokens=2)


def test_small_batches_give_the_same_results_as_one_batch(tiny):
    model, tok = tiny
    one = evaluate(model, tok, {"instruction": RECORDS}, max_new_tokens=6, batch_size=64)
    many = evaluate(model, tok, {"instruction": RECORDS}, max_new_tokens=6, batch_size=3)
    assert one["instruction"]["score"] == many["instruction"]["score"]
    assert one["instruction"]["loss"] == pytest.approx(many["instruction"]["loss"], rel=1e-5)


def test_prompts_longer_than_the_model_are_cut_from_the_left(tiny, caplog):
    model, tok = tiny
    long = rec(9, "x" * 400, "y")  # 256 positions in the tiny model
    assert len(encode_prompts([long], tok)["input_ids"][0]) > model.config.max_position_embeddings
    assert len(generate(model, tok, [long], max_new_tokens=4)) == 1
    assert "left-truncated 1 of 1" in caplog.text


def test_batches_shrink_so_logits_of_a_large_vocabulary_fit_the_budget():
    from epi.tasks.evaluate import _LOGITS_BUDGET, _chunks

    pairs = [([1] * 5, [2] * 99)] * 10  # 100 logit columns per row
    vocab = _LOGITS_BUDGET // (100 * 4)  # exactly four rows fit
    assert [len(c) for c in _chunks(list(range(10)), pairs, 64, vocab)] == [4, 4, 2]
    assert [len(c) for c in _chunks(list(range(10)), pairs, 3, 100)] == [3, 3, 3, 1]

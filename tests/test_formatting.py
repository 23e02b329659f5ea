"""epi.tasks.formatting: templates, label masking by position, truncation counts, batching."""

from __future__ import annotations

import logging

import pytest
import torch

from epi.models import load_tiny_tokenizer
from epi.tasks.formatting import (IGNORE_INDEX, SFTBatcher, encode_prompts, encode_sft, make_batches,
                                  render, tokenize_records)

# a ChatML-like template on the tiny vocabulary, with pad == eos as in SmolLM2
CHAT_TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
                 "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tokenizer = load_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def rec(i: int, prompt: str, response: str) -> dict:
    return {"task": "instruction", "id": str(i), "prompt": prompt, "response": response,
            "answer": response}


RECORDS = [rec(0, "Reverse: abc", "cba"), rec(1, "Sort the numbers: 3, 1, 2", "1, 2, 3"),
           rec(2, "Hi", "Hello there, friend."),
           {"task": "chat", "id": "3", "messages": [{"role": "user", "content": "I am Zoe."},
                                                    {"role": "assistant", "content": "Hi Zoe."},
                                                    {"role": "user", "content": "Name?"}],
            "response": "Zoe", "answer": "Zoe"}]


def test_plain_template_wraps_prompt_and_ends_response_with_eos(tok):
    assert render(RECORDS[0], tok) == ("<bos>Reverse: abc\n", "cba<eos>")


def test_plain_template_renders_every_earlier_chat_turn(tok):
    assert render(RECORDS[3], tok) == ("<bos>I am Zoe.\nHi Zoe.<eos>Name?\n", "Zoe<eos>")


def test_chat_template_response_carries_the_templates_end_of_turn(chat_tok):
    prompt, response = render(RECORDS[0], chat_tok)
    assert prompt == "<bos>user\nReverse: abc<eos>\n<bos>assistant\n"
    assert response == "cba<eos>\n"


def test_a_record_needs_exactly_one_of_prompt_or_messages(tok):
    with pytest.raises(ValueError, match="exactly one"):
        render({"task": "x", "id": "1", "prompt": "a", "messages": [], "response": "b"}, tok)
    with pytest.raises(ValueError, match="exactly one"):
        render({"task": "x", "id": "1", "response": "b"}, tok)


@pytest.mark.parametrize("which", ["tok", "chat_tok"])
def test_labels_are_ignored_exactly_on_prompt_and_padding_positions(which, request):
    tokenizer = request.getfixturevalue(which)
    enc = encode_sft(RECORDS, tokenizer, max_length=None)
    pairs = tokenize_records(RECORDS, tokenizer)
    width = max(len(p) + len(r) for p, r in pairs)
    assert enc["input_ids"].shape == enc["labels"].shape == (len(RECORDS), width)
    for row, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        expected = torch.full((width,), IGNORE_INDEX)
        expected[len(p):n] = torch.tensor(r)
        assert torch.equal(enc["labels"][row], expected)
        assert enc["input_ids"][row, :n].tolist() == p + r
        assert enc["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert (enc["n_prompt_truncated"], enc["n_dropped"], enc["kept"]) == (0, 0, [0, 1, 2, 3])


def test_end_of_turn_stays_trained_when_pad_equals_eos(chat_tok):
    enc = encode_sft(RECORDS[:3], chat_tok, max_length=None)
    eos = chat_tok.eos_token_id
    assert chat_tok.pad_token_id == eos
    row = 0  # "cba<eos>\n" ends a row that is padded with eos ids (row 1 is longer)
    last = int(enc["attention_mask"][row].sum()) - 1
    assert enc["input_ids"][row, last + 1] == eos and enc["labels"][row, last + 1] == IGNORE_INDEX
    assert enc["input_ids"][row, last - 1] == eos and enc["labels"][row, last - 1] == eos
    # negative control: the naive mask `input_ids == pad_id` would have dropped the end-of-turn
    naive = enc["input_ids"].masked_fill(enc["input_ids"] == chat_tok.pad_token_id, IGNORE_INDEX)
    assert naive[row, last - 1] == IGNORE_INDEX


def test_long_prompts_are_cut_from_the_left_and_counted(tok, caplog):
    long = rec(9, "x" * 50 + "KEEP", "ans")  # prompt 56 tokens, response 4
    with caplog.at_level(logging.WARNING, logger="epi.tasks.formatting"):
        enc = encode_sft([long, rec(1, "hi", "yo")], tok, max_length=12)
    assert (enc["n_prompt_truncated"], enc["n_dropped"]) == (1, 0)
    assert "left-truncated 1 prompt" in caplog.text
    row = enc["input_ids"][0].tolist()
    assert tok.decode(row) == "xxxKEEP\nans<eos>"  # the response is whole; the prompt's end is kept
    assert (enc["labels"][0] != IGNORE_INDEX).sum() == 4


def test_records_whose_response_cannot_fit_are_dropped_and_counted(tok):
    enc = encode_sft([rec(0, "q", "r" * 20), RECORDS[0], rec(2, "q", "r" * 9)], tok, max_length=10)
    # 21 response tokens never fit; 10 response tokens would leave no prompt token: both dropped
    assert (enc["n_prompt_truncated"], enc["n_dropped"], enc["kept"]) == (1, 2, [1])
    assert enc["input_ids"].shape == (1, 10)


def test_batcher_is_deterministic_and_reshuffles_every_epoch(tok):
    records = [rec(i, "q" * (i % 7 + 1), "a" * (i % 3 + 1)) for i in range(10)]
    a, b = make_batches(records, tok, 4, 32, seed=1), SFTBatcher(records, tok, 4, 32, seed=1)
    assert len(a) == 3
    first_a, first_b = [x["input_ids"] for x in a], [x["input_ids"] for x in b]
    assert all(torch.equal(x, y) for x, y in zip(first_a, first_b))
    orders = [sorted(int(i) for batch in a.order(e) for i in batch) for e in range(2)]
    assert orders == [list(range(10))] * 2  # each epoch covers every example once
    assert [list(x) for x in a.order(0)] != [list(x) for x in a.order(1)]
    other = make_batches(records, tok, 4, 32, seed=2)
    assert [list(x) for x in a.order(0)] != [list(x) for x in other.order(0)]
    batch = next(iter(make_batches(records, tok, 4, 32, seed=1, drop_last=True)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 4


def test_batcher_refuses_when_nothing_fits(tok):
    with pytest.raises(ValueError, match="no record fits"):
        SFTBatcher([rec(0, "q", "long answer")], tok, 2, max_length=4)


def test_generation_prompts_are_left_padded_and_equal_the_trained_prompts(tok):
    enc = encode_prompts(RECORDS, tok)
    pairs = tokenize_records(RECORDS, tok)
    width = max(len(p) for p, _ in pairs)
    for row, (p, _) in enumerate(pairs):
        assert enc["input_ids"][row, width - len(p):].tolist() == p
        assert enc["attention_mask"][row].tolist() == [0] * (width - len(p)) + [1] * len(p)
    cut = encode_prompts(RECORDS, tok, max_length=5)
    assert cut["input_ids"].shape[1] == 5 and cut["input_ids"][0].tolist() == pairs[0][0][-5:]

"""Formatting of task records for SFT: render, tokenize, mask prompt tokens, pad, batch.

A record (docs/CONTRACTS.md) holds either ``prompt`` (one user turn) or ``messages`` (every turn before
the trained reply) plus the ``response`` that SFT trains on. Only response tokens are trained:
labels are -100 on prompt and padding positions, decided by *position*, never by token id -- SmolLM2's
pad token is its end-of-turn token, which must stay trained.

Templates:

* tokenizer with a chat template -- the prompt is ``apply_chat_template(turns,
  add_generation_prompt=True)``; the response is what the template appends for the assistant reply
  (the reply plus its end-of-turn marker, e.g. ``Paris<|im_end|>\\n``);
* without one (the tiny tokenizer, base models) -- the plain template
  ``<bos>`` + ``user\\n`` (+ ``assistant<eos>user\\n`` for earlier turns) -> ``response<eos>``.

Prompt and response are tokenized separately (``add_special_tokens=False``), so a generation prompt
is token-for-token the prompt the model was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MODEL_KEYS = ("input_ids", "attention_mask", "labels")

__all__ = [
    "IGNORE_INDEX",
    "MODEL_KEYS",
    "SFTBatcher",
    "collate",
    "encode_prompts",
    "encode_sft",
    "fit_example",
    "make_batches",
    "pad_id",
    "pad_left",
    "render",
    "tokenize_records",
]


def _turns(record: dict) -> list[dict]:
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        raise ValueError(f"record {record.get('task')}/{record.get('id')} must hold exactly one of "
                         f"'prompt' or 'messages', got keys {sorted(record)}")
    if has_prompt:
        return [{"role": "user", "content": record["prompt"]}]
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]


def render(record: dict, tokenizer: Any) -> tuple[str, str]:
    """Return ``(prompt_text, response_text)``: the text before the reply, and the reply + end-of-turn.

    Uses the tokenizer's chat template when it has one, the plain template otherwise (module docstring).
    Records without ``response`` render an empty reply (generation only).
    """
    turns = _turns(record)
    response = record.get("response", "")
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        # the template's own end-of-turn (e.g. "<|im_end|>\n") is what the model must learn to emit
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        return prompt, response + eos
    end = eos or "\n"
    parts = [tokenizer.bos_token or ""]
    for turn in turns:
        parts.append(turn["content"] + (end if turn["role"] == "assistant" else "\n"))
    return "".join(parts), response + end


def tokenize_records(records: Sequence[dict], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """Return ``[(prompt_ids, response_ids), ...]``, one pair per record, tokenized in one batch each."""
    if not records:
        return []
    texts = [render(r, tokenizer) for r in records]
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in texts], add_special_tokens=False)["input_ids"]
    return list(zip(prompts, responses))


def fit_example(prompt_ids: list[int], response_ids: list[int],
                max_length: int | None) -> tuple[list[int], int, bool] | None:
    """Return ``(ids, n_prompt, prompt_truncated)`` within ``max_length``, or None if the response can't fit.

    The prompt is cut from the left (its start is the least useful context); the response is never cut,
    and at least one prompt token is kept so the first response token has something to be predicted from.
    """
    if max_length is None or len(prompt_ids) + len(response_ids) <= max_length:
        return list(prompt_ids) + list(response_ids), len(prompt_ids), False
    keep = max_length - len(response_ids)
    if keep < 1:
        return None
    return list(prompt_ids[-keep:]) + list(response_ids), keep, True


def pad_id(tokenizer: Any) -> int:
    """Return the id used for padding: pad, else eos, else 0 (padding is masked by position anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def collate(examples: Sequence[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    """Return right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding).

    ``examples`` are ``(ids, n_prompt)`` pairs; the batch is padded to its longest example.
    """
    width = max((len(ids) for ids, _ in examples), default=0)
    input_ids = np.full((len(examples), width), pad, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, :len(ids)] = ids
        labels[row, n_prompt:len(ids)] = ids[n_prompt:]
        mask[row, :len(ids)] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


def _fit_all(pairs: Sequence[tuple[list[int], list[int]]], max_length: int | None,
             what: str) -> tuple[list[tuple[list[int], int]], list[int], int, int]:
    examples, kept, n_truncated = [], [], 0
    for i, (p, r) in enumerate(pairs):
        fitted = fit_example(p, r, max_length)
        if fitted is None:
            continue
        ids, n_prompt, truncated = fitted
        examples.append((ids, n_prompt))
        kept.append(i)
        n_truncated += truncated
    n_dropped = len(pairs) - len(kept)
    if n_truncated or n_dropped:
        logger.warning("%s: max_length=%s left-truncated %d prompt(s) and dropped %d of %d record(s) "
                       "whose response does not fit", what, max_length, n_truncated, n_dropped, len(pairs))
    return examples, kept, n_truncated, n_dropped


def encode_sft(records: Sequence[dict], tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """Return padded SFT tensors plus truncation counts for ``records``.

    Keys: ``input_ids``, ``attention_mask``, ``labels`` (LongTensors, right-padded; ``MODEL_KEYS``),
    ``n_prompt_truncated`` and ``n_dropped`` (ints) and ``kept`` (indices of the encoded records).
    A record whose response does not fit in ``max_length`` is dropped and counted, never cut.
    """
    pairs = tokenize_records(records, tokenizer)
    examples, kept, n_truncated, n_dropped = _fit_all(pairs, max_length, "encode_sft")
    batch: dict[str, Any] = collate(examples, pad_id(tokenizer))
    batch.update(n_prompt_truncated=n_truncated, n_dropped=n_dropped, kept=kept)
    return batch


def pad_left(seqs: Sequence[Sequence[int]], pad: int) -> dict[str, torch.Tensor]:
    """Return left-padded ``input_ids`` and ``attention_mask`` for generation."""
    width = max((len(s) for s in seqs), default=0)
    input_ids = np.full((len(seqs), width), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        if len(s):
            input_ids[row, width - len(s):] = s
            mask[row, width - len(s):] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}


def encode_prompts(records: Sequence[dict], tokenizer: Any,
                   max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Return left-padded generation prompts (``input_ids``, ``attention_mask``) for ``records``.

    Prompts longer than ``max_length`` keep their last ``max_length`` tokens (counted in a warning).
    """
    prompts = [p for p, _ in tokenize_records(records, tokenizer)]
    if max_length is not None:
        n_cut = sum(len(p) > max_length for p in prompts)
        if n_cut:
            logger.warning("encode_prompts: left-truncated %d of %d prompt(s) to %d tokens",
                           n_cut, len(prompts), max_length)
        prompts = [p[-max_length:] for p in prompts]
    return pad_left(prompts, pad_id(tokenizer))


class SFTBatcher:
    """Deterministic shuffled SFT batches over records tokenized once.

    Iterating yields one epoch of ``{"input_ids", "attention_mask", "labels"}`` batches (padded to the
    longest example of each batch); each new epoch reshuffles with ``(seed, epoch)``, so two batchers
    with the same arguments yield identical streams. ``forever()`` cycles through epochs.
    """

    def __init__(self, records: Sequence[dict], tokenizer: Any, batch_size: int,
                 max_length: int | None, seed: int = 0, *, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pairs = tokenize_records(records, tokenizer)
        self.examples, self.kept, self.n_prompt_truncated, self.n_dropped = _fit_all(
            pairs, max_length, "SFTBatcher")
        if not self.examples:
            raise ValueError(f"no record fits max_length={max_length} ({len(pairs)} given)")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.pad = pad_id(tokenizer)
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> list[np.ndarray]:
        """Return the example indices of each batch of ``epoch``."""
        n = len(self.examples)
        idx = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        stop = len(self) * self.batch_size
        return [idx[i:min(i + self.batch_size, n)] for i in range(0, stop, self.batch_size)]

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Return the padded batch of the given example indices."""
        return collate([self.examples[i] for i in indices], self.pad)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.order(self.epoch)
        self.epoch += 1
        for indices in order:
            yield self.batch(indices)

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches endlessly, epoch after epoch."""
        while True:
            yield from self


def make_batches(records: Sequence[dict], tokenizer: Any, batch_size: int,
                 max_length: int | None, seed: int = 0, **kwargs: Any) -> SFTBatcher:
    """Return an ``SFTBatcher`` over ``records`` (see its docstring; kwargs: shuffle, drop_last)."""
    return SFTBatcher(records, tokenizer, batch_size, max_length, seed, **kwargs)

"""General ability: response loss on held-out general pairs, and next-token KL to the start model.

Fine-tuning on a narrow skill can erode what a pretrained model already does well (answer a plain
question, keep up a chat). Task scores do not see that, so a run with ``general_eval=True`` also
measures, before training and after every stage, on a fixed set of general pairs shipped in
``data/general/`` (40 Alpaca-style instruction/response pairs and 20 chat-style conversations, written
for this project, CC0):

* ``general_loss`` -- the token-weighted mean cross-entropy of the reference responses given their
  prompts (as trained: chat template, end-of-turn token included); lower is better;
* ``kl`` -- the mean over response positions of KL(p_start ‖ p_model) of the next-token distributions,
  where p_start is the model at construction of the probe (0 before training).

The vocabulary (49,152 for SmolLM2) makes caching the start model's full distributions costly (about
160 MB for the ~800 response positions), so the probe keeps each position's ``top_k`` log-probabilities
and lumps the rest into one "other" bucket. The KL is then taken between the two coarsened distributions
(the start model's top-k tokens + other): by the data-processing inequality it is a lower bound of the
full KL, and it is exact when ``top_k`` ≥ the vocabulary (the tiny model's 100 tokens).

The start model's pass is cached on disk by a fingerprint of its weights (runs of a grid that start
from the same model share it) and reused when `measure` sees the start weights again.

    probe = GeneralProbe(model, tokenizer, max_length=128)   # caches the start distributions
    ... train ...
    probe.measure(model)   # {"general_loss": ..., "kl": ..., "general_loss_alpaca": ..., ...}
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..jsonio import atomic_write
from ..tasks.formatting import IGNORE_INDEX, pad_id, tokenize_records

log = logging.getLogger(__name__)

GENERAL_DIR = Path(__file__).resolve().parents[2] / "data" / "general"
FILES = {"alpaca": "alpaca_style.jsonl", "chat": "chat_style.jsonl"}
DEFAULT_CACHE = "__epi_cache__"  # resolved to epi.models.cache_root() / "general" at construction


def load_general(folder: str | Path = GENERAL_DIR) -> Dict[str, List[dict]]:
    """Return the general pairs by style ({"alpaca": [...], "chat": [...]}) read from `folder`."""
    folder = Path(folder)
    out: Dict[str, List[dict]] = {}
    for style, name in FILES.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"general pairs {path} are missing; they ship with the repository "
                                    f"under data/general/ (clone the repository, not only the package)")
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: malformed record: invalid JSON ({err.msg})") from None
            if not isinstance(rec.get("response"), str) or ("prompt" in rec) == ("messages" in rec):
                raise ValueError(f"{path}:{number}: malformed record: needs 'response' and exactly one of "
                                 "'prompt' or 'messages'")
            records.append(rec)
        out[style] = records
    return out


@torch.no_grad()
def fingerprint(model: torch.nn.Module) -> str:
    """Return a sha1 of every parameter's bytes (tied tensors once): equal iff the weights are equal."""
    digest, seen = hashlib.sha1(), set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def fit_pair(prompt: Sequence[int], response: Sequence[int], max_length: Optional[int]) -> Tuple[List[int], int]:
    """Return (ids, n_prompt) within `max_length`: the prompt cut from the left, then the response from
    the right, keeping at least one token of each (a fixed probe may cut a reply; training never does)."""
    prompt, response = list(prompt), list(response)
    if max_length is None or len(prompt) + len(response) <= max_length:
        return prompt + response, len(prompt)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 for the general probe, got {max_length}")
    keep_p = min(len(prompt), max(1, max_length - len(response)))
    keep_r = max_length - keep_p
    return prompt[-keep_p:] + response[:keep_r], keep_p


def _coarse_kl(base_idx: torch.Tensor, base_logp: torch.Tensor, base_rest: torch.Tensor,
               logp: torch.Tensor) -> torch.Tensor:
    """Return KL(base ‖ model) per position over the base's top-k tokens plus one "other" bucket.

    base_idx/base_logp: (n, k) top-k ids and log-probs of the base; base_rest: (n,) log of the base's
    remaining mass (-inf when none); logp: (n, V) the model's log-probs. Computed in float64.
    """
    base_logp, base_rest, logp = base_logp.double(), base_rest.double(), logp.double()
    model_top = logp.gather(1, base_idx.long())
    kl = (base_logp.exp() * (base_logp - model_top)).sum(1)
    # log of the model's mass outside the base's top-k: log(1 - Σ p_top), stable via log1p(-exp(lse))
    # clamped: rounding can leave a base tail of ~1e-16 where the model's tail rounds to exactly 0
    model_rest = torch.log1p(-torch.logsumexp(model_top, 1).exp().clamp(max=1.0)).clamp(min=-80.0)
    rest = torch.where(torch.isfinite(base_rest), base_rest.exp() * (base_rest - model_rest),
                       torch.zeros_like(base_rest))
    return (kl + rest).clamp(min=0.0)


class GeneralProbe:
    """Measures general ability against the model it was constructed with (see the module docstring).

    Args:
        model, tokenizer: the start model; its next-token distributions on the pairs are cached now.
        max_length: token budget per pair (the run's max_length); longer pairs are cut (``fit_pair``).
        records: {style: records} to measure on (default: ``load_general()``).
        top_k: log-probs kept per response position for the KL (exact KL when ≥ the vocabulary).
        batch_size: pairs per forward pass.
        cache_dir: folder caching the start pass by (weights, pairs, top_k) fingerprint, so the runs of a
            grid that start from the same model share it (default: the epi cache; None = no cache).
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: Optional[int] = None,
                 records: Optional[Dict[str, List[dict]]] = None, top_k: int = 256, batch_size: int = 8,
                 cache_dir: Optional[str | Path] = DEFAULT_CACHE):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.records = records if records is not None else load_general()
        self.top_k, self.batch_size = top_k, batch_size
        self.pad = pad_id(tokenizer)
        # examples: (style, ids, n_prompt), in a fixed order; batches never mix styles
        self.examples: List[Tuple[str, List[int], int]] = []
        for style, recs in self.records.items():
            for p, r in tokenize_records(recs, tokenizer):
                ids, n_prompt = fit_pair(p, r, max_length)
                self.examples.append((style, ids, n_prompt))
        self.batches = []
        for style in self.records:
            # similar lengths share a batch: less padding to compute (the order is fixed, so is every batch)
            mine = sorted((e for e in self.examples if e[0] == style), key=lambda e: len(e[1]))
            self.batches += [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        if cache_dir == DEFAULT_CACHE:
            from ..models import cache_root
            cache_dir = cache_root() / "general"
        # the start model's pass is the costly part: reuse it when the very same weights come back
        self.fingerprint = fingerprint(model)
        where = (self.fingerprint, top_k, [(s, ids, n) for s, ids, n in self.examples])
        device = next(model.parameters()).device
        if device.type != "cpu":  # GPU kernels round differently; CPU keys stay as they were
            where += (device.type,)
        key = hashlib.sha1(repr(where).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"{key}.pt" if cache_dir is not None else None
        if path is not None and path.is_file():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            self.base, self.start = blob["base"], blob["start"]
        else:
            self.base: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            for batch in self.batches:
                logp = self._logp(model, batch)[0]
                k = min(self.top_k, logp.shape[-1])
                top, idx = logp.topk(k, dim=-1)
                # float64, as in _coarse_kl: the start model's KL to itself comes out exactly 0
                rest = torch.log1p(-torch.logsumexp(top.double(), -1).exp().clamp(max=1.0))
                if k == logp.shape[-1]:  # the whole vocabulary is kept: no "other" bucket, the KL is exact
                    rest = torch.full_like(rest, -math.inf)
                # kept on the CPU (as a cached pass comes back); measure() moves each batch to the model
                self.base.append((idx.to(torch.int32).cpu(), top.float().cpu(), rest.cpu()))
            self.start = self.measure(model, reuse_start=False)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                # atomic: parallel runs may write the same entry
                atomic_write(path, lambda tmp: torch.save({"base": self.base, "start": self.start}, tmp))
        log.info("general probe: %d pairs, %d response positions, top_k %d", len(self.examples),
                 sum(b[0].shape[0] for b in self.base), self.top_k)

    @torch.no_grad()
    def _logp(self, model: Any, batch: List[Tuple[str, List[int], int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (log-probs at the response positions (n, V) float32, their target ids (n,)).

        Rows are left-padded (positions from the attention mask), so every reply ends in the last column
        and only the last R+1 columns need logits: the LM head skips the prompts, as in epi.tasks.evaluate.
        """
        width = max(len(ids) for _, ids, _ in batch)
        reply = max(len(ids) - n_prompt for _, ids, n_prompt in batch)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        targets = torch.full((len(batch), reply), IGNORE_INDEX, dtype=torch.long)
        for row, (_, ids, n_prompt) in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
            r = len(ids) - n_prompt
            targets[row, reply - r:] = torch.tensor(ids[n_prompt:], dtype=torch.long)
        device = next(model.parameters()).device
        kwargs = {}
        keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep")
                        if k in inspect.signature(model.forward).parameters), None)
        if keep_kw is not None:
            kwargs[keep_kw] = reply + 1
        was_training = model.training
        model.eval()
        try:
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=False,
                           **kwargs).logits
        finally:
            model.train(was_training)
        logits = logits[:, -(reply + 1):-1]
        targets = targets.to(device)
        keep = targets != IGNORE_INDEX
        return F.log_softmax(logits[keep].float(), dim=-1), targets[keep]

    @torch.no_grad()
    def measure(self, model: Any, reuse_start: bool = True) -> Dict[str, float]:
        """Return {"general_loss", "kl", "general_loss_<style>", "kl_<style>", "n_tokens"} for `model`.

        Losses and KL are means over response tokens (token-weighted), overall and per style. A model
        whose weights equal the start model's (same `fingerprint`) gets the start measurement without a
        forward pass unless `reuse_start=False`.
        """
        if reuse_start and fingerprint(model) == self.fingerprint:
            return dict(self.start)
        sums: Dict[str, List[float]] = {}
        for batch, (idx, top, rest) in zip(self.batches, self.base):
            logp, targets = self._logp(model, batch)
            nll = -logp.gather(1, targets[:, None]).squeeze(1).double()
            kl = _coarse_kl(idx.to(logp.device), top.to(logp.device), rest.to(logp.device), logp)
            style = batch[0][0]
            for key in (style, "all"):
                acc = sums.setdefault(key, [0.0, 0.0, 0])
                acc[0] += float(nll.sum())
                acc[1] += float(kl.sum())
                acc[2] += int(nll.numel())
        total = sums["all"]
        out = {"general_loss": total[0] / total[2], "kl": total[1] / total[2], "n_tokens": total[2]}
        for style in self.records:
            if style in sums:
                s = sums[style]
                out[f"general_loss_{style}"], out[f"kl_{style}"] = s[0] / s[2], s[1] / s[2]
        return out

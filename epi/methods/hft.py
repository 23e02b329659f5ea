"""HFT, Half Fine-Tuning (Hui et al., arXiv 2404.18466): freeze a random half of the parameters, re-drawn per round.

What the paper states (abstract, Figure 2): half of the parameters are selected to learn the new task and the other
half is frozen to keep earlier knowledge; the selection is made "at the category level" and drawn anew in each
training stage (SFT, DPO, each task of a continual-learning sequence). The paper ships no code. The suite reads
"category level" as: within each transformer block, the self-attention matrices form one category and the
feed-forward matrices another, and half of each category is frozen.

What the suite chooses (settings in epi.experiments.profiles):
  hft_unit  "matrix" (default; the suite's reading of the category level): within each transformer block, the
            attention matrices and the feed-forward matrices are two groups, and a random half of each group's
            matrices is frozen whole. A group with an odd count n freezes ⌊n/2⌋ or ⌈n/2⌉ matrices, alternating
            over the blocks from a random start, so the model as a whole freezes half of that group's matrices
            (a Llama block: 2 of q/k/v/o; 1 or 2 of gate/up/down). Half is counted in matrices, as the paper
            counts categories, so the frozen share of coordinates differs from 0.5 when a group's matrices differ
            in size (k/v under grouped-query attention); the run logs the realised share (protected_fraction).
            "element": a random half of the coordinates of each matrix (the reading of HFT as a random mask at
            p = 0.5, balanced per matrix).
  hft_round "stage" (default, the paper's): a new half at the start of every stage — in a one-stage mix that is
            one draw for the whole run; "refresh": also a new half every `refresh_every` optimizer steps, counted
            from step 0 (the mix's stand-in for the paper's rounds; a stage start always draws anew).
  hft_from_stage  0 (default, the paper's): a half is frozen from the first stage on; k > 0: nothing is frozen
            before stage k (0-based), whose start draws the first half. Sequential runs only: with 1, task A is
            trained exactly as full SFT trains it and HFT begins at the stage boundary, as the X2 design's other
            arms do (epi.experiments.x2), so the arms differ in how they protect A, not in how they learned it.
The parameters HFT chooses from are the engine's isolatable tensors (the 2-D weights inside the transformer blocks),
the same ones EPI and the random controls act on; embeddings, the LM head and norms train as in every method.

Frozen means exactly frozen: the half is a mask installed in the one engine (EvolvingIsolation.set_masks), whose
optimizer hooks leave those coordinates unchanged under AdamW and weight decay. Unlike `requires_grad=False`, which
leaves a frozen tensor's optimizer moments untouched, the engine's isolation modes zero a frozen coordinate's first
moment or run its moments on zero gradients (docs/EXACTNESS.md), so a matrix released in a later round does not
resume its old momentum.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..engine.importance import local
from .base import Method, MethodContext
from .random_mask import AfterStep, draw_generator

HFT_UNITS = ("matrix", "element")
HFT_ROUNDS = ("stage", "refresh")

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")
_ATTENTION = re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value", re.IGNORECASE)
_FEED_FORWARD = re.compile(r"mlp|ffn|feed_forward|fc\d|c_fc|c_proj|gate|up_proj|down_proj|w1|w2|w3", re.IGNORECASE)


def categories(names: Sequence[str]) -> Dict[Tuple[str, str], List[int]]:
    """Return {(block, category): indices into `names`}: the groups HFT halves (category "attention",
    "feed_forward", or the tensor's own name when it is neither)."""
    groups: Dict[Tuple[str, str], List[int]] = {}
    for i, name in enumerate(names):
        block = _BLOCK.search(name)
        kind = "attention" if _ATTENTION.search(name) else "feed_forward" if _FEED_FORWARD.search(name) else name
        groups.setdefault((block.group(1) if block else "", kind), []).append(i)
    return groups


def half_masks(names: Sequence[str], shapes: Sequence[torch.Size], unit: str,
               generator: torch.Generator) -> List[torch.Tensor]:
    """Return bool masks (True = frozen) over tensors `names` with `shapes`: half of each block's attention and
    feed-forward matrices ("matrix") or half of each matrix's coordinates ("element"), drawn from `generator`."""
    if unit not in HFT_UNITS:
        raise ValueError(f"hft_unit must be one of {', '.join(map(repr, HFT_UNITS))}, got {unit!r}")
    if unit == "element":
        out = []
        for s in shapes:
            k = int(torch.Size(s).numel())
            flat = torch.zeros(k, dtype=torch.bool)
            flat[torch.randperm(k, generator=generator)[:k // 2]] = True
            out.append(flat.view(s))
        return out
    frozen = [False] * len(names)
    odd_seen: Dict[str, int] = {}  # per category: how many odd-sized groups came before (the alternation)
    phase = int(torch.randint(2, (1,), generator=generator))
    for (_, kind), idx in sorted(categories(names).items(), key=lambda kv: (kv[0][1], _block_order(kv[0][0]))):
        n = len(idx)
        take = n // 2
        if n % 2:
            take += (odd_seen.get(kind, 0) + phase) % 2
            odd_seen[kind] = odd_seen.get(kind, 0) + 1
        for j in torch.randperm(n, generator=generator)[:take].tolist():
            frozen[idx[j]] = True
    return [torch.full(tuple(s), f, dtype=torch.bool) for s, f in zip(shapes, frozen)]


def _block_order(block: str):
    return (0, int(block)) if block else (1, 0)


class HFT(Method):
    """Half Fine-Tuning: a random half of the isolatable parameters frozen exactly, re-drawn at every stage start
    (and every refresh_every steps with hft_round="refresh"); see the module docstring for the unit."""
    name = "hft"

    def __init__(self):
        self.ctx: Optional[MethodContext] = None
        self.draws: List[dict] = []  # {"step", "frozen_share"} of each draw, in order
        self.stage = 0                # the stage in progress (hft_from_stage: no half before it)

    def engine_config(self, ctx):
        return ctx.epi_config(scope="global", refresh_every=None, seed=ctx.config.seed)

    def prepare(self, ctx):
        self.ctx = ctx
        if ctx.config.hft_from_stage > 0:
            # nothing frozen before stage hft_from_stage; an empty forced set also keeps the engine from
            # installing its own importance mask at the end of warm-up
            ctx.engine.set_sets({})

    def stage_start(self, ctx, k, tasks):
        self.stage = k
        if k < ctx.config.hft_from_stage:
            return
        # a resumed run draws this stage's half again; the runner then restores the engine's saved masks
        self.install(f"stage{k}", step=None)

    def plugins(self, ctx):
        return [AfterStep(self)] if ctx.config.hft_round == "refresh" else []

    def after_step(self, n: int) -> None:
        """Draw a new half every refresh_every steps (hft_round="refresh")."""
        every = self.ctx.config.refresh_every
        if every and n % every == 0 and self.stage >= self.ctx.config.hft_from_stage:
            self.install(f"step{n}", step=n)

    def install(self, draw: str, step: Optional[int]) -> None:
        """Freeze the half of draw `draw` (its generator depends on the seed and the draw's name only)."""
        engine, cfg = self.ctx.engine, self.ctx.config
        masks = half_masks(engine.names, [local(p).shape for p in engine.params], cfg.hft_unit,
                           draw_generator(self.name, cfg.seed, draw))
        engine.set_masks(masks)
        share = sum(int(m.sum()) for m in masks) / sum(int(m.numel()) for m in masks)
        entry = {"draw": draw, "step": step, "frozen_share": share}
        if entry not in self.draws:
            self.draws.append(entry)

    def record_extra(self):
        cfg = self.ctx.config
        return {"hft": {"unit": cfg.hft_unit, "round": cfg.hft_round, "from_stage": cfg.hft_from_stage,
                        "draws": list(self.draws)}}

    def state_dict(self):
        return {"draws": list(self.draws)}

    def load_state_dict(self, state):
        self.draws = list(state["draws"])

"""Will it fit? A memory plan per method from the model's shape, the GPU's free memory and the engine's
bytes per parameter.

Per parameter, full fine-tuning with AdamW keeps the weight, its gradient and two moments: 16 bytes in
fp32 (mixed precision keeps fp32 master weights: the same 16, plus a half-precision copy of the weights
that autocast caches during a forward), 8 with `bf16_weights`. The engine adds, per *isolatable* weight
(the 2-D weights inside the transformer blocks) and per scope key (1 in global scope, K tasks in
per-task scope), what `EvolvingIsolation.memory_bytes()` counts:

| structure | default | lean (`importance_dtype="bfloat16"`, `mask_format="index"`) |
|---|---|---|
| importance EMA | 4 | 2 |
| stored top-p set | 1 (bool) | 4·p (int32 indices) |
| first set (drift diagnostics) | 4·p | 4·p |
| per task, the mask in force (per-task scope: the union u ≤ (K−1)·p of the other tasks' sets) | 1 + 4·u | 4·u |
| global scope, the mask in force's int32 index | 4·p | — (the stored set is one) |
| once, the protected values held for the write-back after each step (w = the weights' bytes: 4, or 2 with `bf16_weights`) | w·u (global: w·p) | w·u (global: w·p) |

Global scope in the default format shares its stored set as the mask in force's bool masks. The plan uses the
upper bound u = min(1, (K−1)·p). Activations are a rough estimate (checkpointed hidden
states, one layer's working set and the logits with their fp32 copy and gradient, no s² attention term:
SDPA/flash attention); the plan keeps a safety margin for them and for the allocator.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional

import torch

from ..engine.config import EPIConfig

GIB = 2 ** 30
LEAN = dict(importance_dtype="bfloat16", mask_format="index")
HEADROOM = 0.9  # plan against 90 % of the free memory: fragmentation, the CUDA context, estimate error
SAMPLE_BYTES = 8 * EPIConfig().spearman_sample  # the fixed int64 sample of coordinates for rank drift


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: parameter counts and the sizes that set activations."""
    name: str
    params: int
    isolatable: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int


def model_shape(name: str) -> ModelShape:
    """Return the shape of a model named by an `epi.models.shapes.SHAPES` key, "tiny"/"tiny-base", a local
    folder or a hub id, counted on the meta device (no weights are read or allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..engine.core import isolatable
    from ..models import count_parameters, tiny_config
    from ..models.shapes import SHAPES, shape_config
    if name in SHAPES:
        config = shape_config(name)
    elif name.lower() in ("tiny", "tiny-base"):
        config = tiny_config()
    else:
        config = AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_iso = sum(p.numel() for _, p in isolatable(model, EPIConfig()))
    return ModelShape(name, count_parameters(model), n_iso, config.num_hidden_layers, config.hidden_size,
                      config.intermediate_size, config.vocab_size)


def engine_bytes_per_param(scope: str, n_tasks: int, ratio: float, lean: bool, weight_bytes: int = 4) -> float:
    """Return the engine's persistent bytes per isolatable weight (see the module's table)."""
    p = ratio
    imp = 2 if lean else 4
    stored = 4 * p if lean else 1
    if scope == "global":  # the stored set is the mask in force (shared bools + their index, or the same indices)
        return imp + stored + 4 * p + (0 if lean else 4 * p) + weight_bytes * p
    union = min(1.0, (n_tasks - 1) * p)
    active = 4 * union if lean else 1 + 4 * union
    return n_tasks * (imp + stored + 4 * p + active) + weight_bytes * union


def model_bytes(shape: ModelShape, precision: str) -> int:
    """Return weights + gradients + AdamW moments (+ autocast's half copy of the weights), in bytes."""
    if precision == "bf16_weights":
        return 8 * shape.params
    return (16 + (2 if precision in ("bf16", "fp16") else 0)) * shape.params


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, precision: str,
                     checkpointing: bool) -> int:
    """Return a rough peak of the activations of one micro-batch (bytes)."""
    act = 4 if precision == "fp32" else 2
    # the tensors one block saves for backward, per token (rough: attention inputs/outputs, norms and
    # residuals ≈ 12·h, the SwiGLU MLP's gate, up, activation and product ≈ 4·intermediate)
    block = (12 * shape.hidden + 4 * shape.intermediate) * act
    kept = shape.layers * shape.hidden * act if checkpointing else shape.layers * block
    logits = shape.vocab * (act + 4 + 4)  # logits, their fp32 copy for the loss, its gradient
    return int(micro_batch * seq_len * (kept + (block if checkpointing else 0) + logits))


def estimate(shape: ModelShape, scope: Optional[str], *, n_tasks: int, ratio: float, lean: bool,
             precision: str, micro_batch: int, seq_len: int, checkpointing: bool) -> Dict[str, float]:
    """Return {"model", "engine", "activations", "total"} in GiB for a run with an engine of `scope`
    (None: no engine, plain fine-tuning)."""
    weight_bytes = 2 if precision == "bf16_weights" else 4
    engine = 0.0 if scope is None else (shape.isolatable * engine_bytes_per_param(scope, n_tasks, ratio, lean,
                                                                                  weight_bytes) + SAMPLE_BYTES)
    parts = {"model": model_bytes(shape, precision) / GIB, "engine": engine / GIB,
             "activations": activation_bytes(shape, micro_batch, seq_len, precision, checkpointing) / GIB}
    parts["total"] = sum(parts.values())
    return parts


@dataclass
class Plan:
    """The methods that run, the micro-batch and engine mode they share, and one row per asked method."""
    methods: List[str]
    micro_batch: int
    grad_accum: int
    lean: bool
    budget_gib: Optional[float]
    rows: List[dict] = field(default_factory=list)

    def dropped(self) -> Dict[str, str]:
        """Return {method: why it was left out}."""
        return {r["method"]: r["reason"] for r in self.rows if not r["runs"]}

    def to_dict(self) -> dict:
        return asdict(self)


def _micro_batches(batch_size: int, start: int) -> List[int]:
    """Return the micro-batches to try: divisors of batch_size from `start` down to 1."""
    return [m for m in range(start, 0, -1) if batch_size % m == 0]


def plan(shape: ModelShape, scopes: Mapping[str, Optional[str]], *, n_tasks: int, ratio: float, batch_size: int,
         micro_batch: int, seq_len: int, precision: str, free_gib: Optional[float], engine_memory: str = "auto",
         checkpointing: bool = True) -> Plan:
    """Return the plan that fits `free_gib` (None: no GPU, nothing is checked).

    scopes: {method: engine scope or None}, in the order the methods would run.

    Tries the settings in order — the asked micro-batch with the default engine, then lean (when
    engine_memory is "auto"), then smaller micro-batches (more accumulation, the same batch) — and takes
    the first under which every method that can fit at all fits; a method that fits under none is left
    out with the reason. All methods share the chosen micro-batch and engine mode, so they stay comparable.
    """
    if engine_memory not in ("auto", "default", "lean"):
        raise ValueError(f"engine_memory must be 'auto', 'default' or 'lean', got {engine_memory!r}")
    modes = {"auto": [False, True], "default": [False], "lean": [True]}[engine_memory]
    settings = [(m, lean) for m in _micro_batches(batch_size, micro_batch) for lean in modes]
    budget = None if free_gib is None else HEADROOM * free_gib
    methods = list(scopes)

    def total(method, m, lean):
        return estimate(shape, scopes[method], n_tasks=n_tasks, ratio=ratio, lean=lean, precision=precision,
                        micro_batch=m, seq_len=seq_len, checkpointing=checkpointing)

    if budget is None:
        m, lean = settings[0]
        rows = [{"method": x, **{k: round(v, 2) for k, v in total(x, m, lean).items()}, "runs": True,
                 "reason": "no GPU: not checked"} for x in methods]
        return Plan(methods, m, batch_size // m, lean, None, rows)
    smallest = settings[-1]
    possible = [x for x in methods if total(x, *smallest)["total"] <= budget]
    chosen = next(((m, lean) for m, lean in settings if all(total(x, m, lean)["total"] <= budget for x in possible)),
                  smallest)
    rows = []
    for x in methods:
        parts = total(x, *chosen) if x in possible else total(x, *smallest)
        row = {"method": x, **{k: round(v, 2) for k, v in parts.items()}, "runs": x in possible}
        if x in possible:
            row["reason"] = f"fits: {parts['total']:.1f} of {budget:.1f} GiB"
        else:
            row["reason"] = (f"needs ≈ {parts['total']:.1f} GiB even at micro-batch {smallest[0]}"
                             f"{' with the lean engine' if smallest[1] else ''}; {budget:.1f} GiB usable "
                             f"({HEADROOM:.0%} of {free_gib:.1f} GiB free): use a larger GPU or several")
        rows.append(row)
    return Plan(possible, chosen[0], batch_size // chosen[0], chosen[1], round(budget, 2), rows)

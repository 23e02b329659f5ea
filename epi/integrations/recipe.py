"""The Trainer recipe shared by notebook 07 and examples/train_hf.py.

records → SFT examples (`sft_examples`) in single-task blocks (`epi.hf.task_blocks`) → one
`transformers.Trainer` per method with the same `training_args` (precision from the device:
`choose_precision`) → `run_method` trains one method (`full_sft`; `epi`, global scope; `epi_per_task`)
with `EPICallback` and a `ProtectedDriftSpy`, evaluates it and returns its results.

Works on every transformers version the pyproject allows (>= 4.47; tested on 4.47.0 and 5.24): 4.x has no
`train_sampling_strategy`, so `InOrderTrainer` reads the training set in order instead, and its
checkpointing argument is `gradient_checkpointing` (5.x also accepts `activation_checkpointing`).
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from ..engine.config import EPIConfig
from ..tasks.formatting import collate, fit_example, pad_id, tokenize_records
from ..training.device import choose_precision as device_precision
from .hf import TASK_KEY, EPICallback, EPITrainerMixin, TaskCollator

METHODS: Dict[str, Optional[str]] = {"full_sft": None, "epi": "global", "epi_per_task": "per_task"}  # → scope
PRECISIONS = ("fp32", "bf16", "fp16", "bf16_weights")
SEQUENTIAL_ARG = "train_sampling_strategy" in TrainingArguments.__dataclass_fields__  # transformers >= 5
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                 else "gradient_checkpointing")  # the 4.x name


def choose_precision(requested: str = "auto", *, cuda: bool, capability: Optional[tuple] = None,
                     profile: str = "") -> str:
    """Return the training precision: `requested`, or for "auto" `epi.training.device.choose_precision` (fp32 on CPU,
    bf16 autocast on GPUs of compute capability >= 8, fp16 autocast + GradScaler below: T4) with bf16
    weights instead of bf16 autocast in the `full` profile."""
    if requested != "auto":
        if requested not in PRECISIONS:
            raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {requested!r}")
        if requested == "fp16" and not cuda:
            raise ValueError("precision 'fp16' needs a CUDA GPU (GradScaler); on CPU use 'fp32' or 'bf16'")
        return requested
    chosen = device_precision("cuda" if cuda else "cpu", capability)
    return "bf16_weights" if chosen == "bf16" and profile == "full" else chosen


def weights_dtype(precision: str) -> torch.dtype:
    """Return the dtype the model's weights are loaded in (bf16 only with `bf16_weights`)."""
    return torch.bfloat16 if precision == "bf16_weights" else torch.float32


def sft_examples(task: str, records: Sequence[dict], tokenizer: Any, max_length: int) -> List[dict]:
    """Return [{"input_ids", "n_prompt", "task"}] for the records whose response fits max_length
    (a long prompt is cut from the left; a record whose response alone is too long is dropped)."""
    fitted = (fit_example(p, r, max_length) for p, r in tokenize_records(records, tokenizer))
    return [{"input_ids": ids, "n_prompt": n_prompt, "task": task} for ids, n_prompt, _ in (f for f in fitted if f)]


def task_collator(tokenizer: Any) -> TaskCollator:
    """Return the collator of SFT examples: padded batch, labels on responses only, "task" passed along."""
    pad = pad_id(tokenizer)
    return TaskCollator(lambda feats: collate([(f["input_ids"], f["n_prompt"]) for f in feats], pad))


def without_task(collator: Callable) -> Callable:
    """Return a collator whose batches lack the "task" entry: without EPICallback nothing strips it, and
    models whose forward takes no **kwargs (transformers 4.x) reject it."""
    def collate(features):
        batch = collator(features)
        batch.pop(TASK_KEY, None)
        return batch
    return collate


class InOrderTrainer(Trainer):
    """transformers 4.x: read the training set in order (one process), as train_sampling_strategy="sequential"."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


BaseTrainer = Trainer if SEQUENTIAL_ARG else InOrderTrainer


class EPITrainer(EPITrainerMixin, BaseTrainer):
    """The mixin route: gradients masked before clipping."""


def trainer_class(route: str = "callback", epi: bool = True) -> type:
    """Return the Trainer class of a route ("callback": an unmodified Trainer; "mixin": EPITrainer)."""
    if route not in ("callback", "mixin"):
        raise ValueError(f"route must be 'callback' or 'mixin', got {route!r}")
    return EPITrainer if epi and route == "mixin" else BaseTrainer


def training_args(output_dir: str | Path, *, max_steps: int, micro_batch: int, grad_accum: int, lr: float,
                  weight_decay: float, clip: float, precision: str, seed: int, cuda: bool, quiet: bool = True,
                  checkpointing: bool = False, save_steps: int = 0, logging_steps: int = 0) -> TrainingArguments:
    """Return the TrainingArguments every method shares: constant lr, AdamW + weight decay, clipping,
    accumulation, single-task blocks read in order, mixed precision per `precision`."""
    # TrainingArguments take the mixed precision from this variable unless bf16/fp16 is set, and
    # transformers 4.x writes it back: without this line, an fp32 run after a bf16 one in the same
    # process (a notebook kernel) or under `accelerate launch --mixed_precision` would not be fp32
    os.environ["ACCELERATE_MIXED_PRECISION"] = {"fp32": "no", "fp16": "fp16"}.get(precision, "bf16")
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum, learning_rate=lr, weight_decay=weight_decay,
        lr_scheduler_type="constant", max_grad_norm=clip, bf16=precision in ("bf16", "bf16_weights"),
        fp16=precision == "fp16", use_cpu=not cuda, logging_steps=logging_steps or max(1, max_steps // 30),
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=1,
        report_to=[], disable_tqdm=quiet, remove_unused_columns=False, seed=seed, data_seed=seed,
        dataloader_num_workers=0,
        **({"train_sampling_strategy": "sequential"} if SEQUENTIAL_ARG else {}),
        **({CHECKPOINTING: True, f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}} if checkpointing else {}))


class ProtectedDriftSpy(TrainerCallback):
    """Measure max |Δθ| of the protected coordinates across every optimizer step of an EPI run.

    Register after `EPICallback` (which fixes the step's task first). Records, per optimizer step, the
    step's task, the number of coordinates protected and, for steps with a mask, the largest movement.
    """

    def __init__(self, epi_callback: EPICallback):
        self.epi = epi_callback
        self.drift: List[float] = []
        self.tasks: List[Optional[str]] = []
        self.protected: List[int] = []
        self.before = None

    @staticmethod
    def values(param, mask, index):
        flat = param.detach().reshape(-1)
        return flat[mask.reshape(-1)] if mask is not None else flat[index.long()]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        engine = self.epi.engine
        self.tasks.append(engine.current_task)
        active = engine.active()  # None during the warm-up: nothing is protected yet
        self.protected.append(active.count if active is not None else 0)
        if active is None or active.count == 0:
            self.before = None
            return
        masks = active.protected or [None] * len(engine.params)
        index = active.index or [None] * len(engine.params)
        self.where = list(zip(masks, index))
        self.before = [self.values(p, m, i).clone() for p, (m, i) in zip(engine.params, self.where)]

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.before is None:
            return
        moved = [(self.values(p, m, i) - b).abs().max() for p, (m, i), b in
                 zip(self.epi.engine.params, self.where, self.before) if b.numel()]
        self.drift.append(float(torch.stack(moved).max()))
        self.before = None


def evaluate_model(model, tokenizer, eval_sets: Mapping[str, Sequence[dict]], *, precision: str, device: str,
                   max_new_tokens: int = 256) -> Dict[str, dict]:
    """Return {task: {"score", "loss", "n"}} on held-out records, under the training autocast on CUDA;
    each task's budget is its longest reference + 8 tokens, capped at max_new_tokens."""
    from ..tasks import evaluate
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model.to(device)
    out = {}
    for task, held in eval_sets.items():
        longest = max(len(r) for _, r in tokenize_records(held, tokenizer))
        with torch.autocast(device_type="cuda", dtype=amp or torch.float16,
                            enabled=device.startswith("cuda") and amp is not None):
            out.update(evaluate(model, tokenizer, {task: held}, max_new_tokens=min(max_new_tokens, longest + 8)))
    return out


@dataclass
class Recipe:
    """What every method shares: the base model, the data in block order, the Trainer settings."""
    load_base: Callable[[], tuple]               # a fresh (model, tokenizer) of the base model
    train_order: Sequence[dict]                  # SFT examples in single-task blocks (task_blocks)
    collator: Callable
    evaluate: Callable[[Any], Dict[str, dict]]   # model -> {task: {"score", "loss", "n"}}
    epi_config: Callable[[str], EPIConfig]       # scope -> the engine's config
    output_dir: Path                             # Trainer folders: output_dir/<method>
    max_steps: int
    micro_batch: int
    grad_accum: int
    lr: float
    weight_decay: float
    clip: float
    precision: str
    seed: int
    cuda: bool
    route: str = "callback"
    checkpointing: bool = False
    quiet: bool = True


def run_method(recipe: Recipe, method: str) -> tuple[dict, Optional[dict]]:
    """Fine-tune a fresh copy of the base model with `method`; return (its results, the engine state
    or None for full_sft). Results: scores, timings, losses and, for EPI, the isolation diagnostics."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    model, _ = recipe.load_base()
    model.train()
    callbacks, epi_cb, spy = [], None, None
    if METHODS[method] is not None:
        epi_cb = EPICallback(recipe.epi_config(METHODS[method]))
        spy = ProtectedDriftSpy(epi_cb)
        callbacks = [epi_cb, spy]  # the spy runs after EPICallback has fixed the step's task
    args = training_args(Path(recipe.output_dir) / method, max_steps=recipe.max_steps,
                         micro_batch=recipe.micro_batch, grad_accum=recipe.grad_accum, lr=recipe.lr,
                         weight_decay=recipe.weight_decay, clip=recipe.clip, precision=recipe.precision,
                         seed=recipe.seed, cuda=recipe.cuda, quiet=recipe.quiet,
                         checkpointing=recipe.checkpointing and recipe.cuda)
    trainer = trainer_class(recipe.route, epi_cb is not None)(
        model=model, args=args, train_dataset=list(recipe.train_order),
        data_collator=recipe.collator if epi_cb is not None else without_task(recipe.collator), callbacks=callbacks)
    if recipe.quiet:  # the losses stay in trainer.state.log_history
        trainer.remove_callback(PrinterCallback)
    if recipe.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30 if recipe.cuda else None
    t0 = time.time()
    scores = recipe.evaluate(model)
    out = {"method": method, "scores": scores, "train_s": train_s, "eval_s": time.time() - t0, "peak_gib": peak_gib,
           "steps": trainer.state.global_step,
           "losses": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]}
    state = None
    if epi_cb is not None:
        engine = epi_cb.engine
        out.update(engine_steps=engine.step, history=[dict(h) for h in engine.history],
                   protected_fraction=engine.protected_fraction(None), memory=engine.memory_bytes(),
                   mode=engine.isolator.mode, drift=spy.drift, spy_tasks=spy.tasks, isolated_steps=len(spy.drift),
                   protected_per_step=[n / sum(engine.numels) for n in spy.protected])
        state = engine.state_dict()
        engine.detach()
    del trainer, model, epi_cb, spy
    gc.collect()
    if recipe.cuda:
        torch.cuda.empty_cache()
    return out, state

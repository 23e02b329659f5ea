"""Minimal transformers.Trainer run with EPI (EPICallback) on two EPI-Mini abilities.

CPU, a few seconds:   python examples/train_hf.py
GPU, a hub model:     python examples/train_hf.py --model HuggingFaceTB/SmolLM2-135M-Instruct --bf16 --steps 500
Multi-GPU (FSDP2):    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/train_hf.py \
                          --model HuggingFaceTB/SmolLM2-135M-Instruct --bf16 --steps 500
Add --mixin to mask before gradient clipping (EPITrainerMixin) instead of after (EPICallback).

Per-task scope needs one task per optimizer step on every rank: examples are cut into single-task blocks
of batch × accumulation × world size (epi.hf.task_blocks) and read sequentially. Writes the engine's drift
history to OUT/epi_history.json.
"""
import argparse
import json
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from epi import EPIConfig
from epi.hf import EPICallback, EPITrainerMixin, TaskCollator, task_blocks
from epi.models import load_model
from epi.tasks import generate
from epi.tasks.formatting import collate, fit_example, pad_id, tokenize_records


class EPITrainer(EPITrainerMixin, Trainer):
    pass


def build_examples(tokenizer, abilities, n: int, max_length: int, seed: int) -> dict:
    """Return {ability: [{"input_ids", "n_prompt", "task"}, ...]} of SFT examples that fit max_length."""
    out = {}
    for ability in abilities:
        records = generate(ability, n, seed=seed)
        fitted = (fit_example(p, r, max_length) for p, r in tokenize_records(records, tokenizer))
        out[ability] = [{"input_ids": ids, "n_prompt": n_prompt, "task": ability}
                        for ids, n_prompt, _ in (f for f in fitted if f is not None)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (CPU) or a hub id / local folder")
    p.add_argument("--abilities", nargs="+", default=["math", "code"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--refresh-every", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--scope", default="per_task", choices=["global", "per_task"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--mixin", action="store_true", help="mask before clipping (EPITrainerMixin)")
    p.add_argument("--out", default="artifacts/train_hf")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model, tokenizer = load_model(args.model, seed=args.seed)
    model.train()
    world = int(os.environ.get("WORLD_SIZE", 1))
    block = args.batch_size * args.grad_accum * world
    n = block * args.steps  # enough single-task blocks for every step
    train = task_blocks(build_examples(tokenizer, args.abilities, n, args.max_length, args.seed), block, args.seed)
    pad = pad_id(tokenizer)
    collator = TaskCollator(lambda feats: collate([(f["input_ids"], f["n_prompt"]) for f in feats], pad))

    config = EPIConfig(ratio=args.ratio, refresh_every=args.refresh_every, warmup_steps=args.warmup_steps,
                       scope=args.scope, seed=args.seed)
    epi = EPICallback(config)
    targs = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=0.1,
        lr_scheduler_type="constant", max_grad_norm=1.0, bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
        logging_steps=max(1, args.steps // 10), save_steps=max(1, args.steps // 2), save_total_limit=1,
        report_to=[], remove_unused_columns=False, train_sampling_strategy="sequential", seed=args.seed)
    cls = EPITrainer if args.mixin else Trainer
    trainer = cls(model=model, args=targs, train_dataset=train, data_collator=collator, callbacks=[epi])
    trainer.train()

    engine = epi.engine
    if trainer.is_world_process_zero():
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "epi_history.json").write_text(json.dumps(engine.history, indent=1))
        last = engine.history[-1] if engine.history else {}
        per = " (per task, mean)" if config.scope == "per_task" else ""
        print(f"EPI {engine.state}: step {engine.step}, {len(engine.history)} mask refreshes, protected "
              f"{engine.protected_fraction(None):.4f} of isolatable weights{per}, "
              f"last Jaccard to previous mask {last.get('jaccard_prev')}")


if __name__ == "__main__":
    main()

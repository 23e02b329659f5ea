"""Minimal transformers.Trainer run with EPI (EPICallback) on two EPI-Mini abilities.

CPU, a few seconds:   python examples/train_hf.py
GPU, a hub model:     python examples/train_hf.py --model HuggingFaceTB/SmolLM2-135M-Instruct --steps 500
Multi-GPU (DDP):      torchrun --nproc_per_node=8 examples/train_hf.py --model HuggingFaceTB/SmolLM2-135M-Instruct --steps 500
Multi-GPU (FSDP2):    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/train_hf.py \
                          --model HuggingFaceTB/SmolLM2-135M-Instruct --steps 500
--precision auto (the default) picks fp32 on CPU, bf16 autocast on GPUs with bf16 (compute capability >= 8)
and fp16 autocast + GradScaler on older ones (T4). Add --mixin to mask before gradient clipping
(EPITrainerMixin) instead of after (EPICallback).

The recipe (SFT examples, TrainingArguments, Trainer classes) is epi.integrations.recipe's, shared with notebook 07;
it runs on transformers 4.47 and later. Per-task scope needs one task per optimizer step on every rank:
examples are cut into single-task blocks of batch × accumulation × world size (epi.hf.task_blocks) and
read in order. Writes the engine's drift history to OUT/epi_history.json.
"""
import argparse
import json
import os
from pathlib import Path

import torch

from epi import EPIConfig
from epi.integrations.hf import EPICallback, task_blocks
from epi.integrations.recipe import (PRECISIONS, choose_precision, sft_examples, task_collator, trainer_class,
                                     training_args, weights_dtype)
from epi.models import load_model
from epi.tasks import generate


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
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                   help="auto: fp32 on CPU, bf16 on GPUs with bf16, fp16 (GradScaler) on a T4")
    p.add_argument("--bf16", action="store_true", help="the same as --precision bf16 (kept for old commands)")
    p.add_argument("--mixin", action="store_true", help="mask before clipping (EPITrainerMixin)")
    p.add_argument("--out", default="artifacts/train_hf")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    precision = choose_precision("bf16" if args.bf16 else args.precision, cuda=cuda, capability=capability)
    model, tokenizer = load_model(args.model, seed=args.seed, dtype=weights_dtype(precision))
    model.train()
    world = int(os.environ.get("WORLD_SIZE", 1))
    block = args.batch_size * args.grad_accum * world
    n = block * args.steps  # enough single-task blocks for every step
    examples = {a: sft_examples(a, generate(a, n, seed=args.seed), tokenizer, args.max_length) for a in args.abilities}
    train = task_blocks(examples, block, args.seed)

    config = EPIConfig(ratio=args.ratio, refresh_every=args.refresh_every, warmup_steps=args.warmup_steps,
                       scope=args.scope, seed=args.seed)
    epi = EPICallback(config)
    targs = training_args(args.out, max_steps=args.steps, micro_batch=args.batch_size, grad_accum=args.grad_accum,
                          lr=args.lr, weight_decay=0.1, clip=1.0, precision=precision, seed=args.seed, cuda=cuda,
                          quiet=bool(os.environ.get("TQDM_DISABLE")), save_steps=max(1, args.steps // 2),
                          logging_steps=max(1, args.steps // 10))
    trainer = trainer_class("mixin" if args.mixin else "callback")(
        model=model, args=targs, train_dataset=train, data_collator=task_collator(tokenizer), callbacks=[epi])
    trainer.train()

    engine = epi.engine
    if trainer.is_world_process_zero():
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "epi_history.json").write_text(json.dumps(engine.history, indent=1))
        last = engine.history[-1] if engine.history else {}
        per = " (per task, mean)" if config.scope == "per_task" else ""
        print(f"EPI {engine.state} ({precision}): step {engine.step}, {len(engine.history)} mask refreshes, protected "
              f"{engine.protected_fraction(None):.4f} of isolatable weights{per}, "
              f"last Jaccard to previous mask {last.get('jaccard_prev')}")


if __name__ == "__main__":
    main()
    # under torchrun the Trainer leaves the process group open; Gloo's worker threads torn down at interpreter exit
    # can abort a rank ("terminate called without an active exception"), so close it while Python still lives (only
    # after a clean finish: destroying it while another rank is inside a collective could hang)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Distributed EPI: FSDP2 helpers and a small DDP / FSDP2 experiment entry point.

    python -m torch.distributed.run --nproc_per_node=2 -m epi.distributed --out DIR --mode ddp fsdp2 single

trains the tiny Llama with the engine on deterministic per-rank shards of one global batch per step and
writes DIR/<mode>-<scope>/results.json (per-rank mask digests, losses) and final.pt (full weights and
gathered masks, rank 0). "single" runs on rank 0 only, unsharded, with the whole global batch: the
reference the distributed runs must match.

What the engine needs from each back-end, and which back-ends it refuses, is epi.engine.backends
(docs/distributed.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..engine.backends import shard_group
from ..engine.config import EPIConfig
from ..engine.core import EvolvingIsolation, to_bool
from ..engine.importance import local
from ..engine.masks import masks_digest
from ..jsonio import write_json
from ..models.shapes import small_llama

log = logging.getLogger(__name__)

# global batch s is drawn from seed * BATCH_SEED_STRIDE + BATCH_SEED_OFFSET + s: a pure function of (seed, s), the
# same on every rank; two seeds' streams stay apart for runs shorter than the stride
BATCH_SEED_STRIDE = 100_003
BATCH_SEED_OFFSET = 1000


def _full(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return the full tensor of a local shard `t` laid out like parameter `like` (collective if sharded)."""
    if not hasattr(like, "device_mesh"):
        return t
    from torch.distributed.tensor import DTensor

    dtype = t.dtype
    t = t.to(torch.uint8) if dtype == torch.bool else t  # gloo gathers no bool
    full = DTensor.from_local(t, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()
    return full.bool() if dtype == torch.bool else full


def gather_masks(engine: EvolvingIsolation) -> Dict[str, List[torch.Tensor]]:
    """Return every scope key's protected set as full bool tensors (all ranks must call it under FSDP2)."""
    return {key: [_full(to_bool(m, local(p)), p).cpu() for m, p in zip(entries, engine.params)]
            for key, entries in sorted(engine.sets.items())}


# ---- the experiment ---------------------------------------------------------------------------------------
def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Apply FSDP2 `fully_shard` to every block of the model's ModuleLists, then to the root (in place)."""
    from torch.distributed.fsdp import fully_shard

    for m in list(model.modules()):
        if isinstance(m, torch.nn.ModuleList):
            for block in m:
                fully_shard(block)
    fully_shard(model)
    return model


def _init_process_group() -> None:
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def run_distributed(out: str | os.PathLike, *, mode: str = "ddp", config: Optional[EPIConfig] = None,
                    steps: int = 12, global_batch: int = 8, seq: int = 12, lr: float = 1e-2,
                    weight_decay: float = 0.1, clip: Optional[float] = 1.0, seed: int = 0) -> dict:
    """Train the tiny Llama with EPI under `mode` ("ddp", "fsdp2" or "single") and return rank's results.

    Step s trains on global batch s (a pure function of seed and s; task = ("a", "b")[s % 2]); rank r of W
    takes rows r·B/W … (r+1)·B/W − 1. Writes `out/results.json` (rank 0; every rank's mask digest under
    "digests") and `out/final.pt` (full weights, gathered masks). Call under torchrun for "ddp"/"fsdp2"
    (a process group is created from the environment); "single" uses no process group.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..training.loop import LoopState, train_steps

    if mode not in ("ddp", "fsdp2", "single"):
        raise ValueError(f"mode must be 'ddp', 'fsdp2' or 'single', got {mode!r}")
    config = config or EPIConfig(ratio=0.1, refresh_every=3, warmup_steps=2, beta=0.8)
    if mode != "single":
        _init_process_group()
        if not dist.is_initialized():
            raise RuntimeError(f"mode={mode!r} needs a process group: launch with torch.distributed.run")
    world, rank = (dist.get_world_size(), dist.get_rank()) if mode != "single" else (1, 0)
    if global_batch % world:
        raise ValueError(f"global_batch={global_batch} must be divisible by world_size={world}")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    model = small_llama(seed).to(device)
    if mode == "fsdp2":
        model = shard_model(model)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if mode == "ddp" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay,
                                  foreach=False)
    engine = EvolvingIsolation(model, config, group=shard_group(model)).attach(optimizer)

    def batch_fn(step: int):
        g = torch.Generator().manual_seed(seed * BATCH_SEED_STRIDE + BATCH_SEED_OFFSET + step)
        x = torch.randint(0, model.config.vocab_size, (global_batch, seq), generator=g).chunk(world)[rank]
        x = x.to(device)
        return ("a", "b")[step % 2], {"input_ids": x, "labels": x}

    state = train_steps(net, optimizer, batch_fn, steps=steps, state=LoopState(), engine=engine, clip=clip)
    losses = torch.tensor(state.losses, dtype=torch.float64, device=device)
    if world > 1:  # equal shards: the mean of the shard means is the global-batch mean
        dist.all_reduce(losses)
        losses /= world
    masks = gather_masks(engine)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
               for k, v in model.state_dict().items()}
    result = {"mode": mode, "rank": rank, "world_size": world, "steps": steps, "global_batch": global_batch,
              "config": config.to_dict(), "losses": losses.cpu().tolist(), "state": engine.state,
              "mask_digest": engine.mask_digest(), "full_mask_digest": masks_digest(masks),
              "refresh_steps": [h["step"] for h in engine.history]}
    if world > 1:
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, result["mask_digest"])
        result["digests"] = gathered
    else:
        result["digests"] = [result["mask_digest"]]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"results_rank{rank}.json", result)
    if rank == 0:
        write_json(out / "results.json", result)
        torch.save({"weights": weights, "masks": masks}, out / "final.pt")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: run each (mode, scope) pair in turn; outputs go to OUT/<mode>-<scope>/."""
    p = argparse.ArgumentParser(prog="python -m epi.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--mode", nargs="+", default=["ddp"], choices=["ddp", "fsdp2", "single"])
    p.add_argument("--scope", nargs="+", default=["global"], choices=["global", "per_task"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--refresh-every", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if any(m != "single" for m in args.mode):
        _init_process_group()
    rank = dist.get_rank() if dist.is_initialized() else 0
    for mode in args.mode:
        for scope in args.scope:
            if mode == "single" and rank != 0:
                continue
            cfg = EPIConfig(ratio=args.ratio, refresh_every=args.refresh_every, warmup_steps=args.warmup_steps,
                            beta=0.8, scope=scope, seed=args.seed)
            res = run_distributed(Path(args.out) / f"{mode}-{scope}", mode=mode, config=cfg, steps=args.steps,
                                  global_batch=args.global_batch, seed=args.seed)
            log.info("%s-%s rank %d: final loss %.5f, mask digest %s", mode, scope, rank, res["losses"][-1],
                     res["full_mask_digest"])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Seen on the loaded 2-core CI machine: a gloo worker thread aborted the process during interpreter
    # teardown ("terminate called without an active exception") after every result was written.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

"""What the engine needs from each training back-end, and the ones it refuses (docs/distributed.md).

  DDP   — gradients are all-reduced during backward, so observe after backward sees the global gradient and
          every rank computes the same importance and masks: no group, no communication.
  FSDP2 — parameters are DTensor shards; the engine keeps shard-local buffers and passes the shard group so
          the top-p threshold and layer means are all-reduced (`shard_group`).
  FSDP1 and DeepSpeed are refused by `check_supported` with what to use instead.

The DDP / FSDP2 experiment entry point that exercises these is epi.integrations.distributed.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

_UNSUPPORTED_HINT = "use FSDP2 (torch.distributed.fsdp.fully_shard; accelerate fsdp_version: 2) or DDP"


def _is_deepspeed(obj: Any) -> bool:
    cls = type(obj)
    return cls.__module__.split(".")[0] == "deepspeed" or cls.__name__.startswith("DeepSpeed")


def check_supported(model: torch.nn.Module, optimizer: Any = None) -> None:
    """Raise NotImplementedError for back-ends whose parameters or hooks the engine cannot address.

    FSDP1 (FullyShardedDataParallel) flattens parameters into FlatParameters (use_orig_params=False) or 1-D
    views of unspecified layout (True); DeepSpeed ZeRO keeps gradients in flat fp32 partitions
    (`param.grad` is None) and fires every Trainer hook after its update.
    """
    for m in model.modules():
        if type(m).__name__ == "FullyShardedDataParallel":
            raise NotImplementedError(f"FSDP1 (FullyShardedDataParallel) is not supported: per-element masks need "
                                      f"unflattened parameters; {_UNSUPPORTED_HINT}")
    if any(getattr(p, "_is_flat_param", False) for p in model.parameters()):
        raise NotImplementedError(f"FSDP1 FlatParameter found: per-element masks need unflattened parameters; "
                                  f"{_UNSUPPORTED_HINT}")
    chain, opt = [model], optimizer
    while opt is not None and len(chain) < 8:
        chain.append(opt)
        opt = getattr(opt, "optimizer", None)
    if any(_is_deepspeed(o) for o in chain):
        raise NotImplementedError(f"DeepSpeed is not supported: ZeRO keeps gradients in flat fp32 partitions and "
                                  f"steps before any Trainer hook; {_UNSUPPORTED_HINT}")


def shard_group(model: torch.nn.Module):
    """Return the process group over which the model's parameters are sharded (FSDP2), else None.

    DDP and single-device models are replicated: the engine must then NOT reduce over ranks (k and the
    layer means would count every coordinate world_size times). HSDP (replicate × shard): the shard dim.
    """
    for p in model.parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is None:
            continue
        dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
        if not dims:
            return None
        if len(dims) > 1:
            raise NotImplementedError("parameters sharded over several mesh dimensions (e.g. FSDP × TP) are not "
                                      "supported; shard over one dimension (FSDP2 or HSDP)")
        return mesh.get_group(dims[0])
    return None


def assert_same_task(task: str, device: torch.device) -> None:
    """Raise ValueError unless every rank's optimizer step has this task (no-op on one process).

    Per-task masks differ by task: ranks on different tasks would let DDP replicas diverge, and FSDP2
    collectives in a refresh would not match up.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    h = int.from_bytes(hashlib.sha256(task.encode()).digest()[:7], "big")
    t = torch.tensor([h, -h], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != h or int(t[1]) != -h:
        raise ValueError(f"ranks disagree on the task of this optimizer step (rank {dist.get_rank()}: {task!r}); "
                         "with scope='per_task' every rank must train the same task each step")

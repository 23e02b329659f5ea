"""Device and precision of a run: where the model lives, and how its training forwards compute.

  device     "auto" (CUDA when present, else CPU) | "cpu" | "cuda" | "cuda:N"
  precision  "auto" | "fp32" | "bf16" | "fp16"; auto = bf16 on GPUs with native bf16 (capability >= 8.0),
             fp16 on older GPUs (T4 class, 7.5), fp32 on CPU

"bf16"/"fp16" mean: train-mode forwards run under torch.autocast (installed as forward hooks, so they
travel with deepcopy into CPI-FT's probes), backward runs in the forward's dtypes, while the weights,
AdamW, clipping and every eval-mode forward (evaluation, general probe) stay fp32. "fp16" adds a
GradScaler (fp16 gradients underflow without one). "bf16" on CPU is exactly what the `real_cpu` profile
always did (its `bf16_autocast` flag, which this setting replaced).

The device says how a run executes (like `threads`); the precision changes its numbers, so a finished
run's settings check compares the precision it resolved to (epi.experiments.runner.check_same_settings).
"""
from __future__ import annotations

import logging
import os
import re
from typing import List, Optional, Tuple

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device: str, field: str = "device") -> None:
    """Raise a ValueError naming `field` when `device` is misspelt or names a CUDA device this machine lacks."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ValueError(f"{field} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{field}={device!r} but this machine has no CUDA device (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use {field}='auto' or 'cpu'")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"{field}={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


def resolve_device(device: str = "auto") -> torch.device:
    """Return the torch device of a `device` setting ("auto": cuda:<current> when CUDA is present, else cpu)."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def choose_precision(device_type: str, capability: Optional[Tuple[int, int]] = None) -> str:
    """Return the automatic precision for a device: "bf16" on GPUs of compute capability >= 8.0 (native
    bf16: A100, L4, H100), "fp16" (with a GradScaler) below (T4, V100), "fp32" on CPU and anything else.

    A pure function of (device type, capability), so the choice is testable without the hardware.
    """
    if device_type != "cuda":
        return "fp32"  # CPU autocast is slower than fp32 for small models; real_cpu asks for bf16 explicitly
    if capability is None:
        raise ValueError("choose_precision('cuda', ...) needs the GPU's compute capability, e.g. (7, 5)")
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def resolve_precision(precision: str, device: torch.device) -> str:
    """Return the concrete precision ("fp32" | "bf16" | "fp16") of a `precision` setting on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if precision == "auto":
        return choose_precision(device.type, capability)
    if precision == "bf16" and capability is not None and tuple(capability) < (8, 0):
        log.warning("precision='bf16' on a GPU of capability %s: emulated and slow; 'auto' picks fp16 here",
                    capability)
    return precision


def needs_scaler(precision: str) -> bool:
    """Return True when a precision needs loss scaling (fp16: small gradients underflow to zero)."""
    return precision == "fp16"


def make_scaler(precision: str, device: torch.device):
    """Return a GradScaler for fp16 on `device`, else None."""
    if not needs_scaler(precision):
        return None
    device = torch.device(device)
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):  # torch >= 2.3 (also for CPU)
        return torch.amp.GradScaler(device.type)
    if device.type == "cuda":
        return torch.cuda.amp.GradScaler()
    raise ValueError(f"precision='fp16' on {device.type} needs torch >= 2.3 (torch.amp.GradScaler); "
                     f"this is torch {torch.__version__}: use precision='bf16' or 'fp32'")


def autocast_training_forward(model: torch.nn.Module, precision: str) -> List:
    """Run the model's train-mode forwards under autocast in `precision` ("bf16" | "fp16"); return the hook
    handles. Hooks, not a context around the loop: deepcopy keeps them, eval-mode forwards stay fp32, and
    clipping and the optimizer step never run under autocast (measured on SmolLM2: one autocast context
    around the whole loop kept it from learning at all)."""
    dtype = AUTOCAST_DTYPES[precision]
    device = next(model.parameters()).device.type
    active: list = []

    def enter(module, args):
        if module.training:
            active.append(torch.autocast(device, dtype=dtype))
            active[-1].__enter__()

    def leave(module, args, output):
        if module.training and active:
            active.pop().__exit__(None, None, None)
    return [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]


def record_precision(settings: dict, resolved: Optional[str] = None) -> str:
    """Return the precision a finished run computed in: `resolved` (its record's "precision"), else, for
    records made before the setting existed, "bf16" when its settings had bf16_autocast on, else "fp32"
    (an old record's "auto" ran on CPU, where auto means fp32)."""
    if resolved:
        return resolved
    given = settings.get("precision", "auto")
    if given not in (None, "auto"):
        return given
    return "bf16" if settings.get("bf16_autocast") else "fp32"


def describe(device: torch.device) -> str:
    """Return a device for people: "cuda:0 (NVIDIA T4)" or "cpu (x86_64)"."""
    import platform
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def to_device(batch: dict, device: torch.device) -> dict:
    """Return the batch's tensors on `device` (non-blocking copies; the same tensors when already there)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def solo_threads(minimum: int = 1) -> int:
    """Return the torch threads for work that runs alone on the machine (a base build, a notebook's own training
    cells): every core, up to 8 (more were never measured here), and never fewer than `minimum` (the profile's).

    Training the tiny models is bit-identical at 1 and 2 threads on this suite's x86-64 CPU (a 2,000-step
    tiny-base build, weights, importance and scores; tests/test_base_seed.py), so such work may take every core
    and still match runs made one thread per worker. $EPI_SOLO_THREADS caps it where such work is not alone after
    all: `make test` runs two test workers side by side and sets it to 1 (at 2 threads each, the 2 cores
    oversubscribed made a smoke base build ~3x slower).
    """
    cap = int(os.environ.get("EPI_SOLO_THREADS") or 8)
    return max(minimum, min(os.cpu_count() or 1, cap))


"""Engine benchmark: ratios measured in one run (machines are noisy; ratios travel, seconds do not).

  python -m epi bench [--shapes tiny,smollm2-135m] [--reps 7] [--min-seconds 20] [--threads 2,1] [--device cpu]

Prints, per model shape: EPI training step vs plain fused-AdamW step (interleaved, same batches),
refresh time vs torch.cat + kthvalue on the same importance values (and that both agree exactly), and
the engine's persistent bytes per isolatable parameter in the default and lean (bf16 + index) modes.
On CUDA the models are bf16 and the table adds the peak GPU memory of each training setup
(`epi.gpu_check` runs this on the GPU shapes and writes the numbers to results/gpu/).
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Dict, List, Sequence, Tuple

import torch

from .engine.config import EPIConfig
from .engine.core import EvolvingIsolation
from .engine.masks import layer_scales, radix_threshold
from .models.shapes import SHAPES, random_model

def _model(shape: str, device: str, dtype: torch.dtype, seed: int = 0):
    return random_model(shape, device, dtype, seed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated(device) if device.startswith("cuda") else 0


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _peak_since(device: str, baseline: int) -> int:
    return torch.cuda.max_memory_allocated(device) - baseline if device.startswith("cuda") else 0


def _step(model, opt, batch, iso=None) -> Tuple[float, float]:
    """Run one training step; return its (forward + backward, rest) seconds. The rest is everything the engine
    adds to (observe, the optimizer hooks) plus what both kinds of step do after backward (clip, step, zero_grad)."""
    device = str(batch["input_ids"].device)
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    _sync(device)
    t1 = time.perf_counter()
    if iso is not None:
        iso.observe("bench")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def _quartiles(values: Sequence[float]) -> Tuple[float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def step_ratio(shape: str, *, batch: int, seq: int, reps: int, device: str, dtype: torch.dtype,
               config: EPIConfig, min_seconds: float = 0.0) -> dict:
    """Return the step ratio (EPI step / plain fused-AdamW step) and what it is made of.

    The steps alternate plain, EPI, plain, …, plain on the same batch, each timed in two segments: forward +
    backward, where the engine does nothing (no hooks there), and the rest (EPI: observe, clip, AdamW's step with
    the engine's hooks, zero_grad; plain: the same without the engine). A whole 3 s step varies by ±5 % on the
    shared 2-core machine, more than the engine's ≈ 3 %: the median of whole-step ratios printed 1.004 (7 steps)
    and 1.034 (15 steps) in two runs of the same code. So the ratio is `(F + R_epi) / (F + R_plain)`, with F the median
    forward + backward over every step of both kinds (the same work) and R the median rest of each kind:
    its noise is the rest's (tens of ms), not the step's. At least `reps` EPI steps, more until `min_seconds` of
    steps have been timed (the tiny shape's 40 ms steps: hundreds), at most 100 × reps. Also returned, to check
    that reading: `fb_ratio`, the median forward + backward of the EPI steps over the plain ones (≈ 1 when the engine does not
    slow them down), and `paired_ratio` with its quartiles, the median of each whole EPI step over the mean of
    the plain steps either side (the noisy direct measurement).

    On CUDA also the peak GPU memory (GiB) of each setup on its own during its warm-up steps (weights,
    AdamW state, gradients, activations; EPI: + engine and its first refresh): `plain_peak_gib`, `epi_peak_gib`.
    """
    fused = dict(fused=True) if device == "cpu" or device.startswith("cuda") else {}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=g).to(device)
    data = {"input_ids": x, "labels": x}
    warmup = max(2, config.warmup_steps + 1)  # warm-up and first mask before timing
    # one setup after the other, so each peak counts only what that setup added to the GPU
    baseline = _allocated(device)
    _reset_peak(device)
    plain = _model(shape, device, dtype)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.1, **fused)
    for _ in range(warmup):
        _step(plain, opt_p, data)
    plain_peak = _peak_since(device, baseline)
    baseline = _allocated(device)
    _reset_peak(device)
    epi = _model(shape, device, dtype)
    opt_e = torch.optim.AdamW(epi.parameters(), lr=1e-4, weight_decay=0.1, **fused)
    iso = EvolvingIsolation(epi, config).attach(opt_e)
    for _ in range(warmup):
        _step(epi, opt_e, data, iso)
    epi_peak = _peak_since(device, baseline)
    tp, te = [_step(plain, opt_p, data)], []
    start = time.perf_counter()
    # interleaved: both see the same machine state; short steps repeat until `min_seconds` have been timed
    while len(te) < reps or (time.perf_counter() - start < min_seconds and len(te) < 100 * reps):
        te.append(_step(epi, opt_e, data, iso))
        tp.append(_step(plain, opt_p, data))
    fb = statistics.median([f for f, _ in tp + te])
    rest_p, rest_e = statistics.median([r for _, r in tp]), statistics.median([r for _, r in te])
    whole_p, whole_e = [f + r for f, r in tp], [f + r for f, r in te]
    paired = [e / ((a + b) / 2) for e, a, b in zip(whole_e, whole_p, whole_p[1:])]
    q1, q3 = _quartiles(paired)
    out = {"plain_s": fb + rest_p, "epi_s": fb + rest_e, "ratio": (fb + rest_e) / (fb + rest_p),
           "engine_s": rest_e - rest_p, "fb_s": fb,
           "fb_ratio": statistics.median([f for f, _ in te]) / statistics.median([f for f, _ in tp]),
           "paired_ratio": statistics.median(paired), "paired_q1": q1, "paired_q3": q3, "epi_steps": len(te),
           "protected": iso.protected_fraction(), "mode": iso.isolator.mode}
    if device.startswith("cuda"):
        out.update(plain_peak_gib=plain_peak / 2**30, epi_peak_gib=epi_peak / 2**30)
    iso.detach()
    del plain, epi, opt_p, opt_e, iso
    _release(device)
    return out


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def refresh_ratio(shape: str, *, device: str, ratio: float = 0.05, reps: int = 3) -> dict:
    """Return radix-select vs cat+kthvalue times on importance shaped like the model's block matrices.

    Both run on `device` (on CUDA, kthvalue falls back to the CPU copy if the device refuses it, e.g. out
    of memory; `kthvalue_device` says where it ran)."""
    model = _model(shape, "meta", torch.float32)
    cfg = EPIConfig()
    names = [n for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    cuda = device.startswith("cuda")
    g = torch.Generator(device=device if cuda else "cpu").manual_seed(0)
    # on CUDA drawn there: a 1.5B shape's billion CPU draws would take longer than the measurement
    imp = [torch.rand(s, generator=g, device=device if cuda else "cpu").to(device) ** 4 for s in shapes]
    numels = [t.numel() for t in imp]
    k = int(round(ratio * sum(numels)))
    scales = layer_scales(imp, cfg.normalize, numels)
    tr, tk = [], []
    kth_device = device
    for _ in range(reps):
        t0 = time.perf_counter()
        thr = radix_threshold(imp, k, scales=scales)
        _sync(device)
        tr.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        flat = torch.cat([(t / s).reshape(-1) for t, s in zip(imp, scales)])
        try:
            ref = torch.kthvalue(flat if kth_device == device else flat.cpu(), flat.numel() - k + 1).values
        except RuntimeError:
            if not cuda:
                raise
            kth_device = "cpu"
            ref = torch.kthvalue(flat.cpu(), flat.numel() - k + 1).values
        _sync(device)
        tk.append(time.perf_counter() - t0)
        del flat
    out = {"values": sum(numels), "radix_s": min(tr), "kthvalue_s": min(tk), "ratio": min(tr) / min(tk),
           "exact": float(thr) == float(ref)}
    if cuda:
        out["kthvalue_device"] = kth_device
    del imp
    _release(device)
    return out


def bytes_per_param(shape: str, config: EPIConfig, device: str = "cpu") -> dict:
    """Return the engine's persistent bytes per isolatable parameter after one refresh and one step (fp32 weights;
    the same numbers on every device, `device` only sets where the work runs)."""
    model = _model(shape, device, torch.float32)
    iso = EvolvingIsolation(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    iso.attach(opt)
    for p in iso.params:
        p.grad = torch.rand_like(p)
    iso.observe("bench")
    iso.refresh()
    iso.active()
    opt.step()  # one step under the mask: the protected values held for the write-back count too
    iso.active()  # the mask in force after that step (it may have refreshed): steady state holds both
    mem = iso.memory_bytes()
    n = mem["params"]
    out = {"importance": mem["importance"] / n, "masks": mem["masks"] / n, "diagnostics": mem["diagnostics"] / n}
    out["engine"] = out["importance"] + out["masks"]
    iso.detach()
    del model, iso, opt
    _release(device)
    return out


def configs() -> Dict[str, EPIConfig]:
    """Return the two engine settings measured: "default" (fp32 importance, bool masks) and "lean"."""
    return {"default": EPIConfig(ratio=0.05, refresh_every=50, warmup_steps=1),
            "lean": EPIConfig(ratio=0.05, refresh_every=50, warmup_steps=1, importance_dtype="bfloat16",
                              mask_format="index")}


def measure(shape: str, *, reps: int = 7, device: str = "cpu", batch: int = 4, seq: int = 128,
            min_seconds: float = 0.0) -> dict:
    """Return every measurement of one shape: params, step / lean_step (`step_ratio`), refresh
    (`refresh_ratio`), bytes / lean_bytes (`bytes_per_param`); bf16 weights on CUDA, fp32 elsewhere."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cfg = configs()
    out = {"shape": shape, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "seq": seq,
           "reps": reps, "params": sum(p.numel() for p in _model(shape, "meta", torch.float32).parameters())}
    for key, config in (("step", cfg["default"]), ("lean_step", cfg["lean"])):
        out[key] = step_ratio(shape, batch=batch, seq=seq, reps=reps, device=device, dtype=dtype, config=config,
                              min_seconds=min_seconds)
    out["refresh"] = refresh_ratio(shape, device=device)
    out["bytes"] = bytes_per_param(shape, cfg["default"], device)
    out["lean_bytes"] = bytes_per_param(shape, cfg["lean"], device)
    return out


def table(results: List[dict]) -> str:
    """Return the markdown table of `measure` results (a peak-memory column when measured on CUDA)."""
    peak = any("epi_peak_gib" in r["step"] for r in results)
    rows = ["| shape | params | threads | plain step (s) | EPI step (s) | step ratio | engine (ms/step) | fwd+bwd EPI/plain "
            "| whole-step paired ratio [IQR] | lean step ratio | refresh radix (s) | cat+kthvalue (s) | refresh ratio "
            "| exact | B/param default (+diag) | B/param lean (+diag) |" + (" peak GiB plain / EPI / lean |" if peak else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if peak else "")]
    for m in results:
        s, s_lean, r, b, bl = m["step"], m["lean_step"], m["refresh"], m["bytes"], m["lean_bytes"]
        row = (f"| {m['shape']} | {m['params'] / 1e6:.1f}M | {m.get('threads', '')} | {s['plain_s']:.3f} | {s['epi_s']:.3f} | {s['ratio']:.3f} "
               f"| {s['engine_s'] * 1e3:.0f} | {s['fb_ratio']:.3f} "
               f"| {s['paired_ratio']:.3f} [{s['paired_q1']:.3f}, {s['paired_q3']:.3f}] "
               f"| {s_lean['ratio']:.3f} | {r['radix_s']:.3f} | {r['kthvalue_s']:.3f} | {r['ratio']:.2f} "
               f"| {r['exact']} | {b['engine']:.2f} (+{b['diagnostics']:.2f}) "
               f"| {bl['engine']:.2f} (+{bl['diagnostics']:.2f}) |")
        if peak:
            row += (f" {s.get('plain_peak_gib', float('nan')):.2f} / {s.get('epi_peak_gib', float('nan')):.2f} "
                    f"/ {s_lean.get('epi_peak_gib', float('nan')):.2f} |")
        rows.append(row)
    return "\n".join(rows)


def run(shapes: List[str], reps: int = 7, device: str = "cpu", batch: int = 4, seq: int = 128,
        threads: Sequence[int] = (0,), min_seconds: float = 0.0) -> str:
    """Run every measurement, each shape at each torch thread count (0 = leave torch's default), and return a
    markdown table (also printed by the CLI)."""
    results = []
    for shape in shapes:
        for t in threads:
            if t:
                torch.set_num_threads(t)
            results.append({**measure(shape, reps=reps, device=device, batch=batch, seq=seq, min_seconds=min_seconds),
                            "threads": torch.get_num_threads()})
    return table(results)

"""Engine benchmark: ratios measured in one run (machines are noisy; ratios travel, seconds do not).

  python -m epi bench [--shapes tiny,smollm2-135m] [--reps 5] [--device cpu]

Prints, per model shape: EPI training step vs plain fused-AdamW step (interleaved, same batches),
refresh time vs torch.cat + kthvalue on the same importance values (and that both agree exactly), and
the engine's persistent bytes per isolatable parameter in the default and lean (bf16 + index) modes.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Dict, List

import torch

from .config import EPIConfig
from .engine import EvolvingIsolation
from .masks import layer_scales, radix_threshold

SHAPES: Dict[str, dict] = {
    # SmolLM2-135M's architecture (random init; only the shape matters for timing)
    "smollm2-135m": dict(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0),
    "tiny": dict(architecture="llama", vocab_size=98, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                 max_position_embeddings=256),
    # a few-hundred-k-parameter Qwen2 (attention biases, GQA): the CPU stand-in for the GPU profile's models
    "qwen2-tiny": dict(architecture="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True, max_position_embeddings=512, rope_theta=1000000.0),
    # Real shapes of the GPU profile (Qwen2.5-*-Instruct config.json values), for the lent-GPU check
    "qwen2.5-0.5b": dict(architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0),
    "qwen2.5-1.5b": dict(architecture="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0),
}


def shape_config(shape: str, **overrides):
    """Return the transformers config (LlamaConfig or Qwen2Config) of a named shape."""
    from transformers import LlamaConfig, Qwen2Config
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    values = {**SHAPES[shape], **overrides}
    arch = values.pop("architecture")
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**values)


def random_model(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """Return a randomly initialised causal LM of a named shape (only the shape matters: timing, memory)."""
    from transformers import AutoModelForCausalLM
    config = shape_config(shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device == "meta":
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
        return AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)


def save_random_model(shape: str, folder, seed: int = 0):
    """Return `folder` after saving a random-init model of `shape` with the tiny tokenizer (loadable by
    `epi.models.load_model(str(folder))`); the tokenizer's ids all fall inside the shape's vocabulary."""
    from .models import load_tiny_tokenizer, save_model
    tokenizer = load_tiny_tokenizer()
    if len(tokenizer) > SHAPES[shape]["vocab_size"]:
        raise ValueError(f"shape {shape!r} has a vocabulary smaller than the tiny tokenizer's {len(tokenizer)}")
    model = random_model(shape, seed=seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    return save_model(model, tokenizer, folder)


def _model(shape: str, device: str, dtype: torch.dtype, seed: int = 0):
    return random_model(shape, device, dtype, seed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step(model, opt, batch, iso=None) -> float:
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    if iso is not None:
        iso.observe("bench")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(str(batch["input_ids"].device))
    return time.perf_counter() - t0


def step_ratio(shape: str, *, batch: int, seq: int, reps: int, device: str, dtype: torch.dtype,
               config: EPIConfig) -> dict:
    """Return median plain and EPI step times (s) measured interleaved, and their ratio."""
    plain, epi = _model(shape, device, dtype), _model(shape, device, dtype)
    fused = dict(fused=True) if device == "cpu" or device.startswith("cuda") else {}
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.1, **fused)
    opt_e = torch.optim.AdamW(epi.parameters(), lr=1e-4, weight_decay=0.1, **fused)
    iso = EvolvingIsolation(epi, config).attach(opt_e)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=g).to(device)
    data = {"input_ids": x, "labels": x}
    for _ in range(max(2, config.warmup_steps + 1)):  # warm-up and first mask before timing
        _step(plain, opt_p, data)
        _step(epi, opt_e, data, iso)
    tp, te = [], []
    for _ in range(reps):  # interleaved: both see the same machine state
        tp.append(_step(plain, opt_p, data))
        te.append(_step(epi, opt_e, data, iso))
    mp, me = statistics.median(tp), statistics.median(te)
    out = {"plain_s": mp, "epi_s": me, "ratio": me / mp, "protected": iso.protected_fraction(),
           "mode": iso.isolator.mode}
    del plain, epi, opt_p, opt_e, iso
    gc.collect()
    return out


def refresh_ratio(shape: str, *, device: str, ratio: float = 0.05, reps: int = 3) -> dict:
    """Return radix-select vs cat+kthvalue times on importance shaped like the model's block matrices."""
    model = _model(shape, "meta", torch.float32)
    cfg = EPIConfig()
    names = [n for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    g = torch.Generator().manual_seed(0)
    imp = [torch.rand(s, generator=g).to(device) ** 4 for s in shapes]
    numels = [t.numel() for t in imp]
    k = int(round(ratio * sum(numels)))
    scales = layer_scales(imp, cfg.normalize, numels)
    tr, tk = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        thr = radix_threshold(imp, k, scales=scales)
        _sync(device)
        tr.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        flat = torch.cat([(t / s).reshape(-1) for t, s in zip(imp, scales)])
        ref = torch.kthvalue(flat.cpu() if device != "cpu" else flat, flat.numel() - k + 1).values
        _sync(device)
        tk.append(time.perf_counter() - t0)
        del flat
    return {"values": sum(numels), "radix_s": min(tr), "kthvalue_s": min(tk), "ratio": min(tr) / min(tk),
            "exact": float(thr) == float(ref)}


def bytes_per_param(shape: str, config: EPIConfig) -> dict:
    """Return the engine's persistent bytes per isolatable parameter after one refresh."""
    model = _model(shape, "cpu", torch.float32)
    iso = EvolvingIsolation(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    iso.attach(opt)
    for p in iso.params:
        p.grad = torch.rand_like(p)
    iso.observe("bench")
    iso.refresh()
    iso.active()
    mem = iso.memory_bytes()
    n = mem["params"]
    out = {"importance": mem["importance"] / n, "masks": mem["masks"] / n, "diagnostics": mem["diagnostics"] / n}
    out["engine"] = out["importance"] + out["masks"]
    return out


def run(shapes: List[str], reps: int = 5, device: str = "cpu", batch: int = 4, seq: int = 128) -> str:
    """Run every measurement and return a markdown table (also printed by the CLI)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    default = EPIConfig(ratio=0.05, refresh_every=50, warmup_steps=1)
    lean = EPIConfig(ratio=0.05, refresh_every=50, warmup_steps=1, importance_dtype="bfloat16", mask_format="index")
    rows = ["| shape | params | plain step (s) | EPI step (s) | step ratio | lean step ratio | refresh radix (s) "
            "| cat+kthvalue (s) | refresh ratio | exact | B/param default (+diag) | B/param lean (+diag) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        s = step_ratio(shape, batch=batch, seq=seq, reps=reps, device=device, dtype=dtype, config=default)
        s_lean = step_ratio(shape, batch=batch, seq=seq, reps=reps, device=device, dtype=dtype, config=lean)
        r = refresh_ratio(shape, device=device)
        b, bl = bytes_per_param(shape, default), bytes_per_param(shape, lean)
        n = sum(p.numel() for p in _model(shape, "meta", torch.float32).parameters())
        rows.append(f"| {shape} | {n / 1e6:.1f}M | {s['plain_s']:.3f} | {s['epi_s']:.3f} | {s['ratio']:.3f} "
                    f"| {s_lean['ratio']:.3f} | {r['radix_s']:.3f} | {r['kthvalue_s']:.3f} | {r['ratio']:.2f} "
                    f"| {r['exact']} | {b['engine']:.2f} (+{b['diagnostics']:.2f}) "
                    f"| {bl['engine']:.2f} (+{bl['diagnostics']:.2f}) |")
    return "\n".join(rows)

"""Model shapes for timing and memory: named architectures built with random weights, and a small Llama.

Only the shape matters here (benchmarks, memory plans, stand-ins for hub models in tests and the GPU
check's rehearsal): the weights are a seeded random init, never trained.
"""
from __future__ import annotations

from typing import Dict

import torch

from .factory import load_tiny_tokenizer, save_model

SHAPES: Dict[str, dict] = {
    # SmolLM2-135M's architecture (random init; only the shape matters for timing)
    "smollm2-135m": dict(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0),
    # SmolLM2-360M's architecture (its config.json values): the benchmark's third size, to see how the cost grows
    "smollm2-360m": dict(architecture="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560,
                         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0),
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
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
        torch.manual_seed(seed)
        if device == "meta" or cuda:  # initialised where it lives: a 1.5B model inits in seconds on a GPU
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config)
            return model if device == "meta" else model.to(dtype=dtype)
        return AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)


def save_random_model(shape: str, folder, seed: int = 0):
    """Return `folder` after saving a random-init model of `shape` with the tiny tokenizer (loadable by
    `epi.models.load_model(str(folder))`); the tokenizer's ids all fall inside the shape's vocabulary."""
    tokenizer = load_tiny_tokenizer()
    if len(tokenizer) > SHAPES[shape]["vocab_size"]:
        raise ValueError(f"shape {shape!r} has a vocabulary smaller than the tiny tokenizer's {len(tokenizer)}")
    model = random_model(shape, seed=seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    return save_model(model, tokenizer, folder)


def small_llama(seed: int = 0, vocab: int = 48, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    """Return a small LlamaForCausalLM from config, seeded with torch.manual_seed(seed) (the same model on
    every rank of a distributed run; fast enough for many-step unit tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)

"""Models: the tiny Llama and its tokenizer, SmolLM2-135M offline, hub or local causal LMs, cached bases.

  factory.py     load_model(name) → (model, tokenizer); save_model; the tiny tokenizer; the cache root
  base_cache.py  where a cached `tiny-base` lives and what its pre-training tracked (never builds one;
                 epi.experiments.base_build does)
  shapes.py      named architectures with random weights (benchmarks, memory plans) and a small Llama

Models build on the task package only (a base's cache key fingerprints its generated data).
"""
from .factory import (TINY_TOKENIZER_DIR, build_tiny_tokenizer, cache_root, count_parameters, load_model,
                      load_tiny_tokenizer, save_model, smollm2_gguf_path, tiny_config, tiny_vocab)

__all__ = ["TINY_TOKENIZER_DIR", "build_tiny_tokenizer", "cache_root", "count_parameters", "load_model",
           "load_tiny_tokenizer", "save_model", "smollm2_gguf_path", "tiny_config", "tiny_vocab"]

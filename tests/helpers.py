"""Shared test helpers (imported by test modules; conftest.py holds only fixtures and setup)."""
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_REAL = ROOT.parent / "shared" / "data" / "real"


def small_llama(seed: int = 0, vocab: int = 48, hidden: int = 32, layers: int = 2):
    """A small LlamaForCausalLM from config (fast enough for many-step unit tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)

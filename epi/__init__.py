"""EPI — Evolving Parameter Isolation for multi-task supervised fine-tuning.

Public API: the engine (EPIConfig, EvolvingIsolation) and the radix top-k threshold. Everything else
lives in submodules: epi.tasks, epi.models, epi.train, epi.metrics, epi.methods, epi.hf, epi.plots.
"""
from .engine.config import EPIConfig
from .engine.core import EvolvingIsolation, isolatable
from .engine.masks import radix_threshold, top_p_masks

__version__ = "0.1.0"
__all__ = ["EPIConfig", "EvolvingIsolation", "isolatable", "radix_threshold", "top_p_masks", "__version__"]

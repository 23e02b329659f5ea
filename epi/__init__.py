"""EPI — Evolving Parameter Isolation for multi-task supervised fine-tuning.

Public API: the engine (EPIConfig, EvolvingIsolation) and the radix top-k threshold. Everything else lives
in layers that import one way (engine ← training ← methods ← experiments ← CLI; analysis reads records):
epi.engine, epi.training, epi.methods, epi.experiments, epi.analysis, epi.integrations (epi.hf: the
Trainer callback), epi.tasks, epi.models.
"""
from .engine.config import EPIConfig
from .engine.core import EvolvingIsolation, isolatable
from .engine.masks import radix_threshold, top_p_masks

__version__ = "0.1.0"
__all__ = ["EPIConfig", "EvolvingIsolation", "isolatable", "radix_threshold", "top_p_masks", "__version__"]

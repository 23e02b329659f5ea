"""The one list of methods: name → class, in the order tables and figures show them.

`make_method(name, protocol)` returns a fresh method object; `MIX_ONLY` names the methods that define a
staging of the mix (and so apply to the mix protocol only).
"""
from __future__ import annotations

from typing import Dict

from .base import Method
from .evolving import EPI, EPIPerTask
from .ewc import EWC
from .hft import HFT
from .random_mask import RandomGlobal, RandomMask, RandomPerTask
from .replay import Replay
from .staging import FullSFT, MultiStage, MultiStageHeuristic, Sequential
from .static import Static

# baselines, the stagings, static isolation, EPI (both scopes), the random controls (count-matched, then matched to
# EPI global and per-task) and HFT, continual-learning baselines
METHODS: Dict[str, type] = {m.name: m for m in (FullSFT, MultiStage, MultiStageHeuristic, Static, EPI, EPIPerTask,
                                                  RandomMask, RandomGlobal, RandomPerTask, HFT, EWC, Replay,
                                                  Sequential)}
MIX_ONLY = tuple(name for name, method in METHODS.items() if method.mix_only)


def make_method(name: str, protocol: str) -> Method:
    """Return a fresh method object; mix-only stagings are refused for the other protocols."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    if name in MIX_ONLY and protocol != "mix":
        raise ValueError(f"method {name!r} defines a staging of the mix; it does not apply to protocol {protocol!r}")
    return METHODS[name]()

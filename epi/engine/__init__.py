"""The isolation engine: importance tracker → mask scheduler → isolator, behind one object.

  config.py      EPIConfig, the validated engine settings
  importance.py  ImportanceTracker: EMA of a score per tensor (globally or per task)
  masks.py       per-tensor normalisation, the exact radix top-k threshold, drift statistics, digests
  isolation.py   Isolator: keeps protected coordinates exactly unchanged around optimizer.step()
  core.py        EvolvingIsolation: the three parts behind `attach`, `observe`, `state_dict`
  backends.py    what DDP / FSDP2 need, and the refusal of FSDP1 / DeepSpeed
  burst.py       the release burst: a released coordinate's first Adam step vs a normal one (measured, closed form)

The engine imports nothing else from epi: every other layer builds on it.
"""
from .config import EPIConfig
from .core import CURRENT_TASK, ActiveMask, EvolvingIsolation, isolatable, to_bool, to_index

__all__ = ["CURRENT_TASK", "ActiveMask", "EPIConfig", "EvolvingIsolation", "isolatable", "to_bool", "to_index"]

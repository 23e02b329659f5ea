"""Methods: each a thin configuration of the one engine plus a data schedule, over the one loop.

  base.py         the Method protocol (hooks and their defaults)
  registry.py     the one list of methods (METHODS), make_method, MIX_ONLY
  staging.py      full_sft, sequential, multi_stage, multi_stage_heuristic: stagings, no isolation
  static.py       static: the CPI-FT pipeline (its pieces — cores, grouping, fusion — in cpift.py)
  evolving.py     epi, epi_per_task: the engine refreshing its mask (global / per-task scope)
  random_mask.py  random, random_global, random_per_task: random masks matched in size and structure (controls)
  hft.py          hft: Half Fine-Tuning, a random half frozen per stage/round
  ewc.py          ewc: online EWC
  replay.py       replay: experience replay

Methods build on the engine and the training loop; the runner (epi.experiments) drives them.
"""
from .base import Method
from .registry import METHODS, MIX_ONLY, make_method

__all__ = ["METHODS", "MIX_ONLY", "Method", "make_method"]

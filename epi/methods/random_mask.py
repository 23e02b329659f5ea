"""The random-mask control: freezing a random share of the same size as the method it controls for."""
from __future__ import annotations

from .base import Method


class RandomMask(Method):
    """Control: a fixed random mask of the same realised size as the method it controls for
    (`random_match`, default epi_per_task, whose per-task unions protect more than p). Without it,
    "EPI helps" cannot be told apart from "freezing anything helps"."""
    name = "random"

    def engine_config(self, run):
        return run.epi_config(refresh_every=None, seed=run.config.seed)

    def prepare(self, run):
        run.engine.random_masks(run.random_ratio())

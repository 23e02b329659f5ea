"""The random-mask control: freezing a random share of the same size as the method it controls for."""
from __future__ import annotations

import json
from pathlib import Path

from .base import Method, RunRefused


class RandomMask(Method):
    """Control: a fixed random mask of the same realised size as the method it controls for
    (`random_match`, default epi_per_task, whose per-task unions protect more than p). Without it,
    "EPI helps" cannot be told apart from "freezing anything helps"."""
    name = "random"
    reads_other_runs = True  # the matched share comes from the random_match run's results

    def check(self, config, out):
        self.matched_ratio(config, out)  # fail before training when the matched run is missing

    def engine_config(self, ctx):
        return ctx.epi_config(refresh_every=None, seed=ctx.config.seed)

    def prepare(self, ctx):
        ctx.engine.random_masks(self.matched_ratio(ctx.config, ctx.out))

    @staticmethod
    def matched_ratio(config, out: Path) -> float:
        """Return the protected share: `random_ratio` when given, else the `protected_fraction_mean` of the
        `random_match` run with the same protocol and seed, in the folder next to run folder `out`."""
        if config.random_ratio is not None:
            return config.random_ratio
        match = Path(out).parent / config.run_name.replace(f"-{config.method}-", f"-{config.random_match}-") \
            / "results.json"
        if not match.exists():
            raise RunRefused(f"method 'random' needs random_ratio or a finished {config.random_match!r} run with "
                             f"the same protocol and seed in the same folder ({match} is missing); run it first")
        return float(json.loads(match.read_text())["protected_fraction_mean"])

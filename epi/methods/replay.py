"""Experience replay: a share of each stage's batches drawn from tasks seen earlier."""
from __future__ import annotations

from .base import Method


class Replay(Method):
    """Experience replay (TRACE's past_task_ratio): a `replay_fraction` of each stage's batches come from
    tasks seen earlier — earlier stages, and in the forgetting protocol the base abilities not trained.
    In the one-stage mix there is nothing earlier, so it equals full_sft (shown, not hidden)."""
    name = "replay"

    def replay_tasks(self, ctx, k):
        cfg = ctx.config
        earlier = [t for g in ctx.stage_list[:k] for t in g]
        if cfg.protocol == "forgetting":
            earlier += [t for t in cfg.tasks if t not in cfg.train_tasks]
        return earlier

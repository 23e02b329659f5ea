"""The random-mask controls: random sets in place of importance, each matched to what it controls for.

  random           one fixed global set from step 0, count-matched to `random_match`'s realised share (the
                   first control; the committed results use it, so it stays as it was)
  random_global    one global set at `ratio` — EPI global's share — from the end of warm-up, like EPI's mask
  random_per_task  one set per task; a batch of task t is isolated by the union of the OTHER tasks' sets, exactly
                   as epi_per_task isolates, and that union covers `random_match`'s realised share (within
                   rounding: see `per_task_random_sets`), so each coordinate stays trainable by its own task

random_global and random_per_task follow EPI's schedule: nothing is protected during warm-up, the first sets
come when EPI's first mask would (after `warmup_steps` steps), and with `random_refresh` they are re-drawn
whenever EPI refreshes (every `refresh_every` steps); without it they stay fixed. Every set is installed
through the one engine (EvolvingIsolation.set_sets), so it is isolated exactly as EPI's masks are.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..engine.importance import local
from ..engine.masks import random_masks
from ..training.loop import Plugin
from .base import Method, MethodContext, RunRefused


def draw_generator(method: str, seed: int, draw) -> torch.Generator:
    """Return a torch generator for one draw of `method` on `seed` (draws, seeds and methods independent)."""
    digest = hashlib.sha256(f"{method}:{seed}:{draw}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def matched_record(config, out: Path) -> dict:
    """Return the results record of the `random_match` run with this run's protocol, seed and arm (lr), in the
    folder next to run folder `out`; RunRefused (saying what to run) when it is missing."""
    name = dataclasses.replace(config, method=config.random_match).run_name
    path = Path(out).parent / name / "results.json"
    if not path.exists():
        raise RunRefused(f"method {config.method!r} needs random_ratio or a finished {config.random_match!r} run with "
                         f"the same protocol and seed in the same folder ({path} is missing); run it first")
    return json.loads(path.read_text())


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
        return float(matched_record(config, out)["protected_fraction_mean"])


def per_task_random_sets(shapes: Sequence[torch.Size], tasks: Sequence[str], share: float,
                         generator: torch.Generator) -> Dict[str, List[torch.Tensor]]:
    """Return {task: bool masks shaped like `shapes`} such that, for every task, the union of the OTHER tasks'
    sets covers round(share · N) of the N coordinates exactly, and the sets look like independent draws.

    Drawn independently with density q, T sets would leave a coordinate free for task t when no other task
    holds it, with probability (1 − q)^(T−1); q = 1 − (1 − share)^(1/(T−1)) makes that 1 − share. Instead of
    leaving the union's size to chance, the coordinates are dealt out with those probabilities as exact counts:
    n_free = round(N(1 − q)^T) held by no task, n_own = round(N q(1 − q)^(T−1)) held by each task alone, and the
    rest held by two or more tasks (a random owner set, its size from the binomial law given ≥ 2). A coordinate
    is then free for task t exactly when nobody or t alone holds it, so every union has N − n_free − n_own
    coordinates, the same for every task; the remainder n_free + n_own = N − round(share · N) is exact.
    """
    tasks = list(tasks)
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise ValueError(f"per-task random sets need at least two distinct tasks, got {tasks}")
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share!r}")
    numels = [int(torch.Size(s).numel()) for s in shapes]
    n, t = sum(numels), len(tasks)
    q = 1.0 - (1.0 - share) ** (1.0 / (t - 1))
    free_for_each = n - int(round(share * n))  # coordinates every task may train: held by nobody or itself
    n_own = min(int(round(n * q * (1.0 - q) ** (t - 1))), free_for_each)
    n_free = free_for_each - n_own
    n_many = n - n_free - t * n_own
    if n_many < 0:  # rounding on a tiny tensor: give each task fewer coordinates of its own
        n_own = (n - n_free) // t
        n_free = free_for_each - n_own
        n_many = n - n_free - t * n_own
    order = torch.randperm(n, generator=generator)
    flat = {name: torch.zeros(n, dtype=torch.bool) for name in tasks}
    for i, name in enumerate(tasks):
        flat[name][order[n_free + i * n_own: n_free + (i + 1) * n_own]] = True
    if n_many > 0:
        many = order[n_free + t * n_own:]
        sizes = torch.arange(2, t + 1, dtype=torch.float64)
        law = torch.tensor([math.comb(t, int(k)) * q ** int(k) * (1 - q) ** (t - int(k)) for k in sizes])
        size = sizes[torch.multinomial(law / law.sum(), n_many, replacement=True, generator=generator)]
        rank = torch.rand(n_many, t, generator=generator).argsort(dim=1).argsort(dim=1)
        owners = rank < size.unsqueeze(1)  # a random owner set of the drawn size
        for i, name in enumerate(tasks):
            flat[name][many[owners[:, i]]] = True
    out = {}
    for name in tasks:
        masks, start = [], 0
        for s, k in zip(shapes, numels):
            masks.append(flat[name][start:start + k].view(s))
            start += k
        out[name] = masks
    return out


class AfterStep(Plugin):
    """After every step, call `method.after_step(steps done)` (the loop's step is 0-based): how the random
    controls and HFT install or re-draw their sets on a schedule."""

    def __init__(self, method):
        self.method = method

    def after_step(self, model, task, step):
        self.method.after_step(step + 1)


class ScheduledRandom(Method):
    """Random sets on EPI's schedule: the first at the end of warm-up, re-drawn every refresh_every steps when
    `random_refresh`, fixed otherwise. Subclasses say the scope and draw the sets."""
    scope = "global"

    def __init__(self):
        self.draw: Optional[int] = None   # the draw in force (None: still in warm-up, nothing protected)
        self.draw_steps: List[int] = []   # the step after which each draw was installed
        self.share: Optional[float] = None
        self.stage = 0
        self.ctx: Optional[MethodContext] = None
        self._cache = None                # (draw, sets) of the last draw

    def engine_config(self, ctx):
        return ctx.epi_config(scope=self.scope, refresh_every=None, seed=ctx.config.seed)

    def prepare(self, ctx):
        self.ctx = ctx
        self.share = self.target_share(ctx.config, ctx.out)
        ctx.engine.set_sets({})  # the sets come from here: the engine protects nothing and never refreshes itself

    def stage_start(self, ctx, k, tasks):
        self.stage = k
        if self.draw is not None:  # a resumed run, or a new stage that brings a new task's set into force
            self.install()

    def plugins(self, ctx):
        return [AfterStep(self)]

    def after_step(self, n: int) -> None:
        """Install the first draw when EPI's first mask would come, re-draw when EPI would refresh."""
        cfg = self.ctx.config
        first = max(cfg.warmup_steps, 1)  # the engine's first mask comes after at least one step
        if n == first:
            self.draw = 0
        elif self.draw is not None and cfg.random_refresh and cfg.refresh_every and n > first \
                and (n - cfg.warmup_steps) % cfg.refresh_every == 0:
            self.draw += 1
        else:
            return
        self.draw_steps.append(n)
        self.install()

    def install(self) -> None:
        """Put the sets of draw `self.draw` into the engine."""
        if self._cache is None or self._cache[0] != self.draw:
            engine = self.ctx.engine
            gen = draw_generator(self.name, self.ctx.config.seed, self.draw)
            self._cache = (self.draw, self.sets([local(p).shape for p in engine.params], gen))
        self.ctx.engine.set_sets(self.in_force(self._cache[1]))

    def in_force(self, sets: Dict[str, List[torch.Tensor]]) -> Dict[str, List[torch.Tensor]]:
        """Return the sets in force now (all of them; per-task scope narrows this to the tasks seen)."""
        return sets

    def target_share(self, config, out: Path) -> float:
        raise NotImplementedError

    def sets(self, shapes, generator) -> Dict[str, List[torch.Tensor]]:
        raise NotImplementedError

    def record_extra(self):
        return {"random_control": {"share": self.share, "refresh": bool(self.ctx.config.random_refresh),
                                   "draw_steps": list(self.draw_steps)}}

    def state_dict(self):
        return {"draw": self.draw, "draw_steps": list(self.draw_steps)}

    def load_state_dict(self, state):
        self.draw, self.draw_steps = state["draw"], list(state["draw_steps"])


class RandomGlobal(ScheduledRandom):
    """Control for `epi` (global scope): a uniformly random `ratio` of the isolatable coordinates — EPI global's
    share — protected for every batch, on EPI's schedule (fixed, or re-drawn with random_refresh)."""
    name = "random_global"

    def target_share(self, config, out):
        return config.ratio

    def sets(self, shapes, generator):
        return {"global": random_masks(shapes, self.share, generator)}


class RandomPerTask(ScheduledRandom):
    """Control for `epi_per_task`: one random set per task, a batch isolated by the union of the other tasks'
    sets (so a task never blocks itself), each union of `random_match`'s realised share (or random_ratio), on
    EPI's schedule (fixed, or re-drawn with random_refresh). In a sequential run a task's set comes into force
    with its stage, as epi_per_task's sets come with their task's first batches."""
    name = "random_per_task"
    scope = "per_task"
    reads_other_runs = True  # the matched share comes from the random_match run's results

    def check(self, config, out):
        trained = config.train_tasks if config.protocol == "forgetting" else config.tasks
        if len(trained) < 2:
            raise RunRefused(f"method 'random_per_task' needs at least two trained tasks (a task is isolated by the "
                             f"other tasks' sets), got {list(trained)}")
        self.target_share(config, out)  # fail before training when the matched run is missing

    def target_share(self, config, out):
        """Return random_ratio, else the matched run's mean protected share over the steps it protected
        something (a sequential epi_per_task protects nothing in stage A, where only A has a set)."""
        if config.random_ratio is not None:
            return config.random_ratio
        rec = matched_record(config, out)
        shares = [s for s in rec.get("protected_fraction") or [] if s and s > 0]
        share = sum(shares) / len(shares) if shares else float(rec.get("protected_fraction_mean") or 0.0)
        if not 0.0 < share < 1.0:
            raise RunRefused(f"method 'random_per_task': the matched {config.random_match!r} run protected a share of "
                             f"{share!r}, nothing to match; give random_ratio")
        return share

    def tasks(self) -> List[str]:
        """Return the run's trained tasks in the order their stages come."""
        return list(dict.fromkeys(t for stage in self.ctx.stage_list for t in stage))

    def sets(self, shapes, generator):
        return per_task_random_sets(shapes, self.tasks(), self.share, generator)

    def in_force(self, sets):
        seen = {t for stage in self.ctx.stage_list[:self.stage + 1] for t in stage}
        return {t: m for t, m in sets.items() if t in seen}

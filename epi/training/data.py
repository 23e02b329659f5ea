"""Training and evaluation data for runs: records per task, and a step-keyed batch schedule.

The schedule is a list of task names, one per optimizer step; the k-th batch of task t is the k-th batch
of t's deterministic batcher. So `batch_fn(step)` is a pure function of the step: every method sees the
same batches in the same order, and a resumed run continues exactly.
"""
from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

import torch

from ..tasks import ABILITIES, generate, load_task
from ..tasks.formatting import SFTBatcher

EVAL_SEED = 12345  # evaluation prompts are the same for every run and seed


def train_records(task: str, n: int, seed: int, difficulty: int = 1, source: str = "synthetic") -> List[dict]:
    """Return `n` training records of `task` (generated for EPI-Mini abilities, loaded otherwise)."""
    if task in ABILITIES and source == "synthetic":
        return generate(task, n, seed=seed, split="train", difficulty=difficulty)
    return load_task(task, source, split=f"train[:{n}]" if source == "hub" else "train")[:n]  # hub: read n rows only


def eval_records(task: str, n: int, difficulty: int = 1, source: str = "synthetic") -> List[dict]:
    """Return `n` held-out test records of `task` (distinct prompts, the same for every seed)."""
    if task in ABILITIES and source == "synthetic":
        return generate(task, n, seed=EVAL_SEED, split="test", difficulty=difficulty, unique=True)
    return load_task(task, source, split=f"test[:{n}]" if source == "hub" else "test")[:n]


def balanced_schedule(tasks: Sequence[str], steps_per_task: int, seed: int) -> List[str]:
    """Return a shuffled list holding each task exactly `steps_per_task` times (one task per batch)."""
    order = [t for t in tasks for _ in range(steps_per_task)]
    random.Random(seed).shuffle(order)
    return order


def with_replay(schedule: List[str], earlier: Sequence[str], fraction: float, seed: int) -> List[str]:
    """Return the schedule with a `fraction` of its steps replaced by uniformly drawn earlier tasks."""
    if not earlier or fraction <= 0:
        return schedule
    rng = random.Random(seed)
    return [rng.choice(list(earlier)) if rng.random() < fraction else t for t in schedule]


class StepData:
    """batch_fn over a schedule: step -> (task, batch) with per-task deterministic batchers."""

    def __init__(self, batchers: Dict[str, SFTBatcher], schedule: Sequence[str]):
        missing = sorted(set(schedule) - set(batchers))
        if missing:
            raise ValueError(f"no training data for task(s) {missing}")
        self.batchers, self.schedule = batchers, list(schedule)
        self._occurrence: List[int] = []
        seen: Dict[str, int] = {}
        for t in self.schedule:
            self._occurrence.append(seen.get(t, 0))
            seen[t] = seen.get(t, 0) + 1
        self._orders: Dict[Tuple[str, int], list] = {}

    def __len__(self) -> int:
        return len(self.schedule)

    def __call__(self, step: int) -> Tuple[str, Dict[str, torch.Tensor]]:
        task = self.schedule[step]
        b = self.batchers[task]
        epoch, i = divmod(self._occurrence[step], len(b))
        if (task, epoch) not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != task}  # keep one epoch per task
            self._orders[(task, epoch)] = b.order(epoch)
        return task, b.batch(self._orders[(task, epoch)][i])


def make_batchers(tokenizer, tasks: Sequence[str], *, n: int, seed: int, batch_size: int, max_length: int,
                  difficulty: int = 1, source: str = "synthetic") -> Dict[str, SFTBatcher]:
    """Return one deterministic SFT batcher per task (records tokenized once)."""
    return {t: SFTBatcher(train_records(t, n, seed, difficulty, source), tokenizer, batch_size, max_length,
                          seed=seed, drop_last=True) for t in tasks}

"""The Method protocol: what a method tells the runner, and the defaults every method starts from.

A method answers four questions for the runner: how the protocol's tasks are staged (`stages`), which
engine config it runs (`engine_config`, None = no isolation), what it does at stage boundaries
(`prepare`, `stage_start`, `stage_end`) and which loop plugins it adds (`plugins`). The runner and the
loop never ask which method they run. A new method is one small class in its own file of this package,
plus one line in `registry.py`.

The hooks receive the runner's `Run` (epi.experiments.runner), imported here for type checking only:
a method calls back into the run it is given, never imports the runner.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

from ..engine.config import EPIConfig
from ..training.loop import Plugin

if TYPE_CHECKING:  # pragma: no cover - the runner calls the hooks; methods never import it
    from ..experiments.runner import Run


class Method:
    name = "method"
    mix_only = False  # True: the method defines a staging of the mix; other protocols refuse it

    def stages(self, run: "Run") -> List[List[str]]:
        """Return the training stages (lists of task names) for the run's protocol."""
        cfg = run.config
        if cfg.protocol == "forgetting":
            return [list(cfg.train_tasks)]
        if cfg.protocol == "sequential":
            return [[t] for t in cfg.tasks]
        return [list(cfg.tasks)]

    def engine_config(self, run: "Run") -> Optional[EPIConfig]:
        return None

    def prepare(self, run: "Run") -> None: ...

    def stage_start(self, run: "Run", k: int, tasks: List[str]) -> None: ...

    def stage_end(self, run: "Run", k: int, tasks: List[str]) -> None: ...

    def plugins(self, run: "Run") -> List[Plugin]:
        return []

    def replay_tasks(self, run: "Run", k: int) -> List[str]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

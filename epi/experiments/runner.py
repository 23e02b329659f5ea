"""The experiment runner: a config → a run → a results record (JSON), resumable from checkpoints.

  python -m epi run --method epi --profile cpu --seed 0 --out artifacts/runs

Every method runs on the same loop, data order, seeds and kernels; only the method object differs.
A run interrupted and restarted with the same command resumes from its last checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch

from ..engine.config import EPIConfig
from ..engine.core import CURRENT_TASK, EvolvingIsolation, isolatable
from ..jsonio import write_json
from .profiles import NOT_SETTINGS, ExperimentConfig

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: run folders are not locked
    fcntl = None

LOCK = "run.lock"

# A run's data order: stage k's balanced schedule is shuffled with seed * STAGE_SEED_STRIDE + k and its replay
# draws with seed * STAGE_SEED_STRIDE + REPLAY_SEED_OFFSET + k, so stages, replay and seeds never share a stream
# (for up to REPLAY_SEED_OFFSET stages); the tiny-base build has its own (epi.experiments.base_build).
STAGE_SEED_STRIDE = 1000
REPLAY_SEED_OFFSET = 500


class RunRefused(ValueError):
    """The runner will not start (or reuse) a run as asked; the message says why and what to do."""


def environment() -> dict:
    """Return library versions and hardware of this process (for the results record)."""
    import numpy
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(), "processor": platform.processor(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def peak_memory_mb() -> float:
    import resource
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Run:
    """One experiment in progress: model, data, optimizer, engine, method, evaluations."""

    def __init__(self, config: ExperimentConfig, out: Path, say: Callable[[str], None] = log.info):
        from ..methods.registry import make_method
        from ..training.device import resolve_device, resolve_precision
        self.config, self.out, self.say = config, Path(out), say
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.method = make_method(config.method, config.protocol)
        self.engine: Optional[EvolvingIsolation] = None
        self._base_folder: Optional[Path] = None

    # ---- model and data ----------------------------------------------------------------------------
    def load_start(self):
        from ..models import load_model
        cfg = self.config
        if cfg.model == "tiny-base":
            from .base_build import ensure_base
            self._base_folder = ensure_base(cfg)
            return load_model(str(self._base_folder))
        if cfg.model.lower() in ("tiny", "smollm2-135m", "smollm2"):
            return load_model(cfg.model, seed=cfg.seed)
        # hub checkpoints may be stored in bf16: train fp32 weights (autocast supplies the low precision)
        return load_model(cfg.model, seed=cfg.seed, dtype=torch.float32)

    def base_importance(self, scope: str) -> Dict[str, Dict[str, torch.Tensor]]:
        """Return the base phase's tracked importance for `scope` ({} when the start model has none)."""
        if self._base_folder is None:
            return {}
        from ..models.base_cache import load_base_importance
        imp = load_base_importance(self._base_folder)
        if scope == "global":
            return {"global": imp["global"]}
        return {k: v for k, v in imp.items() if k != "global" and k in self.config.tasks}

    def epi_config(self, **changes) -> EPIConfig:
        return self.config.epi_config(**changes)

    def random_ratio(self) -> float:
        """Return the random control's protected share: given, or matched to `random_match`'s run."""
        cfg = self.config
        if cfg.random_ratio is not None:
            return cfg.random_ratio
        match = self.out.parent / cfg.run_name.replace(f"-{cfg.method}-", f"-{cfg.random_match}-") / "results.json"
        if not match.exists():
            raise RunRefused(f"method 'random' needs random_ratio or a finished {cfg.random_match!r} run with the "
                             f"same protocol and seed in the same folder ({match} is missing); run it first")
        return float(json.loads(match.read_text())["protected_fraction_mean"])

    def start_isolatable(self) -> List[torch.Tensor]:
        return [p.detach().clone() for p in self.iso_params]

    @torch.no_grad()
    def load_isolatable(self, tensors: List[torch.Tensor]) -> None:
        for p, t in zip(self.iso_params, tensors):
            p.copy_(t)

    def probe(self, tasks: List[str], steps: int):
        """Return ({task: [Δθ]}, {task: [θ_probe]}): short single-task fine-tunes from the start weights
        (CPI-FT Stage 1), on the isolatable tensors, each with a fresh optimizer."""
        from ..training.data import StepData
        from ..training.device import make_scaler
        from ..training.loop import TrainConfig, make_optimizer, train_steps
        cfg = self.config
        start = self.start_isolatable()
        deltas, probes = {}, {}
        for t in tasks:
            model = copy.deepcopy(self.model)
            opt = make_optimizer(model, TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay))
            train_steps(model, opt, StepData(self.batchers, [t] * steps), steps=steps, clip=cfg.clip,
                        desc=f"probe {t}", scaler=make_scaler(self.precision, self.device))
            params = [p for _, p in isolatable(model, EPIConfig())]
            probes[t] = [p.detach().clone() for p in params]
            deltas[t] = [p - s for p, s in zip(probes[t], start)]
        return deltas, probes

    def evaluate(self) -> Dict[str, dict]:
        from ..tasks import evaluate
        return evaluate(self.model, self.tokenizer, self.eval_sets)

    def evaluate_start(self) -> Dict[str, dict]:
        """Return the start model's scores, cached on disk by (weights, eval sets, threads, device): every run
        of a grid that starts from the same model would otherwise repeat the same greedy evaluation."""
        import hashlib

        from ..models import cache_root
        from .general import fingerprint
        where = [fingerprint(self.model), torch.get_num_threads(), self.eval_sets]
        if self.device.type != "cpu":  # GPU kernels round differently; CPU keys stay as they were
            where.append(self.device.type)
        key = hashlib.sha1(json.dumps(where, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = cache_root() / "start_scores" / f"{key}.json"
        if path.is_file():
            try:
                cached = json.loads(path.read_text())
                if isinstance(cached, dict) and set(cached) == set(self.eval_sets) \
                        and all(isinstance(v, dict) and "score" in v for v in cached.values()):
                    return cached
                reason = "does not hold the scores of these evaluation sets"
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                reason = f"is not valid JSON ({e})"
            aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:  # a parallel run moved it first
                pass
            self.say(f"start-score cache {path} {reason}: moved aside to {aside.name}; rebuilt from a fresh evaluation")
        scores = self.evaluate()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, scores, indent=None)  # atomic: parallel runs may write the same entry
        return scores

    def resume_point(self) -> Optional[dict]:
        """Return the checkpoint of this run's interrupted earlier attempt (None when there is none), read
        safely (epi.training.checkpoints.read_checkpoint); refuse one that was made with other settings."""
        from ..training.checkpoints import CheckpointError, read_checkpoint
        path = self.out / "checkpoint.pt"
        if not path.exists():
            return None
        blob = read_checkpoint(path)
        record = blob["extra"].get("record") if isinstance(blob["extra"], dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise CheckpointError(f"checkpoint {path} holds no run record (not written by epi.experiments.runner); "
                                  "delete it (or rerun with --fresh) to start the run over")
        differ = differing_settings(record["config"], self.config, record.get("precision"))
        if differ:
            raise RunRefused(f"{self.config.run_name}: {path} is an interrupted run with other settings ({differ}); "
                             "rerun with its settings to resume it, or with --fresh to discard it and start over")
        return blob

    # ---- the run -----------------------------------------------------------------------------------
    def execute(self) -> dict:
        from ..training.checkpoints import load_checkpoint, save_checkpoint
        from ..training.data import StepData, balanced_schedule, eval_records, make_batchers, with_replay
        from ..training.device import autocast_training_forward, make_scaler
        from ..training.loop import LoopState, TrainConfig, make_optimizer, seed_everything, train_steps
        cfg = self.config
        t0 = time.time()
        ckpt = self.resume_point()
        torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.model, self.tokenizer = self.load_start()
        self.model.to(self.device)  # once, before the engine, optimizer and probes see the parameters
        if cfg.freeze_embeddings:  # for every method alike; a tied LM head is the same tensor
            self.model.get_input_embeddings().weight.requires_grad_(False)
        if self.precision != "fp32":
            autocast_training_forward(self.model, self.precision)
        scaler = make_scaler(self.precision, self.device)
        self.iso_params = [p for _, p in isolatable(self.model, EPIConfig())]
        all_tasks = list(dict.fromkeys(cfg.tasks))
        self.eval_sets = {t: eval_records(t, cfg.eval_records, cfg.difficulty, cfg.data_source) for t in all_tasks}
        self.batchers = make_batchers(self.tokenizer, all_tasks, n=cfg.train_records, seed=cfg.seed,
                                      batch_size=cfg.batch_size, max_length=cfg.max_length,
                                      difficulty=cfg.difficulty, source=cfg.data_source)
        ckpt_path = self.out / "checkpoint.pt"
        if ckpt is not None:
            self.method.load_state_dict(ckpt["extra"]["method"])
        record = ckpt["extra"]["record"] if ckpt is not None else None
        self.general = None
        if cfg.general_eval:  # general ability: response loss on general pairs + next-token KL to the start model
            from .general import GeneralProbe
            self.general = GeneralProbe(self.model, self.tokenizer, max_length=cfg.max_length)
        if record is None:
            self.base_eval = self.evaluate_start()
        else:
            self.base_eval = record["base_scores"]
        engine_cfg = self.method.engine_config(self)
        if engine_cfg is None and cfg.monitor:  # drift under plain training: same engine, nothing protected
            engine_cfg = self.epi_config(isolate=False)
            self.engine = EvolvingIsolation(self.model, engine_cfg)
            self.engine.seed_importance(self.base_importance("global"))
        elif engine_cfg is not None:
            self.engine = EvolvingIsolation(self.model, engine_cfg)
        self.method.prepare(self)
        self.stage_list = self.method.stages(self)
        opt = make_optimizer(self.model, TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay))
        if self.engine is not None:
            self.engine.attach(opt)
        if record is None:
            record = {"config": cfg.to_dict(), "seed": cfg.seed, "environment": environment(),
                      "device": str(self.device), "precision": self.precision,
                      "stages": self.stage_list, "base_scores": self.base_eval, "stage_scores": [],
                      "evals": [], "losses": [], "loss_tasks": [], "protected_fraction": [],
                      "cpift": None, "general": [self.general.measure(self.model)] if self.general else []}
        # the global step schedule: stages back to back, replay folded in
        schedule, bounds = [], []
        for k, tasks in enumerate(self.stage_list):
            stream = cfg.seed * STAGE_SEED_STRIDE + k
            part = balanced_schedule(tasks, cfg.steps_per_task, seed=stream)
            part = with_replay(part, self.method.replay_tasks(self, k), cfg.replay_fraction,
                               seed=stream + REPLAY_SEED_OFFSET)
            bounds.append((len(schedule), len(schedule) + len(part)))
            schedule += part
        data = StepData(self.batchers, schedule)
        state = LoopState()
        if ckpt is not None:
            state, _ = load_checkpoint(ckpt, model=self.model, optimizer=opt, engine=self.engine,
                                       scaler=scaler)
            self.say(f"resumed {cfg.run_name} at step {state.step}/{len(schedule)}")
        plugins = self.method.plugins(self)
        self._snapped, self._snapshots = 0, {}
        last_stage = len(self.stage_list) - 1
        for k, (lo, hi) in enumerate(bounds):
            if state.step >= hi:
                continue
            if state.step <= lo or self.engine is not None:
                self.method.stage_start(self, k, self.stage_list[k])
                if ckpt is not None and self.engine is not None and state.step > lo:
                    self.engine.load_state_dict(ckpt["engine"])  # keep the resumed engine state

            def after(st, k=k, lo=lo, hi=hi):
                if cfg.snapshots and self.engine is not None and len(self.engine.history) > self._snapped:
                    self.snapshot()
                if self.engine is not None and self.engine.sets and self.engine.config.isolate:
                    record["protected_fraction"].append(self.engine.protected_fraction(
                        None if self.engine.config.scope == "per_task" else CURRENT_TASK))
                # the last stage is scored as the mean of its last `eval_last` evaluations, eval_every apart
                if k == last_stage and cfg.eval_every and st.step < hi and (hi - st.step) % cfg.eval_every == 0 \
                        and (hi - st.step) // cfg.eval_every < cfg.eval_last and st.step > lo:
                    record["evals"].append({"step": st.step, "scores": self.evaluate()})
                if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and st.step < len(schedule):
                    record["losses"], record["loss_tasks"] = st.losses, st.tasks
                    save_checkpoint(ckpt_path, model=self.model, optimizer=opt, state=st, engine=self.engine,
                                    extra={"method": self.method.state_dict(), "record": record}, scaler=scaler)
            state = train_steps(self.model, opt, data, steps=hi, state=state, engine=self.engine, plugins=plugins,
                                clip=cfg.clip, callback=after, desc=f"stage {k + 1}/{len(self.stage_list)}",
                                scaler=scaler)
            self.method.stage_end(self, k, self.stage_list[k])
            scores = self.evaluate()
            record["stage_scores"].append(scores)
            if self.general is not None:
                record["general"].append(self.general.measure(self.model))
            if k == last_stage:
                record["evals"].append({"step": state.step, "scores": scores})
            self.say(f"stage {k + 1}/{len(self.stage_list)} {'+'.join(self.stage_list[k])}: "
                     + " ".join(f"{t}={s['score']:.2f}" for t, s in scores.items()))
        record["losses"], record["loss_tasks"] = state.losses, state.tasks
        if scaler is not None:
            record["skipped_steps"] = state.skipped  # fp16 overflow steps the optimizer and engine skipped
        return self.finish(record, t0)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Keep the masks (bit-packed) and an importance sample of the refreshes logged since the last call."""
        import numpy as np
        eng = self.engine
        for entry in eng.history[self._snapped:]:
            key, step = entry["scope_key"], entry["step"]
            for name, m in zip(eng.names, eng._bools(eng.sets[key])):
                self._snapshots[f"mask/{step}/{key}/{name}"] = np.packbits(m.cpu().numpy().reshape(-1))
            self._snapshots[f"sample/{step}/{key}"] = eng._sample_prev[key].numpy()
        self._snapped = len(eng.history)

    def finish(self, record: dict, t0: float) -> dict:
        cfg = self.config
        if cfg.snapshots and self._snapshots:
            import numpy as np
            np.savez_compressed(self.out / "snapshots.npz", **self._snapshots)
            record["snapshots"] = "snapshots.npz"
            record["param_shapes"] = {n: list(p.shape) for n, p in zip(self.engine.names, self.engine.params)}
        last = record["evals"][-cfg.eval_last:]
        record["final_scores"] = {t: sum(e["scores"][t]["score"] for e in last) / len(last) for t in cfg.tasks}
        record["final_losses"] = {t: record["stage_scores"][-1][t]["loss"] for t in cfg.tasks}
        diverged = sum(not math.isfinite(x) for x in record["losses"])
        if diverged:  # results.json writes them as null (epi.jsonio): say so rather than leave it to be found
            record["nonfinite_losses"] = diverged
            self.say(f"warning: {cfg.run_name}: {diverged} of {len(record['losses'])} training losses are not finite "
                     f"(training diverged at lr={cfg.lr}); they are written as null")
        pf = record["protected_fraction"]
        record["protected_fraction_mean"] = sum(pf) / len(pf) if pf else 0.0
        record["drift"] = self.engine.history if self.engine is not None else []
        record["mask_digest"] = self.engine.mask_digest() if self.engine is not None else None
        record["engine_memory"] = self.engine.memory_bytes() if self.engine is not None else None
        if hasattr(self.method, "groups") and getattr(self.method, "groups"):
            record["cpift"] = {"groups": self.method.groups, "similarity": self.method.similarity}
        record["wall_s"] = round(time.time() - t0, 1)
        record["peak_memory_mb"] = round(peak_memory_mb(), 1)
        return record


def output_folder(out_root: str | Path) -> Path:
    """Return `out_root` as a Path once it is a folder this process can write (created when missing)."""
    root = Path(out_root)
    if root.exists() and not root.is_dir():
        raise RunRefused(f"the output folder {root} is a file; give --out a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunRefused(f"cannot create the output folder {root}: {e.strerror or e}; give --out a writable folder") \
            from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RunRefused(f"the output folder {root} is not writable; give --out a writable folder")
    return root


def _lock_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def run_lock(folder: Path, say: Callable[[str], None] = log.info) -> Iterator[None]:
    """Own run `folder` for the block: one process at a time, or RunRefused naming the other process.

    The lock is an OS file lock (flock) on `folder/run.lock`, so it is released when its process ends, even
    by SIGKILL; the file names the holder (pid, host, start) for the message, and a file left behind by a
    process that has ended is taken over with a log line. Without fcntl (Windows) nothing is locked."""
    folder = Path(folder)
    if fcntl is None:
        yield
        return
    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = _lock_holder(path)
            raise RunRefused(f"the run folder {folder} is in use by pid {h.get('pid', '?')} on {h.get('host', '?')} "
                             f"(since {h.get('started', '?')}; lock {path}): wait for that run to end or stop it; two "
                             "processes in one run folder would overwrite each other's checkpoint") from None
        try:  # the holder may have removed the file between our open and flock: lock the file that is there
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    left = _lock_holder(path)
    if left:
        say(f"{folder.name}: taking over the lock of pid {left.get('pid', '?')} on {left.get('host', '?')} "
            f"(since {left.get('started', '?')}); that process has ended")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiting opener then retries on a new file
        os.close(fd)


def discard(out: Path, say: Callable[[str], None] = log.info) -> None:
    """Delete what an earlier attempt of the run in `out` left (results, checkpoints, snapshots)."""
    # checkpoint*.tmp: what a checkpoint write killed midway left (epi.jsonio.atomic_write; older runs: .tmp)
    gone = [p for p in (out / "results.json", out / "checkpoint.pt", *sorted(out.glob("checkpoint*.tmp")),
                        out / "snapshots.npz", *sorted(out.glob("*/checkpoint.pt")),
                        *sorted(out.glob("*/checkpoint*.tmp"))) if p.exists()]
    for p in gone:
        p.unlink()
    if gone:
        say(f"{out.name}: fresh start, discarded {', '.join(str(p.relative_to(out)) for p in gone)}")


def finished_record(config: ExperimentConfig, out: Path) -> Optional[dict]:
    """Return the results record of `config`'s finished run in run folder `out` (None when there is none);
    refuse a record that cannot be read or that was made with other settings."""
    results = Path(out) / "results.json"
    if not results.exists():
        return None
    try:
        record = json.loads(results.read_text())
        stored = record["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunRefused(f"{results} is not a readable results record ({type(e).__name__}: {e}); delete it (or rerun "
                         f"with --fresh) to run {config.run_name} again") from None
    differ = differing_settings(stored, config, record.get("precision"))
    if differ:
        raise RunRefused(f"{config.run_name}: the folder holds a finished run with other settings ({differ}) in "
                         f"{results}; use another output folder, delete that run, or rerun with --fresh to replace it")
    return record


def run_experiment(config: ExperimentConfig, out_root: str | Path, say: Callable[[str], None] = log.info,
                   fresh: bool = False) -> dict:
    """Run (or resume, or reuse if finished) one experiment; return its results record.

    The run folder is owned by this process while it runs (`run_lock`); a finished or interrupted run in it
    is reused only with the same settings (threads, checkpoint_every and device may differ); fresh=True
    discards what an earlier attempt left and starts over."""
    out = output_folder(out_root) / config.run_name
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise RunRefused(f"cannot create the run folder {out}: {e.strerror or e}") from None
    with run_lock(out, say):
        if fresh:
            discard(out, say)
        record = finished_record(config, out)
        if record is not None:
            say(f"{config.run_name}: already finished ({out / 'results.json'})")
            return record
        run = Run(config, out, say)
        if config.method == "random":
            run.random_ratio()  # fail before training when the matched run is missing
        if config.protocol == "reference":
            record = run_references(config, out, say)
        else:
            record = run.execute()
        write_json(out / "results.json", record)
        (out / "checkpoint.pt").unlink(missing_ok=True)
    return record


def differing_settings(stored: dict, config: ExperimentConfig, stored_precision: Optional[str] = None) -> str:
    """Return "k=stored vs current, ..." for the settings in which a stored run's config differs from
    `config` ("" when none; a field the stored config lacks predates that field and counts as its default).

    The precision is compared as resolved: the record's own "precision" (`stored_precision`) against what
    `config` resolves to here, so "auto" on CPU (fp32) equals a record made before the setting existed,
    and real_cpu's precision="bf16" equals its old records' bf16_autocast=True."""
    from ..training.device import record_precision, resolve_device, resolve_precision
    defaults = ExperimentConfig().to_dict()
    current = config.to_dict()
    stored = {**stored, "precision": record_precision(stored, stored_precision)}
    current["precision"] = resolve_precision(config.precision, resolve_device(config.device))
    differ = [k for k, v in current.items() if k not in NOT_SETTINGS
              and stored.get(k, defaults.get(k, v)) != (list(v) if isinstance(v, tuple) else v)]
    return ", ".join(f"{k}={stored.get(k, defaults.get(k))!r} vs {current[k]!r}" for k in differ)


def check_same_settings(stored: dict, config: ExperimentConfig, stored_precision: Optional[str] = None) -> None:
    """Raise RunRefused when a finished run's stored config differs from `config` (see differing_settings)."""
    differ = differing_settings(stored, config, stored_precision)
    if differ:
        raise RunRefused(f"{config.run_name}: the folder holds a finished run with other settings ({differ}); "
                         "use another output folder, delete that run, or rerun with --fresh to replace it")


def _grid_worker(args) -> str:
    config, out_root = args
    torch.set_num_threads(config.threads)
    rec = run_experiment(config, out_root, say=log.info)
    return f"{config.run_name}: " + " ".join(f"{t}={v:.2f}" for t, v in rec["final_scores"].items())


def run_grid(configs: List[ExperimentConfig], out_root: str | Path, workers: int = 1,
             say: Callable[[str], None] = log.info) -> List[dict]:
    """Run many experiments (finished ones are reused) with `workers` processes; return their records.

    Base models are built first, one per seed, so parallel workers never race to build the same one.
    """
    from .base_build import ensure_base
    root = output_folder(out_root)
    names: Dict[str, dict] = {}
    for c in configs:  # one folder per run name: two settings under one name would overwrite each other
        first, this = names.setdefault(c.run_name, c.to_dict()), c.to_dict()
        differ = [k for k in this if k not in NOT_SETTINGS and first[k] != this[k]]
        if differ:
            raise RunRefused(f"two runs of the grid share the folder {c.run_name} with different settings "
                             f"({', '.join(f'{k}={first[k]!r} vs {this[k]!r}' for k in differ)}); "
                             "give them separate output folders")
    # finished runs are reused only with the same settings: checked for all before anything runs
    todo = [c for c in configs if finished_record(c, root / c.run_name) is None]
    for cfg in {(c.seed, c.base_steps, c.model): c for c in todo if c.model == "tiny-base"}.values():
        ensure_base(cfg)
    ordered = sorted(todo, key=lambda c: c.method == "random")  # matched controls after what they match
    if workers > 1 and len(ordered) > 1:
        import multiprocessing as mp
        first = [c for c in ordered if c.method != "random"]
        rest = [c for c in ordered if c.method == "random"]
        with mp.get_context("spawn").Pool(workers) as pool:
            for batch in (first, rest):
                for line in pool.imap_unordered(_grid_worker, [(c, root) for c in batch]):
                    say(line)
    else:
        for c in ordered:
            say(_grid_worker((c, root)))
    return [json.loads((root / c.run_name / "results.json").read_text()) for c in configs]


def run_references(config: ExperimentConfig, out: Path, say) -> dict:
    """Single-task references: each task alone from the start model, `steps_per_task` steps."""
    from dataclasses import replace
    if config.method != "full_sft":
        raise ValueError("protocol 'reference' trains each task alone with full_sft")
    t0 = time.time()
    per_task = {}
    for t in config.tasks:
        sub = replace(config, protocol="forgetting", tasks=list(config.tasks), train_tasks=[t])
        rec = Run(sub, out / t, say).execute()
        per_task[t] = {"final_score": rec["final_scores"][t], "final_loss": rec["final_losses"][t],
                       "evals": rec["evals"]}
        say(f"reference {t}: {rec['final_scores'][t]:.2f}")
    return {"config": config.to_dict(), "seed": config.seed, "environment": environment(),
            "device": rec["device"], "precision": rec["precision"], "references": per_task,
            "final_scores": {t: v["final_score"] for t, v in per_task.items()},
            "wall_s": round(time.time() - t0, 1), "peak_memory_mb": round(peak_memory_mb(), 1)}

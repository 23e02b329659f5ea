"""One experiment in progress (`Run`): build → schedule → loop → record. epi.experiments.runner owns the run
folders, locks, reuse and grids around it.

Every method runs on the same loop, data order, seeds and kernels; only the method object differs, and it
gets a `MethodContext` (epi.methods.base), never the run.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..engine.config import EPIConfig
from ..engine.core import EvolvingIsolation, isolatable
from ..jsonio import write_json
from ..methods.base import MethodContext, RunRefused
from .plugins import Checkpoints, LastEvaluations, ProtectedShare, Snapshots, compose, step_hooks
from .profiles import NOT_SETTINGS, SETTINGS_BEFORE, ExperimentConfig

log = logging.getLogger(__name__)

# A run's data order: stage k's balanced schedule is shuffled with seed * STAGE_SEED_STRIDE + k and its replay
# draws with seed * STAGE_SEED_STRIDE + REPLAY_SEED_OFFSET + k, so stages, replay and seeds never share a stream
# (for up to REPLAY_SEED_OFFSET stages); the tiny-base build has its own (epi.experiments.base_build).
STAGE_SEED_STRIDE = 1000
REPLAY_SEED_OFFSET = 500


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


def load_start(config: ExperimentConfig):
    """Return (model, tokenizer, tiny-base folder or None) of the start model named by config.model; the
    tiny-base is built and cached on first use (epi.experiments.base_build)."""
    from ..models import load_model
    if config.model == "tiny-base":
        from .base_build import ensure_base
        folder = ensure_base(config)
        return (*load_model(str(folder)), folder)
    if config.model.lower() in ("tiny", "smollm2-135m", "smollm2"):
        return (*load_model(config.model, seed=config.seed), None)
    # hub checkpoints may be stored in bf16: train fp32 weights (autocast supplies the low precision)
    return (*load_model(config.model, seed=config.seed, dtype=torch.float32), None)


def probe_fine_tunes(model: torch.nn.Module, batchers: Dict[str, object], config: ExperimentConfig,
                     tasks: List[str], steps: int, targets: str = "blocks", *, precision: str = "fp32", device=None):
    """Return ({task: [Δθ]}, {task: [θ_probe]}): short single-task fine-tunes of copies of `model` (CPI-FT
    Stage 1), each with a fresh optimizer, on the isolatable tensors (targets "blocks") or every trainable
    tensor (targets "all"), in epi.engine.core.isolatable's order; `model` itself is not changed."""
    from ..training.data import StepData
    from ..training.device import make_scaler
    from ..training.loop import TrainConfig, make_optimizer, train_steps
    device = device if device is not None else next(model.parameters()).device
    start = [p.detach().clone() for _, p in isolatable(model, EPIConfig(targets=targets))]
    deltas, probes = {}, {}
    for t in tasks:
        copy_ = copy.deepcopy(model)
        opt = make_optimizer(copy_, TrainConfig(lr=config.lr, weight_decay=config.weight_decay))
        train_steps(copy_, opt, StepData(batchers, [t] * steps), steps=steps, clip=config.clip,
                    desc=f"probe {t}", scaler=make_scaler(precision, device))
        probes[t] = [p.detach().clone() for _, p in isolatable(copy_, EPIConfig(targets=targets))]
        deltas[t] = [p - s for p, s in zip(probes[t], start)]
    return deltas, probes


class Run:
    """One experiment in progress: model, data, optimizer, engine, method, evaluations.

    `execute()` builds everything (`build`), lays out the step schedule (`schedule_steps`), trains stage by
    stage (`train`) and returns the results record (`finish`). Everything it holds is declared here."""

    def __init__(self, config: ExperimentConfig, out: Path, say: Callable[[str], None] = log.info):
        from ..methods.registry import make_method
        from ..training.device import resolve_device, resolve_precision
        self.config = config                              # the run's settings
        self.out = Path(out)                              # the run folder (checkpoint, snapshots)
        self.say = say                                    # where progress lines go
        self.device = resolve_device(config.device)       # where the model trains
        self.precision = resolve_precision(config.precision, self.device)  # "fp32", "bf16" or "fp16"
        self.method = make_method(config.method, config.protocol)  # the method object (its hooks)
        self.engine: Optional[EvolvingIsolation] = None   # the isolation engine (None: the method runs without)
        self._base_folder: Optional[Path] = None          # the cached tiny-base folder (None: another start model)
        self.model: Optional[torch.nn.Module] = None      # the model being trained
        self.tokenizer = None                             # its tokenizer
        self.iso_params: List[torch.Tensor] = []          # the isolatable tensors of the model
        self.eval_sets: Dict[str, list] = {}              # task → evaluation records
        self.batchers: Dict[str, object] = {}             # task → training batcher
        self.general = None                               # the general-ability probe (None: general_eval off)
        self.base_eval: Dict[str, dict] = {}              # the start model's scores
        self.ctx: Optional[MethodContext] = None          # what the method's hooks receive
        self.stage_list: List[List[str]] = []             # the training stages (task lists)
        self.optimizer: Optional[torch.optim.Optimizer] = None  # AdamW over the trainable parameters
        self.scaler = None                                # the fp16 GradScaler (None otherwise)
        self.checkpoint: Optional[dict] = None            # the interrupted attempt's checkpoint (None: fresh run)
        self.record: dict = {}                            # the results record being filled
        self.schedule: List[str] = []                     # the task of every global step, stages back to back
        self.bounds: List[Tuple[int, int]] = []           # each stage's [first, end) global steps
        self.snapshots: Optional[Snapshots] = None        # the snapshot hook (None: snapshots off or no engine)

    # ---- model and data ----------------------------------------------------------------------------
    def load_start(self):
        """Return (model, tokenizer) of the start model named by config.model (see `load_start`)."""
        model, tokenizer, self._base_folder = load_start(self.config)
        return model, tokenizer

    def base_importance(self, scope: str) -> Dict[str, Dict[str, torch.Tensor]]:
        """Return the base phase's tracked importance for `scope` ({} when the start model has none)."""
        if self._base_folder is None:
            return {}
        from ..models.base_cache import load_base_importance
        imp = load_base_importance(self._base_folder, self.config.beta)
        if scope == "global":
            return {"global": imp["global"]}
        return {k: v for k, v in imp.items() if k != "global" and k in self.config.tasks}

    def epi_config(self, **changes) -> EPIConfig:
        """Return the run's engine config with `changes`."""
        return self.config.epi_config(**changes)

    def start_isolatable(self) -> List[torch.Tensor]:
        """Return a copy of the isolatable tensors as they are now."""
        return [p.detach().clone() for p in self.iso_params]

    @torch.no_grad()
    def load_isolatable(self, tensors: List[torch.Tensor]) -> None:
        """Write `tensors` into the isolatable tensors."""
        for p, t in zip(self.iso_params, tensors):
            p.copy_(t)

    def probe(self, tasks: List[str], steps: int, targets: str = "blocks"):
        """Return ({task: [Δθ]}, {task: [θ_probe]}) of `probe_fine_tunes` from this run's model and data."""
        return probe_fine_tunes(self.model, self.batchers, self.config, tasks, steps, targets,
                                precision=self.precision, device=self.device)

    def evaluate(self) -> Dict[str, dict]:
        """Return the model's scores on the evaluation sets."""
        from ..tasks import evaluate
        return evaluate(self.model, self.tokenizer, self.eval_sets)

    def evaluate_start(self) -> Dict[str, dict]:
        """Return the start model's scores, cached on disk (`evaluate_cached`): every run of a grid that starts
        from the same model would otherwise repeat the same greedy evaluation."""
        return self.evaluate_cached("start_scores")

    def evaluate_cached(self, folder: str) -> Dict[str, dict]:
        """Return the model's scores, cached under cache_root()/`folder` by (weights, eval sets, threads, device):
        greedy decoding on one device and thread count is a function of those, so an equal key is an equal
        evaluation. Runs that share a stage (X2's arms all learn task A identically before isolation starts)
        evaluate it once. An entry without per-prompt scores (written before they existed) is stale: it is
        recomputed and replaced."""
        import hashlib

        from ..models import cache_root
        from .general import fingerprint
        where = [fingerprint(self.model), torch.get_num_threads(), self.eval_sets]
        if self.device.type != "cpu":  # GPU kernels round differently; CPU keys stay as they were
            where.append(self.device.type)
        key = hashlib.sha1(json.dumps(where, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = cache_root() / folder / f"{key}.json"
        if path.is_file():
            try:
                cached = json.loads(path.read_text())
                if isinstance(cached, dict) and set(cached) == set(self.eval_sets) \
                        and all(isinstance(v, dict) and "score" in v for v in cached.values()):
                    if all(_has_prompt_scores(v) for v in cached.values()):
                        return cached
                    reason = None  # written before per-prompt scores existed: stale, not broken
                else:
                    reason = "does not hold the scores of these evaluation sets"
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                reason = f"is not valid JSON ({e})"
            if reason is None:
                self.say(f"score cache {path} predates per-prompt scores: recomputed and replaced")
            else:
                aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
                try:
                    os.replace(path, aside)
                except FileNotFoundError:  # a parallel run moved it first
                    pass
                self.say(f"score cache {path} {reason}: moved aside to {aside.name}; "
                         "rebuilt from a fresh evaluation")
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
        """Return the results record of this run (resumed from the checkpoint an earlier attempt left)."""
        t0 = time.time()
        self.build()
        self.schedule_steps()
        state = self.train()
        return self.finish(state, t0)

    def build(self) -> None:
        """Load the start model and data, the method's engine and preparation, the optimizer and the record."""
        from ..training.data import eval_records, make_batchers
        from ..training.device import autocast_training_forward, make_scaler
        from ..training.loop import TrainConfig, make_optimizer, seed_everything
        cfg = self.config
        self.checkpoint = ckpt = self.resume_point()
        torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.model, self.tokenizer = self.load_start()
        self.model.to(self.device)  # once, before the engine, optimizer and probes see the parameters
        if cfg.freeze_embeddings:  # for every method alike; a tied LM head is the same tensor
            self.model.get_input_embeddings().weight.requires_grad_(False)
        if self.precision != "fp32":
            autocast_training_forward(self.model, self.precision)
        self.scaler = make_scaler(self.precision, self.device)
        self.iso_params = [p for _, p in isolatable(self.model, EPIConfig())]
        all_tasks = list(dict.fromkeys(cfg.tasks))
        self.eval_sets = {t: eval_records(t, cfg.eval_records, cfg.difficulty, cfg.data_source) for t in all_tasks}
        self.batchers = make_batchers(self.tokenizer, all_tasks, n=cfg.train_records, seed=cfg.seed,
                                      batch_size=cfg.batch_size, max_length=cfg.max_length,
                                      difficulty=cfg.difficulty, source=cfg.data_source)
        if ckpt is not None:
            self.method.load_state_dict(ckpt["extra"]["method"])
        if cfg.general_eval:  # general ability: response loss on general pairs + next-token KL to the start model
            from .general import GeneralProbe
            self.general = GeneralProbe(self.model, self.tokenizer, max_length=cfg.max_length)
        self.base_eval = self.evaluate_start() if ckpt is None else ckpt["extra"]["record"]["base_scores"]
        self.ctx = MethodContext(config=cfg, model=self.model, batchers=self.batchers, base_scores=self.base_eval,
                                 out=self.out, base_importance=self.base_importance, probe=self.probe,
                                 start_isolatable=self.start_isolatable, load_isolatable=self.load_isolatable,
                                 evaluate=self.evaluate)
        engine_cfg = self.method.engine_config(self.ctx)
        if engine_cfg is None and cfg.monitor:  # drift under plain training: same engine, nothing protected
            self.engine = EvolvingIsolation(self.model, self.epi_config(isolate=False))
            self.engine.seed_importance(self.base_importance("global"))
        elif engine_cfg is not None:
            self.engine = EvolvingIsolation(self.model, engine_cfg)
        self.ctx.engine = self.engine
        self.method.prepare(self.ctx)
        self.stage_list = self.ctx.stage_list = self.method.stages(self.ctx)
        self.optimizer = make_optimizer(self.model, TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay))
        if self.engine is not None:
            self.engine.attach(self.optimizer)
        if ckpt is not None:
            self.record = ckpt["extra"]["record"]
        else:
            self.record = {"config": cfg.to_dict(), "seed": cfg.seed, "environment": environment(),
                           "device": str(self.device), "precision": self.precision,
                           "stages": self.stage_list, "base_scores": self.base_eval, "stage_scores": [],
                           "evals": [], "losses": [], "loss_tasks": [], "protected_fraction": [],
                           "cpift": None, "general": [self.general.measure(self.model)] if self.general else []}

    def schedule_steps(self) -> None:
        """Lay out the global step schedule: the stages back to back, each with its replay folded in."""
        from ..training.data import balanced_schedule, with_replay
        cfg = self.config
        self.schedule, self.bounds = [], []
        for k, tasks in enumerate(self.stage_list):
            stream = cfg.seed * STAGE_SEED_STRIDE + k
            part = balanced_schedule(tasks, self.method.steps_per_task(self.ctx, k), seed=stream)
            part = with_replay(part, self.method.replay_tasks(self.ctx, k), cfg.replay_fraction,
                               seed=stream + REPLAY_SEED_OFFSET)
            self.bounds.append((len(self.schedule), len(self.schedule) + len(part)))
            self.schedule += part

    def train(self):
        """Train the stages not yet done (resuming inside one) and evaluate each; return the loop state."""
        from ..training.checkpoints import load_checkpoint
        from ..training.data import StepData
        from ..training.loop import LoopState, train_steps
        cfg, eng, ckpt, record = self.config, self.engine, self.checkpoint, self.record
        data = StepData(self.batchers, self.schedule)
        state = LoopState()
        if ckpt is not None:
            state, _ = load_checkpoint(ckpt, model=self.model, optimizer=self.optimizer, engine=eng,
                                       scaler=self.scaler)
            self.say(f"resumed {cfg.run_name} at step {state.step}/{len(self.schedule)}")
        plugins = self.method.plugins(self.ctx)
        self.snapshots = Snapshots(eng) if cfg.snapshots and eng is not None else None
        share = ProtectedShare(eng, record) if eng is not None else None
        checkpoints = Checkpoints(self.out / "checkpoint.pt", cfg.checkpoint_every, len(self.schedule),
                                  model=self.model, optimizer=self.optimizer, engine=eng, method=self.method,
                                  record=record, scaler=self.scaler) if cfg.checkpoint_every else None
        last_stage = len(self.stage_list) - 1
        for k, (lo, hi) in enumerate(self.bounds):
            if state.step >= hi:
                continue
            tasks = self.stage_list[k]
            if state.step <= lo or eng is not None:
                self.method.stage_start(self.ctx, k, tasks)
                if ckpt is not None and eng is not None and state.step > lo:
                    eng.load_state_dict(ckpt["engine"])  # keep the resumed engine state
            # the last stage is scored as the mean of its last `eval_last` evaluations, eval_every apart
            evaluations = LastEvaluations(self.evaluate, record, lo, hi, cfg.eval_every, cfg.eval_last) \
                if k == last_stage and cfg.eval_every else None
            hooks = step_hooks(snapshots=self.snapshots, share=share, evaluations=evaluations,
                               checkpoints=checkpoints)
            state = train_steps(self.model, self.optimizer, data, steps=hi, state=state, engine=eng,
                                plugins=plugins, clip=cfg.clip, callback=compose(hooks),
                                desc=f"stage {k + 1}/{len(self.stage_list)}", scaler=self.scaler)
            self.method.stage_end(self.ctx, k, tasks)
            # an earlier stage may equal another run's (same seed, data and weights): look it up first
            scores = self.evaluate() if k == last_stage else self.evaluate_cached("stage_scores")
            record["stage_scores"].append(scores)
            if self.general is not None:
                record["general"].append(self.general.measure(self.model))
            if k == last_stage:
                record["evals"].append({"step": state.step, "scores": scores})
            self.say(f"stage {k + 1}/{len(self.stage_list)} {'+'.join(tasks)}: "
                     + " ".join(f"{t}={s['score']:.2f}" for t, s in scores.items()))
        return state

    def finish(self, state, t0: float) -> dict:
        """Return the completed results record: final scores and losses, drift, masks, the method's extras."""
        cfg, record = self.config, self.record
        record["losses"], record["loss_tasks"] = state.losses, state.tasks
        if self.scaler is not None:
            record["skipped_steps"] = state.skipped  # fp16 overflow steps the optimizer and engine skipped
        if self.snapshots is not None:
            self.snapshots.save(self.out, record)
        last = record["evals"][-cfg.eval_last:]
        record["final_scores"] = {t: sum(e["scores"][t]["score"] for e in last) / len(last) for t in cfg.tasks}
        prompts = final_prompt_scores(last, cfg.tasks)
        if prompts is not None:  # None: a run resumed from a checkpoint made before per-prompt scores existed
            record["final_prompt_scores"] = prompts
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
        record.update(self.method.record_extra())
        record["arm"] = cfg.arm  # the method label: an arm (e.g. another lr) is paired as a method of its own
        record["wall_s"] = round(time.time() - t0, 1)
        record["peak_memory_mb"] = round(peak_memory_mb(), 1)
        return record


def _has_prompt_scores(entry: dict) -> bool:
    per = entry.get("per_prompt")
    return isinstance(per, list) and len(per) == entry.get("n", len(per))


def final_prompt_scores(evals: List[dict], tasks: List[str]) -> Optional[Dict[str, List[float]]]:
    """Return {task: [each prompt's score averaged over `evals`]} (the final evaluations, same prompts each
    time), or None when one of them lacks per-prompt scores; its mean per task is the run's final score."""
    out = {}
    for t in tasks:
        rows = [e["scores"][t].get("per_prompt") for e in evals]
        if not evals or any(not isinstance(r, list) or len(r) != len(rows[0]) for r in rows):
            return None
        out[t] = [sum(col) / len(rows) for col in zip(*rows)]
    return out


def differing_settings(stored: dict, config: ExperimentConfig, stored_precision: Optional[str] = None) -> str:
    """Return "k=stored vs current, ..." for the settings in which a stored run's config differs from
    `config` ("" when none; a field the stored config lacks predates that field and counts as its default, or
    as what it replaced where profiles.SETTINGS_BEFORE says so).

    The precision is compared as resolved: the record's own "precision" (`stored_precision`) against what
    `config` resolves to here, so "auto" on CPU (fp32) equals a record made before the setting existed,
    and real_cpu's precision="bf16" equals its old records' bf16_autocast=True. The base seed is compared as
    the start model's seed (base_seed, else seed), so base_seed=0 on seed 0 equals a record made before it existed."""
    from ..training.device import record_precision, resolve_device, resolve_precision
    defaults = ExperimentConfig().to_dict()
    current = config.to_dict()
    stored = {**stored, "precision": record_precision(stored, stored_precision)}
    current["precision"] = resolve_precision(config.precision, resolve_device(config.device))
    stored["base_seed"] = stored.get("seed") if stored.get("base_seed") is None else stored["base_seed"]
    current["base_seed"] = config.start_seed
    for k, before in SETTINGS_BEFORE.items():  # a record older than a setting ran with what it replaced
        if k not in stored and before(stored) is not None:
            stored[k] = before(stored)
    differ = [k for k, v in current.items() if k not in NOT_SETTINGS
              and stored.get(k, defaults.get(k, v)) != (list(v) if isinstance(v, tuple) else v)]
    return ", ".join(f"{k}={stored.get(k, defaults.get(k))!r} vs {current[k]!r}" for k in differ)



"""Experiment configuration: profiles (smoke, cpu, real_cpu, gpu, full) and validated run settings.

A run = (profile, protocol, method, seed) plus overrides. Unknown keys and bad values fail here, before
any training, with a message that names the field.

Protocols (docs/CPU_FINDINGS.md: sequential training from a random init is degenerate, so every protocol starts
from the profile's base model — `tiny-base` on CPU, a pretrained LLM elsewhere):
  mix        — multi-task SFT on `tasks`; the method decides the staging (full_sft: one mixed stage);
  forgetting — SFT on `train_tasks` only; the other `tasks` measure what the base model forgets;
  sequential — stage A then stage B (`tasks` in order), the CPI-FT Table 2 shape;
  reference  — each task alone for `steps_per_task` steps: the single-task references of the mix.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional

from ..engine.config import MODES, RELEASE_MOMENTS, EPIConfig
from ..methods.cpift import FUSION_SCOPES, STAGE4_MODES, TAU_MODES, chance_jaccard
from ..methods.hft import HFT_ROUNDS, HFT_UNITS
from ..methods.registry import METHODS, MIX_ONLY
from ..tasks import ABILITIES, REAL_TASKS
from ..tasks.synthetic import DIFFICULTIES
from ..training.device import PRECISIONS, check_device

PROTOCOLS = ("mix", "forgetting", "sequential", "reference")
# refresh_every of a run that never refreshes its mask (static). A run's settings are ints (a command line
# writes --set refresh_every=0); the engine spells the same thing refresh_every=None (EPIConfig), and
# ExperimentConfig.epi_config converts between the two.
NEVER_REFRESH = 0
# the methods whose random sets `random_refresh` re-draws on EPI's schedule (epi.methods.random_mask)
REDRAWN = ("random_global", "random_per_task")
# a run's own arm beyond its method: the settings that, away from the profile's default, name it (ExperimentConfig.arm)
# and tag its folder; lr for every method, each variant option for the methods it shapes
ARM_SETTINGS = {"lr": (None, lambda v: f"lr{v!r}"), "random_refresh": (REDRAWN, lambda v: "redraw"),
                # EPI with another refresh interval (T = 0: the mask frozen at warm-up end), e.g. mix-epi_per_task-T0-s0
                "refresh_every": (("epi", "epi_per_task"), lambda v: f"T{v}"),
                "hft_unit": (("hft",), lambda v: f"unit_{v}"), "hft_round": (("hft",), lambda v: f"round_{v}"),
                # HFT that freezes nothing before stage k (X2: from the sequential boundary), e.g. ...-hft-from1-s0
                "hft_from_stage": (("hft",), lambda v: f"from{v}"),
                # static (CPI-FT) variants: each its own arm and folder (e.g. mix-static-stage4_mixed-s0)
                "core_ratio": (("static",), lambda v: f"core{v!r}"), "group_tau": (("static",), lambda v: f"tau{v!r}"),
                "tau_mode": (("static",), lambda v: f"tau_{v}"), "stage4": (("static",), lambda v: f"stage4_{v}"),
                "stage4_fraction": (("static",), lambda v: f"s4f{v!r}"),
                "fusion_scope": (("static",), lambda v: f"fuse_{v}")}
# what each annotated type of a setting accepts (checked for every field, before any range check)
_KINDS = {"int": "an int", "float": "a finite number", "bool": "true or false", "str": "a non-empty string",
          "List[str]": "a list of names (on the command line: comma-separated)"}


def _check_type(name: str, kind: str, value) -> None:
    """Raise a ValueError naming `name` when `value` is not of the annotated type `kind` ("Optional[float]", ...)."""
    optional = kind.startswith("Optional[")
    base = kind[len("Optional["):-1] if optional else kind
    if value is None and optional:
        return
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif base == "str":
        ok = isinstance(value, str) and value.strip() != ""
    elif base == "List[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    else:
        return  # a type without a rule here: the field's own check below
    if not ok:
        raise ValueError(f"{name} must be {_KINDS[base]}{' or null' if optional else ''}, got {value!r}")


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass
class ExperimentConfig:
    """Everything a run needs; defaults are the `cpu` profile."""
    profile: str = "cpu"
    protocol: str = "mix"
    method: str = "full_sft"
    seed: int = 0
    model: str = "tiny-base"
    tasks: List[str] = field(default_factory=lambda: ["math", "code", "logic", "instruction", "chat"])
    train_tasks: List[str] = field(default_factory=lambda: ["math", "code"])
    difficulty: int = 1
    data_source: str = "synthetic"          # "synthetic" (generated on the fly), "hub" (epi.tasks.hub.HUB) or a folder
    steps_per_task: int = 100               # optimizer steps per task in a stage (mix: total = T × this)
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.1
    clip: float = 1.0
    max_length: int = 128
    train_records: int = 4000               # generated training records per task
    # held-out test prompts per task. 200: the prompt-level standard error of a task score near 0.5 is
    # sqrt(.25/200) ≈ 0.035 (0.056 at 80), small enough for the ~0.02–0.03 effects the mix compares once averaged
    # over tasks and seeds; the synthetic test split holds ≥ 223 distinct prompts per ability (code, difficulty 1 is
    # the smallest), none in training. An evaluation of 5 tasks × 200 on tiny-base costs ≈ 7 s at 1 thread.
    eval_records: int = 200
    eval_every: int = 50                    # spacing of the last stage's final evaluations (0 = stage ends only)
    eval_last: int = 3                      # the mix is scored as the mean of the last k evaluations
    # isolation (shared by every isolating method so the comparison is fair)
    # p = 10 %: the CPU study's setting (docs/CPU_FINDINGS.md), which every CPU result uses; the engine's own
    # default (EPIConfig.ratio = 0.05) is the library's starting point for a real model. Every record keeps its p.
    ratio: float = 0.1
    refresh_every: int = 50                 # NEVER_REFRESH (0) = a static mask from the EMA at warm-up end
    warmup_steps: int = 20
    beta: float = 0.99
    score: str = "fisher"
    normalize: str = "layer_mean"
    # engine semantics (EPIConfig.mode / release_moments, docs/EXACTNESS.md): auto = grad for global scope, restore
    # per task; "literal" = restore with Adam's moments on the true gradient (the write-up read literally)
    engine_mode: str = "auto"
    release_moments: str = "keep"           # keep | floor_v (tempers the release burst) | fresh
    # method-specific
    stages_k: int = 3                       # multi_stage: random K=3 staging (CPI-FT's baseline)
    probe_steps: int = 100                  # static (CPI-FT): per-task probe fine-tune length
    # static (CPI-FT, epi.methods.static): its own core share, the paper's p = 1 % of |Δθ| (the other isolating
    # methods keep `ratio`); at p = 10 % chance Jaccard p/(2−p) is already 0.053, so τ = 0.1 could never merge tasks
    core_ratio: float = 0.01
    group_tau: float = 0.1                  # static: grouping threshold τ (CPI-FT: 0.1 on the Jaccard)
    tau_mode: str = "absolute"              # static: group_tau is a Jaccard | "chance": a multiple ≥ 1 of p/(2−p)
    stage4: str = "groups"                  # static, mix: one brief stage per group (CPI-FT) | "mixed": one stage
    stage4_fraction: float = 0.1            # static, mix: Stage 4 trains this × steps_per_task steps per task
    fusion_scope: str = "changed"           # static, mix: fuse every trainable tensor a probe changed | "isolatable"
    slerp_weight: float = 0.5               # static: SLERP factor ω for non-core weights
    ewc_lambda: float = 1000.0              # ewc: penalty strength on mean-normalised Fisher
    replay_fraction: float = 0.2            # replay: share of batches drawn from earlier tasks
    random_ratio: Optional[float] = None    # random: protected share; None = match `random_match`'s realised share
    random_match: str = "epi_per_task"      # random: the method whose realised protected share is matched
    # random_global / random_per_task (epi.methods.random_mask): sets re-drawn every refresh_every steps after
    # warm-up, EPI's refresh schedule (True), or fixed from the end of warm-up (False)
    random_refresh: bool = False
    hft_unit: str = "matrix"                # hft: "matrix" (half of each block's attention / FFN matrices) | "element"
    hft_round: str = "stage"                # hft: a new half each stage ("stage") or also every refresh_every steps
    hft_from_stage: int = 0                 # hft: the first stage (0-based) with a frozen half; sequential: 0 or 1
    base_steps: int = 2000                  # tiny-base pre-training steps (general mix of the abilities)
    # the seed of the tiny-base start model (epi.experiments.base_build); None = `seed`. Only the base follows it:
    # data order, engine and evaluation stay on `seed`, so training seeds can share one cached base (a build
    # takes many minutes on 2 cores) and a grid can block its seeds on a few base seeds
    base_seed: Optional[int] = None
    base_lr: float = 2e-3
    base_batch_size: int = 32
    general_eval: bool = False              # measure general ability (experiments.general) before and after each stage
    freeze_embeddings: bool = False         # input embeddings (and a tied LM head) never train: faster CPU steps
    device: str = "auto"                    # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N (training.device)
    precision: str = "auto"                 # auto | fp32 | bf16 | fp16: autocast of train-mode forwards; evals fp32
    monitor: bool = False                   # non-isolating methods: track importance and masks anyway (drift)
    snapshots: bool = False                 # save every refresh's masks + an importance sample (snapshots.npz)
    threads: int = 1
    checkpoint_every: int = 200             # steps between resumable checkpoints (0 = never)

    def __post_init__(self) -> None:
        """Validate every setting (type, range, finiteness, choice), naming the field and what it allows,
        so that a bad value fails here, before any model, data or folder is built."""
        if isinstance(self.tasks, tuple):
            self.tasks = list(self.tasks)
        if isinstance(self.train_tasks, tuple):
            self.train_tasks = list(self.train_tasks)
        for f in fields(self):
            _check_type(f.name, f.type, getattr(self, f.name))
            if f.type in ("float", "Optional[float]") and isinstance(getattr(self, f.name), int):
                setattr(self, f.name, float(getattr(self, f.name)))  # 1 and 1.0 are one setting
        _choice("profile", self.profile, tuple(PROFILES))
        _choice("protocol", self.protocol, PROTOCOLS)
        _choice("method", self.method, tuple(sorted(METHODS)))
        _choice("random_match", self.random_match, tuple(sorted(METHODS)))
        _choice("hft_unit", self.hft_unit, HFT_UNITS)
        _choice("hft_round", self.hft_round, HFT_ROUNDS)
        _choice("difficulty", self.difficulty, DIFFICULTIES)
        _choice("precision", self.precision, PRECISIONS)
        if self.method in MIX_ONLY and self.protocol != "mix":
            raise ValueError(f"method {self.method!r} defines a staging of the mix; it does not apply to protocol "
                             f"{self.protocol!r}")
        if self.protocol == "reference" and self.method != "full_sft":
            raise ValueError(f"protocol 'reference' trains each task alone with full_sft, got method {self.method!r}")
        known_tasks = ABILITIES + tuple(REAL_TASKS)
        for name in ("tasks", "train_tasks"):
            names = getattr(self, name)
            unknown = [t for t in names if t not in known_tasks]
            if unknown:
                raise ValueError(f"{name}: unknown task(s) {unknown}; known tasks: {', '.join(known_tasks)}")
            if len(set(names)) != len(names):
                raise ValueError(f"{name} must not repeat a task, got {names}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if self.protocol == "sequential" and len(self.tasks) != 2:
            raise ValueError(f"protocol 'sequential' needs tasks=[A, B], got {self.tasks}")
        if self.protocol == "forgetting":
            missing = [t for t in self.train_tasks if t not in self.tasks]
            if missing or not self.train_tasks or len(self.train_tasks) == len(self.tasks):
                raise ValueError(f"train_tasks must be a proper, non-empty subset of tasks {self.tasks}, "
                                 f"got {self.train_tasks}")
        for name in ("steps_per_task", "batch_size", "max_length", "train_records", "eval_records",
                     "eval_last", "stages_k", "probe_steps", "base_steps", "base_batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "refresh_every", "hft_from_stage"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("seed", "base_seed"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**32:  # numpy's seed range
                raise ValueError(f"{name} must be an int in [0, 2**32){' or null' if name == 'base_seed' else ''}, "
                                 f"got {value!r}")
        for name in ("lr", "base_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "ewc_lambda", "clip"):  # clip 0 = no clipping; < 0 would ascend
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio!r}")
        if self.random_ratio is not None and not 0 < self.random_ratio < 1:
            raise ValueError(f"random_ratio must be in (0, 1) or null, got {self.random_ratio!r}")
        redraws = ((self.random_refresh and self.method in REDRAWN)
                   or (self.hft_round == "refresh" and self.method == "hft"))
        if self.refresh_every == NEVER_REFRESH and redraws:
            what = "random_refresh=true" if self.method in REDRAWN else "hft_round='refresh'"
            raise ValueError(f"{what} re-draws every refresh_every steps, but refresh_every is 0 (never); "
                             "set refresh_every > 0 or drop the re-draw")
        if self.method == "hft" and self.hft_from_stage > 0 and (
                self.protocol != "sequential" or self.hft_from_stage >= len(self.tasks)):
            stages = len(self.tasks) if self.protocol == "sequential" else 1
            raise ValueError(f"hft_from_stage must name one of the run's {stages} stage(s) (0-based; protocol "
                             f"{self.protocol!r}), got {self.hft_from_stage}: a later start would freeze nothing; "
                             "a start after stage 0 needs protocol 'sequential' and a value below its number of tasks")
        if not 0 <= self.replay_fraction < 1:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction!r}")
        if not 0 <= self.slerp_weight <= 1:
            raise ValueError(f"slerp_weight must be in [0, 1], got {self.slerp_weight!r}")
        self._check_cpift()
        check_device(self.device)  # cuda without CUDA fails here, before anything is built
        _choice("engine_mode", self.engine_mode, MODES)  # named as here (the engine would say "mode")
        _choice("release_moments", self.release_moments, RELEASE_MOMENTS)
        self.epi_config()  # the engine's own checks (beta, score, normalize, ...), before any model exists

    def _check_cpift(self) -> None:
        """Validate the CPI-FT settings (static), naming the field and what it allows."""
        _choice("tau_mode", self.tau_mode, TAU_MODES)
        _choice("stage4", self.stage4, STAGE4_MODES)
        _choice("fusion_scope", self.fusion_scope, FUSION_SCOPES)
        if not 0 < self.core_ratio < 1:
            raise ValueError(f"core_ratio must be in (0, 1) (CPI-FT: 0.01), got {self.core_ratio!r}")
        if not 0 < self.stage4_fraction <= 1:
            raise ValueError(f"stage4_fraction must be in (0, 1] (a share of steps_per_task), "
                             f"got {self.stage4_fraction!r}")
        if self.tau_mode == "absolute" and not 0 <= self.group_tau <= 1:
            raise ValueError(f"group_tau must be in [0, 1] with tau_mode='absolute' (a Jaccard), "
                             f"got {self.group_tau!r}")
        if self.tau_mode == "chance":
            chance = chance_jaccard(self.core_ratio)
            if self.group_tau < 1:
                raise ValueError(f"group_tau must be >= 1 with tau_mode='chance' (a multiple of chance Jaccard "
                                 f"p/(2-p) = {chance:.4g} at core_ratio={self.core_ratio:g}; below 1 it groups tasks "
                                 f"whose cores overlap less than random sets), got {self.group_tau!r}; e.g. 2.0 = "
                                 "twice chance, or tau_mode='absolute' with group_tau=0 for one group")
            if self.group_tau * chance > 1:
                raise ValueError(f"group_tau={self.group_tau!r} × chance {chance:.4g} = {self.group_tau * chance:.4g} "
                                 f"exceeds 1, a Jaccard no two tasks can reach; lower group_tau to <= {1 / chance:.4g}")

    def epi_config(self, **changes):
        """Return the EPIConfig (epi.engine.config) of this run's isolation settings, with `changes` applied.

        The one place where a run's refresh_every = NEVER_REFRESH (0) becomes the engine's None (static)."""
        refresh_every = None if self.refresh_every == NEVER_REFRESH else self.refresh_every
        values = dict(score=self.score, beta=self.beta, ratio=self.ratio, refresh_every=refresh_every,
                      warmup_steps=self.warmup_steps, normalize=self.normalize, seed=self.seed,
                      mode=self.engine_mode, release_moments=self.release_moments)
        values.update(changes)
        return EPIConfig(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def start_seed(self) -> int:
        """Return the seed of the tiny-base start model: base_seed, or seed when base_seed is None."""
        return self.seed if self.base_seed is None else self.base_seed

    def arm_settings(self) -> Dict[str, object]:
        """Return {setting: value} of ARM_SETTINGS that apply to this run's method and differ from its profile's
        default: an lr that is not the profile's makes a learning-rate arm (e.g. full SFT at a lower lr)."""
        defaults = {f.name: f.default for f in fields(self) if f.name in ARM_SETTINGS}
        defaults.update({k: v for k, v in PROFILES[self.profile].items() if k in ARM_SETTINGS})
        return {k: getattr(self, k) for k, (methods, _) in ARM_SETTINGS.items()
                if (methods is None or self.method in methods) and getattr(self, k) != defaults[k]}

    @property
    def arm(self) -> str:
        """Return this run's method label: the method, or the method with its arm settings ("full_sft@lr=0.0003"),
        so that pairing runs by (label, seed) keeps arms apart; the results record stores it ("arm")."""
        extra = self.arm_settings()
        return self.method + ("@" + ",".join(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in extra.items()) if extra else "")

    @property
    def run_name(self) -> str:
        """Folder name of this run: protocol-method-seed (train tasks named for forgetting; an arm's settings
        after the method, e.g. mix-full_sft-lr0.0003-s0)."""
        extra = "+".join(self.train_tasks) if self.protocol == "forgetting" else (
            "-".join(self.tasks) if self.protocol == "sequential" else "")
        default_model = PROFILES[self.profile].get("model", "tiny-base")
        model = "" if self.model == default_model else "m_" + self.model.replace("/", "_")
        general = "general" if self.general_eval else ""
        monitor = "monitor" if self.monitor or self.snapshots else ""
        base = f"b{self.base_seed}" if self.start_seed != self.seed else ""  # a base shared with other seeds
        arm = [ARM_SETTINGS[k][1](v) for k, v in self.arm_settings().items()]  # after the method: an arm's own folder
        return "-".join(x for x in (self.protocol, extra, model, general, monitor, self.method, *arm, f"s{self.seed}",
                                    base) if x)


# Profile overrides of the defaults (the `cpu` profile is the dataclass defaults but for base_seed).
PROFILES: Dict[str, dict] = {
    "smoke": dict(steps_per_task=12, batch_size=8, base_batch_size=8, train_records=200, eval_records=8, eval_every=6,
                  probe_steps=6, base_steps=60, refresh_every=5, warmup_steps=3, checkpoint_every=0),
    # base_seed=0: every cpu seed starts from the one cached tiny-base of seed 0 (a build takes many minutes on
    # 2 cores; one per seed would dominate a grid); seeds then differ in data order and engine, not start model
    "cpu": dict(base_seed=0),
    "real_cpu": dict(model="smollm2-135m", tasks=["math", "code"], steps_per_task=24, batch_size=4, lr=1e-4,
                     max_length=128, eval_records=32, eval_every=0, probe_steps=8, refresh_every=8,
                     warmup_steps=4, checkpoint_every=24, protocol="sequential", general_eval=True,
                     freeze_embeddings=True, precision="bf16", threads=1),
    "gpu": dict(model="Qwen/Qwen2.5-0.5B-Instruct", data_source="hub", tasks=["gsm8k", "codealpaca", "logiqa",
                "alpaca", "ultrachat"], steps_per_task=300, batch_size=16, lr=1e-5, max_length=512,
                train_records=2000, eval_records=200, eval_every=0, probe_steps=50, threads=8),
    "full": dict(model="meta-llama/Meta-Llama-3-8B", data_source="hub", tasks=["gsm8k", "codealpaca", "logiqa",
                 "alpaca", "ultrachat"], steps_per_task=1000, batch_size=64, lr=1e-5, max_length=1024,
                 train_records=20000, eval_records=500, eval_every=0, probe_steps=200, threads=16),
}


def resolve(profile: str = "cpu", **overrides) -> ExperimentConfig:
    """Return the validated config of `profile` with `overrides` (unknown keys are rejected)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    known = {f.name for f in fields(ExperimentConfig)}
    if "bf16_autocast" in overrides and not isinstance(overrides["bf16_autocast"], bool):
        raise ValueError(f"bf16_autocast must be true or false, got {overrides['bf16_autocast']!r}")
    if overrides.get("bf16_autocast") is not None:  # the setting `precision` replaced (records keep the old name)
        if overrides.get("precision") not in (None, "bf16") and overrides["bf16_autocast"]:
            raise ValueError(f"bf16_autocast=True contradicts precision={overrides['precision']!r}; "
                             "use precision alone")
        overrides["precision"] = "bf16" if overrides.pop("bf16_autocast") else overrides.get("precision") or "auto"
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown experiment setting(s) {unknown}; known: {sorted(known)}")
    values = {**PROFILES[profile], **overrides}  # None is a value (random_ratio), not "the default"
    return ExperimentConfig(profile=profile, **values)


# how a run was executed, not what it computed (the device as threads: its rounding is not a setting); a
# resumed or reused run may differ in these, and compare pools runs that differ only in these and the seed
NOT_SETTINGS = ("threads", "checkpoint_every", "device")

# what a record made before a setting existed ran with, where that is not the setting's default (None: the default):
# a static record older than CPI-FT's own settings froze cores at `ratio`, trained a full-length Stage 4 and fused
# the isolatable tensors only, so it is not taken for a run under the new defaults (run.differing_settings)
SETTINGS_BEFORE = {
    "core_ratio": lambda stored: stored.get("ratio", 0.1) if stored.get("method") == "static" else None,
    "stage4_fraction": lambda stored: 1.0 if stored.get("method") == "static" else None,
    "fusion_scope": lambda stored: "isolatable" if stored.get("method") == "static" else None,
}

# settings that are lists of names: a command line gives them comma-separated (`--set tasks=math,code`)
LIST_SETTINGS = tuple(f.name for f in fields(ExperimentConfig) if f.type.startswith("List"))


def parse_sets(items) -> dict:
    """Return {key: value} from KEY=VALUE strings: a value is parsed as JSON when it is JSON (numbers,
    true/false, null, lists), else kept as text; a list setting (tasks, train_tasks) also takes
    comma-separated names. A malformed item, or one key given twice with two values, raises ValueError."""
    out: dict = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if key in LIST_SETTINGS and isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        if key in out and out[key] != value:
            raise ValueError(f"--set {key} is given twice ({out[key]!r} and {value!r}); give it once")
        out[key] = value
    return out

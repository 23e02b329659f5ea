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

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Dict, List, Optional

PROTOCOLS = ("mix", "forgetting", "sequential", "reference")


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
    eval_records: int = 80                  # held-out test prompts per task
    eval_every: int = 50                    # spacing of the last stage's final evaluations (0 = stage ends only)
    eval_last: int = 3                      # the mix is scored as the mean of the last k evaluations
    # isolation (shared by every isolating method so the comparison is fair)
    ratio: float = 0.1
    refresh_every: int = 50                 # 0 = never refresh (a static mask from the EMA at warm-up end)
    warmup_steps: int = 20
    beta: float = 0.99
    score: str = "fisher"
    normalize: str = "layer_mean"
    # method-specific
    stages_k: int = 3                       # multi_stage: random K=3 staging (CPI-FT's baseline)
    probe_steps: int = 100                  # static (CPI-FT): per-task probe fine-tune length
    group_tau: float = 0.1                  # static: Jaccard threshold for grouping (CPI-FT τ)
    slerp_weight: float = 0.5               # static: SLERP factor ω for non-core weights
    ewc_lambda: float = 1000.0              # ewc: penalty strength on mean-normalised Fisher
    replay_fraction: float = 0.2            # replay: share of batches drawn from earlier tasks
    random_ratio: Optional[float] = None    # random: protected share; None = match `random_match`'s realised share
    random_match: str = "epi_per_task"      # random: the method whose realised protected share is matched
    base_steps: int = 2000                  # tiny-base pre-training steps (general mix of the abilities)
    base_lr: float = 2e-3
    base_batch_size: int = 32
    general_eval: bool = False              # measure general ability (epi.general) before and after each stage
    freeze_embeddings: bool = False         # input embeddings (and a tied LM head) never train: faster CPU steps
    device: str = "auto"                    # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N (epi.device)
    precision: str = "auto"                 # auto | fp32 | bf16 | fp16: autocast of train-mode forwards; evals fp32
    monitor: bool = False                   # non-isolating methods: track importance and masks anyway (drift)
    snapshots: bool = False                 # save every refresh's masks + an importance sample (snapshots.npz)
    threads: int = 1
    checkpoint_every: int = 200             # steps between resumable checkpoints (0 = never)

    def __post_init__(self) -> None:
        from .methods import METHODS  # late import: methods imports this module
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
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
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "refresh_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio!r}")
        if not 0 <= self.replay_fraction < 1:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction!r}")
        if self.random_ratio is not None and not 0 < self.random_ratio < 1:
            raise ValueError(f"random_ratio must be in (0, 1) or None, got {self.random_ratio!r}")
        if self.lr <= 0 or self.base_lr <= 0:
            raise ValueError(f"lr and base_lr must be > 0, got {self.lr!r}, {self.base_lr!r}")
        from .device import PRECISIONS, check_device
        check_device(self.device)  # cuda without CUDA fails here, before anything is built
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def run_name(self) -> str:
        """Folder name of this run: protocol-method-seed (train tasks named for forgetting)."""
        extra = "+".join(self.train_tasks) if self.protocol == "forgetting" else (
            "-".join(self.tasks) if self.protocol == "sequential" else "")
        default_model = PROFILES[self.profile].get("model", "tiny-base")
        model = "" if self.model == default_model else "m_" + self.model.replace("/", "_")
        general = "general" if self.general_eval else ""
        monitor = "monitor" if self.monitor or self.snapshots else ""
        return "-".join(x for x in (self.protocol, extra, model, general, monitor, self.method, f"s{self.seed}") if x)


# Profile overrides of the defaults (the `cpu` profile is the dataclass defaults).
PROFILES: Dict[str, dict] = {
    "smoke": dict(steps_per_task=12, batch_size=8, base_batch_size=8, train_records=200, eval_records=8, eval_every=6,
                  probe_steps=6, base_steps=60, refresh_every=5, warmup_steps=3, checkpoint_every=0),
    "cpu": {},
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
    if overrides.get("bf16_autocast") is not None:  # the setting `precision` replaced (records keep the old name)
        if overrides.get("precision") not in (None, "bf16") and overrides["bf16_autocast"]:
            raise ValueError(f"bf16_autocast=True contradicts precision={overrides['precision']!r}; "
                             "use precision alone")
        overrides["precision"] = "bf16" if overrides.pop("bf16_autocast") else overrides.get("precision") or "auto"
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown experiment setting(s) {unknown}; known: {sorted(known)}")
    values = {**PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}}
    return ExperimentConfig(profile=profile, **values)


def with_changes(config: ExperimentConfig, **changes) -> ExperimentConfig:
    """Return a validated copy of `config` with some fields changed."""
    return replace(config, **changes)

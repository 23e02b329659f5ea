"""The prepared GPU check: the engine, the Trainer path and notebook 07 on one GPU, offline, in ≤ 8 minutes.

    python -m epi gpu-check [--out results/gpu] [--budget-s 480]   # one CUDA GPU (make gpu-check)
    python -m epi gpu-check --device cpu                            # the CPU rehearsal: every part, tiny shapes

Parts, in this order; each is timed, and skipped with its reason when the budget left is below its estimate
(or when what it needs is missing):

  bench <shape>  `epi.bench.measure` on random-init Qwen2.5-0.5B and 1.5B shapes, bf16 weights: EPI step vs
                 plain fused AdamW (interleaved, median, same batch), lean-mode step, refresh radix vs
                 cat+kthvalue, bytes per parameter, peak GPU memory. Target (issue 17): step ratio ≤ 1.02 on
                 the 0.5B shape, printed next to the result (a miss is a finding, not a failed check).
  trainer        notebook 07's recipe (`epi.integrations.recipe.run_method`: `EPICallback` in an unmodified
                 `transformers.Trainer`) on a random-init 0.5B-shaped model, fp32 weights + bf16 autocast,
                 gradient accumulation 4, global and per-task scope: its spy checks at every optimizer step
                 that the protected weights moved exactly 0.0.
  notebook 07    papermill on notebooks/07 with PROFILE="gpu", a random-init 0.5B-shaped model folder
                 (`epi.models.shapes.save_random_model`) as MODEL_NAME, local stand-in datasets, a few steps per method.

Writes <out>/gpu_check.md (tables), <out>/gpu_check.json (raw numbers, no NaN) and <out>/provenance.json
(GPU, capability, versions, date, command). Scratch files (model folders, Trainer outputs, the executed
notebook) go to `work`. A part that raises is recorded as "error" with its message; the others still run.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)

STEP_RATIO_TARGET = 1.02  # issue 17: EPI step vs plain fused AdamW, bf16 on CUDA, 0.5B shape
TARGET_SHAPE = "qwen2.5-0.5b"
REHEARSAL_OUT = "artifacts/gpu-rehearsal"


class NoGPUError(RuntimeError):
    """The check was asked for CUDA on a machine without a usable CUDA GPU."""


@dataclass
class Plan:
    """What the check runs and how big; `plan(device)` gives the GPU sizes or the CPU rehearsal's tiny ones."""
    device: str = "cuda"
    shapes: Tuple[str, ...] = ("qwen2.5-0.5b", "qwen2.5-1.5b")  # engine benchmark
    budget_s: float = 480.0
    reps: int = 20  # timed steps per setup (median)
    batch: int = 4  # benchmark micro-batch: one micro-batch per step is the engine's worst case
    seq: int = 512
    model_shape: str = "qwen2.5-0.5b"  # the Trainer part and notebook 07
    trainer_steps: int = 32
    trainer_micro_batch: int = 4
    trainer_seq: int = 256
    grad_accum: int = 4
    trainer_refresh_every: int = 8
    trainer_warmup: int = 4
    notebook_steps: int = 12  # per method: 4 warm-up steps, then refreshes every 4 and 8 isolated steps
    notebook_warmup: int = 4
    notebook_refresh_every: int = 4
    notebook_train_records: int = 64  # per task, from the stand-in mirror
    notebook_eval: int = 4
    notebook_new_tokens: int = 32
    estimates_s: Dict[str, float] = field(default_factory=dict)  # part -> seconds it needs at most, expected

    def estimate(self, part: str) -> float:
        """Return the seconds a part is expected to need (a benchmark shape's from its parameter count)."""
        if part in self.estimates_s:
            return self.estimates_s[part]
        from .models.shapes import random_model
        n = sum(p.numel() for p in random_model(part.split(" ", 1)[1], "meta").parameters())
        # from the sizes of the work (no GPU run exists yet): ~60 s at 0.5B on a GPU, ~1 s per 1M params on a CPU
        return 30 + 60 * n / 1e9 if self.cuda else 5 + n / 1e6

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def plan(device: str = "cuda", shapes: Optional[Sequence[str]] = None, budget_s: Optional[float] = None) -> Plan:
    """Return the check's plan for `device`: GPU sizes on CUDA, the rehearsal's tiny fp32 sizes on CPU."""
    if device.startswith("cuda"):
        p = Plan(device=device, estimates_s={"trainer": 60.0, "notebook 07": 150.0})
    elif device == "cpu":
        p = Plan(device="cpu", shapes=("qwen2-tiny",), budget_s=240.0, reps=3, batch=2, seq=32,
                 model_shape="qwen2-tiny", trainer_steps=8, trainer_micro_batch=2, trainer_seq=32,
                 trainer_refresh_every=2, trainer_warmup=2, notebook_steps=8, notebook_warmup=2,
                 notebook_refresh_every=3, notebook_train_records=32, notebook_eval=2, notebook_new_tokens=8,
                 estimates_s={"trainer": 10.0, "notebook 07": 45.0})
    else:
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    if shapes:
        from .models.shapes import SHAPES
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; known: {sorted(SHAPES)}")
        p.shapes = tuple(shapes)
    if budget_s is not None:
        p.budget_s = float(budget_s)
    return p


def require_device(device: str) -> None:
    """Raise NoGPUError, saying how to rehearse on CPU, when `device` is CUDA and none is usable."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise NoGPUError(
            f"no CUDA GPU is present (torch.cuda.is_available() is False; {build}); the GPU check needs one GPU. "
            f"To rehearse every part on this CPU with tiny shapes (about 30 s): python -m epi gpu-check --device cpu "
            f"(writes {REHEARSAL_OUT}/)")


# ---- the three parts -------------------------------------------------------------------------------------
def bench_part(p: Plan, shape: str) -> dict:
    """Return `epi.bench.measure` of one shape plus the issue-17 target where it applies, and `ok`."""
    from . import bench
    m = bench.measure(shape, reps=p.reps, device=p.device, batch=p.batch, seq=p.seq)
    if shape == TARGET_SHAPE and p.cuda:
        m["target"] = {"step_ratio_max": STEP_RATIO_TARGET, "met": m["step"]["ratio"] <= STEP_RATIO_TARGET}
    m["ok"] = bool(m["refresh"]["exact"])  # the radix threshold must equal kthvalue's
    return m


def _examples(vocab: int, seq: int, per_task: int, tasks: Sequence[str]) -> dict:
    """Return {task: [{"input_ids", "labels", "task"}]}; each task draws tokens from its own range."""
    width = vocab // len(tasks)
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, task in enumerate(tasks):
        ids = [torch.randint(i * width, (i + 1) * width, (seq,), generator=g) for _ in range(per_task)]
        out[task] = [{"input_ids": x, "labels": x.clone(), "task": task} for x in ids]
    return out


def _trainer_run(p: Plan, method: str, work: Path) -> dict:
    """Return one Trainer run's numbers through `epi.integrations.recipe.run_method` (notebook 07's recipe:
    EPICallback + ProtectedDriftSpy, gradient accumulation, precision from the device: bf16 autocast on Ampere
    or newer)."""
    from . import EPIConfig
    from .integrations.hf import TaskCollator, task_blocks
    from .integrations.recipe import Recipe, choose_precision, run_method
    from .models.shapes import SHAPES, random_model

    block = p.trainer_micro_batch * p.grad_accum
    data = _examples(SHAPES[p.model_shape]["vocab_size"], p.trainer_seq, block * (p.trainer_steps // 2 + 1), ("a", "b"))
    capability = torch.cuda.get_device_capability(p.device) if p.cuda else None
    recipe = Recipe(
        load_base=lambda: (random_model(p.model_shape, p.device, torch.float32), None),  # fp32 master weights
        train_order=task_blocks(data, block, seed=0),  # one task per optimizer step, read in order
        collator=TaskCollator(), evaluate=lambda model: {},  # random weights: nothing to score
        epi_config=lambda scope: EPIConfig(scope=scope, ratio=0.05, refresh_every=p.trainer_refresh_every,
                                           warmup_steps=p.trainer_warmup, beta=0.99),
        output_dir=work / "trainer", max_steps=p.trainer_steps, micro_batch=p.trainer_micro_batch,
        grad_accum=p.grad_accum, lr=1e-4, weight_decay=0.1, clip=1.0,
        precision=choose_precision("auto", cuda=p.cuda, capability=capability), seed=0, cuda=p.cuda)
    r, _ = run_method(recipe, method)
    drift = r["drift"]
    out = {"method": method, "scope": "global" if method == "epi" else "per_task", "precision": recipe.precision,
           "micro_batch": p.trainer_micro_batch, "grad_accum": p.grad_accum, "seq": p.trainer_seq,
           "train_s": r["train_s"], "optimizer_steps": r["steps"], "engine_observations": r["engine_steps"],
           "refresh_steps": sorted({h["step"] for h in r["history"]}), "isolated_steps": r["isolated_steps"],
           "max_protected_drift": max(drift) if drift else None, "protected_fraction": r["protected_fraction"],
           "isolation_mode": r["mode"], "peak_gib": r["peak_gib"]}
    out["ok"] = (out["isolated_steps"] > 0 and out["max_protected_drift"] == 0.0
                 and out["engine_observations"] == out["optimizer_steps"] == p.trainer_steps)
    return out


def trainer_part(p: Plan, work: Path) -> dict:
    """Return the Trainer runs of `epi` (global scope, grad isolation) and `epi_per_task` (restore) and `ok`."""
    runs = [_trainer_run(p, method, work) for method in ("epi", "epi_per_task")]
    return {"model_shape": p.model_shape, "runs": runs, "ok": all(r["ok"] for r in runs)}


def stand_in_datasets(folder: Path, n_train: int, n_eval: int) -> Optional[Dict[str, str]]:
    """Return the environment that sends the hub loader to a stand-in mirror written to `folder`, or None
    when this `epi` has no mirror writer."""
    try:
        from .tasks.hub import MIRROR_ENV
        from .tasks.mirror import write_mirror
    except ImportError:
        return None
    write_mirror(folder, n_train=n_train, n_eval=n_eval)
    return {MIRROR_ENV: str(folder)}


def notebook_part(p: Plan, work: Path, timeout_s: float) -> dict:
    """Return notebook 07's run in the gpu profile (papermill, a random-init model, stand-in data) and `ok`."""
    from .models.shapes import save_random_model
    from .nb import repo_root
    root = repo_root()
    env = stand_in_datasets(work / "hub-mirror", p.notebook_train_records, max(4, p.notebook_eval))
    if env is None:
        return {"skipped": "stand-in datasets not available (this epi has no epi.tasks.mirror.write_mirror)"}
    model_dir = save_random_model(p.model_shape, work / f"model-{p.model_shape}")
    out_dir = work / "notebook07"
    shutil.rmtree(out_dir, ignore_errors=True)  # the gpu profile reloads finished methods: train them afresh
    params = {"PROFILE": "gpu", "SEED": 0, "MODEL_NAME": str(model_dir), "OUTPUT_DIR": str(out_dir),
              "MAX_STEPS": p.notebook_steps, "WARMUP_STEPS": p.notebook_warmup,
              "REFRESH_EVERY": p.notebook_refresh_every, "TRAIN_RECORDS": p.notebook_train_records,
              "EVAL_LIMIT": p.notebook_eval, "MAX_NEW_TOKENS": p.notebook_new_tokens}
    executed = work / "07_gpu_multitask_sft.executed.ipynb"
    env = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(root)] + [x for x in [os.environ.get("PYTHONPATH")] if x])}
    cmd = [sys.executable, "-m", "papermill", str(root / "notebooks" / "07_gpu_multitask_sft.ipynb"), str(executed),
           "-y", json.dumps(params), "-k", "python3", "--cwd", str(root / "notebooks"), "--no-progress-bar"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"notebook 07 ran past the {timeout_s:.0f} s left of the budget and was stopped",
                "params": params}
    wall = time.perf_counter() - t0
    logfile = work / "notebook07.log"
    logfile.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"ok": False,
                "reason": f"papermill exited {proc.returncode}: {_last_error(proc.stderr)} (log: {logfile})",
                "params": params, "papermill_s": wall}
    summary = json.loads((out_dir / "summary.json").read_text())
    numbers = summary.get("numbers", {})
    drift = numbers.get("max_protected_drift")
    methods = numbers.get("methods") or []
    return {"params": params, "papermill_s": wall, "precision": numbers.get("precision"),
            "device": numbers.get("device"), "methods": methods, "methods_asked": numbers.get("methods_asked"),
            "steps": numbers.get("steps"), "train_s": numbers.get("train_s"), "eval_s": numbers.get("eval_s"),
            "peak_gib": {m: _saved_result(Path(numbers.get("save_dir") or out_dir / "methods"), m).get("peak_gib")
                         for m in methods},
            "max_protected_drift": drift,
            "claims": [{k: c.get(k) for k in ("claim", "verdict")} for c in summary.get("claims", [])],
            "ok": drift == 0.0}


def _saved_result(save_dir: Path, method: str) -> dict:
    """Return the result notebook 07 saved for `method` (epi.integrations.method_store), or {} when there is none."""
    try:
        return json.loads((save_dir / method / "result.json").read_text()).get("result", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _last_error(text: str) -> str:
    """Return the last line of a traceback that names an exception (else the last non-empty line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line)]
    return (named or lines or ["no output"])[-1][:400]


# ---- running, budget, files ------------------------------------------------------------------------------
def _free(device: str) -> None:
    import gc
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _missing_for_notebook() -> List[str]:
    return [m for m in ("papermill", "ipykernel", "datasets") if importlib.util.find_spec(m) is None]


def run_part(name: str, estimate_s: float, left_s: float, fn: Callable[[], dict]) -> dict:
    """Return the record of one part: status ok | failed | error | skipped, wall_s, reason, result."""
    record = {"part": name, "estimate_s": round(estimate_s, 1), "status": "skipped", "wall_s": 0.0, "reason": None,
              "result": None}
    if left_s < estimate_s:
        record["reason"] = f"budget: needs about {estimate_s:.0f} s, {max(0.0, left_s):.0f} s left"
        return record
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # one broken part must not cost the GPU minutes of the others
        log.exception("part %s raised", name)
        record.update(status="error", reason=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc(limit=6).splitlines()[-12:])
    else:
        if "skipped" in result:
            record["reason"] = result.pop("skipped")
        else:
            record["status"] = "ok" if result.pop("ok") else "failed"
            record["reason"] = result.pop("reason", None)
            record["result"] = result
    record["wall_s"] = round(time.perf_counter() - t0, 2)
    return record


def run_check(p: Plan, out: Path, work: Path, command: str, say: Callable[[str], None] = log.info) -> dict:
    """Run every part within `p.budget_s`, write gpu_check.md / gpu_check.json / provenance.json to `out`;
    return the JSON record. Raises NoGPUError first when the plan needs CUDA and none is present."""
    from .jsonio import write_json
    require_device(p.device)
    t0 = time.perf_counter()
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    parts: List[dict] = []

    def left() -> float:
        return p.budget_s - (time.perf_counter() - t0)

    def part(name: str, fn: Callable[[], dict], needs: Sequence[str] = ()) -> None:
        if needs:
            record = {"part": name, "estimate_s": p.estimate(name), "status": "skipped", "wall_s": 0.0,
                      "reason": f"{', '.join(needs)} not installed (pip install -e '.[notebooks]', or carry the "
                                "wheels listed in results/gpu/README.md)", "result": None}
        else:
            record = run_part(name, p.estimate(name), left(), fn)
        parts.append(record)
        _free(p.device)  # a part that failed on the GPU leaves nothing behind for the next one
        reason = f" · {record['reason']}" if record["reason"] else ""
        say(f"{name}: {record['status']} in {record['wall_s']:.1f} s{reason}")

    for shape in p.shapes:
        part(f"bench {shape}", lambda shape=shape: bench_part(p, shape))
    part("trainer", lambda: trainer_part(p, work))
    part("notebook 07", lambda: notebook_part(p, work, left() - 5), needs=_missing_for_notebook())
    record = {"command": command, "device": p.device, "budget_s": p.budget_s,
              "wall_s": round(time.perf_counter() - t0, 1), "plan": asdict(p), "parts": parts,
              "ok": all(r["status"] in ("ok", "skipped") for r in parts)}
    prov = provenance(p, command)
    write_json(out / "gpu_check.json", record)  # strict JSON: a number that is not finite is written as null
    write_json(out / "provenance.json", prov)
    (out / "gpu_check.md").write_text(markdown(record, prov))
    return json.loads((out / "gpu_check.json").read_text())


def provenance(p: Plan, command: str) -> dict:
    """Return where and how the check ran: device, GPU name and capability, versions, date, command, commit."""
    import transformers
    info = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": p.device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if p.cuda and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(p.device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(gpu=None, capability=None, gpu_memory_gib=None)
    for package in ("papermill", "datasets", "accelerate"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    info["git_commit"] = _git("rev-parse", "HEAD") or None
    info["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no")) if info["git_commit"] else None
    return info


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(record: dict, prov: dict) -> str:
    """Return the check's report: a header naming the command and hardware, then one table per part."""
    from .bench import table
    if prov["gpu"]:
        where = f"{prov['gpu']} (capability {prov['capability']}, {prov['gpu_memory_gib']} GiB)"
    else:
        where = f"CPU rehearsal ({prov['platform']}, {prov['torch_threads']} torch thread(s))"
    lines = [f"# Prepared GPU check · {where}", "",
             f"Made by `{record['command']}` on {prov['date']} in {record['wall_s']:.0f} s of a "
             f"{record['budget_s']:.0f} s budget · torch {prov['torch']} (CUDA {prov['cuda']}) · transformers "
             f"{prov['transformers']} · commit {prov['git_commit']}{' (modified)' if prov['git_dirty'] else ''}. "
             "Raw numbers: `gpu_check.json`; provenance: `provenance.json`.", "",
             "| part | status | wall (s) | result or reason |", "|---|---|---|---|"]
    by_name = {r["part"]: r for r in record["parts"]}
    for r in record["parts"]:
        lines.append(f"| {r['part']} | {r['status']} | {r['wall_s']:.1f} | {_summary(r)} |")
    benches = [r["result"] for r in record["parts"] if r["part"].startswith("bench ") and r["result"]]
    if benches:
        b = benches[0]
        lines += ["", f"## Engine benchmark ({b['dtype']} weights on {b['device']}, batch {b['batch']} × {b['seq']} "
                      f"tokens, median of {b['reps']} interleaved steps per setup)", "", table(benches)]
        for m in benches:
            if "target" in m:
                t = m["target"]
                lines.append(f"\nTarget (issue 17): EPI step ≤ {t['step_ratio_max']}× plain fused AdamW on "
                             f"{m['shape']}: "
                             f"{m['step']['ratio']:.3f}× → {'met' if t['met'] else 'NOT met'}.")
    trainer = by_name.get("trainer", {}).get("result")
    if trainer:
        lines += ["", f"## Trainer path (epi.integrations.recipe.run_method, EPICallback, {trainer['model_shape']} "
                      "random init)", "",
                  "| scope | precision | micro-batch × accumulation × tokens | optimizer steps | engine observations "
                  "| refresh steps | isolated steps | max protected drift | protected share | isolation mode "
                  "| train (s) | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in trainer["runs"]:
            lines.append(f"| {t['scope']} | {t['precision']} | {t['micro_batch']} × {t['grad_accum']} × {t['seq']} "
                         f"| {t['optimizer_steps']} | {t['engine_observations']} | {t['refresh_steps']} "
                         f"| {t['isolated_steps']} | {_fmt(t['max_protected_drift'], 1)} "
                         f"| {_fmt(t['protected_fraction'])} "
                         f"| {t['isolation_mode']} | {_fmt(t['train_s'], 1)} | {_fmt(t.get('peak_gib'), 2)} |")
    nb = by_name.get("notebook 07", {}).get("result")
    if nb and nb.get("train_s"):
        prm = nb["params"]
        left_out = sorted(set(nb.get("methods_asked") or []) - set(nb["methods"]))
        lines += ["", f"## Notebook 07 (PROFILE=gpu, random-init {Path(prm['MODEL_NAME']).name}, stand-in datasets "
                      f"of {prm['TRAIN_RECORDS']} records per task, {nb['steps']} steps per method ("
                      f"{prm['WARMUP_STEPS']} warm-up, refresh every {prm['REFRESH_EVERY']}), "
                      f"{prm['EVAL_LIMIT']} prompts per task)", "",
                  f"papermill {nb['papermill_s']:.0f} s · precision {nb['precision']} · max protected drift "
                  f"{_fmt(nb['max_protected_drift'], 1)}"
                  + (f" · left out by the memory plan: {', '.join(left_out)}" if left_out else ""), "",
                  "| method | train (s) | eval (s) | peak GiB |", "|---|---|---|---|"]
        for m in nb["methods"]:
            lines.append(f"| {m} | {_fmt(nb['train_s'].get(m), 1)} | {_fmt((nb['eval_s'] or {}).get(m), 1)} "
                         f"| {_fmt((nb.get('peak_gib') or {}).get(m), 2)} |")
    return "\n".join(lines) + "\n"


def _summary(r: dict) -> str:
    if r["result"] is None:
        return r["reason"] or ""
    res = r["result"]
    if r["part"].startswith("bench "):
        s = (f"step ratio {res['step']['ratio']:.3f} (lean {res['lean_step']['ratio']:.3f}), refresh ratio "
             f"{res['refresh']['ratio']:.2f} (exact {res['refresh']['exact']})")
        if "target" in res:
            s += f"; target ≤ {res['target']['step_ratio_max']}: {'met' if res['target']['met'] else 'NOT met'}"
        return s
    if r["part"] == "trainer":
        return "; ".join(f"{t['scope']}: max protected drift {_fmt(t['max_protected_drift'], 1)} over "
                         f"{t['isolated_steps']} isolated steps" for t in res["runs"])
    return (f"max protected drift {_fmt(res.get('max_protected_drift'), 1)}; methods {res.get('methods')}"
            + (f"; {r['reason']}" if r["reason"] else ""))

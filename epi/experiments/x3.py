"""X3 — does importance drift beyond the estimation noise floor? (issue 15, item 4)

Plain SFT (full_sft) of the profile's tiny-base (its base_seed) on the profile's five-task mix, at the profile's
lr, batch size and 5 × steps_per_task steps in the runner's balanced schedule (the same data order as a mix
full_sft run of this seed). At K evenly spaced checkpoints, step 0 and the last included, importance is estimated
2 × R times with a fixed estimator — the mean of g² over m batches per task, no EMA, no clipping — on disjoint
batch sets (replicate r: A_r and B_r; every replicate its own batches, the same at every checkpoint). The masks,
Jaccards, excess drift and claims are `epi.analysis.noise_floor`'s (its docstring states the design).

  python -m epi.experiments.x3 run --profile cpu --out results/x3      # a few minutes on one thread
  python -m epi.experiments.x3 run --profile smoke --out /tmp/x3        # seconds (CI, notebooks)

Writes drift.csv (scope, t, t2, lag, replicate, j_same_t, j_same_t2, j_cross, excess), per_layer.csv,
scopes.csv, claims.md, summary.json, figures/x3_drift.png and README.md (command, settings, hardware, wall time).
The estimation batches come from the training records (a permutation of their own); disjointness within a
checkpoint is what the design needs, not batches unseen by training. X3 runs on the CPU whatever the runtime
(tiny-base: minutes on one thread); the profile's `device` setting is not read.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch

from ..analysis import noise_floor as nf
from .profiles import resolve

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# per profile: (checkpoints K, replicates R, batches per task per estimate m). R ≥ 4 lets the rule's seeds-level
# bootstrap form a 95 % interval (stats.reaches_level); cpu R = 6 as the issue asks
DESIGN = {"smoke": (3, 4, 1), "cpu": (6, 6, 2)}
ESTIMATION_EPOCH = 10_007   # the estimation batches: the batchers' permutation of this epoch, never a training one


@dataclass
class X3Result:
    """What one X3 run produced: the frames, the claims, the per-scope table and where it wrote them."""
    drift: "pd.DataFrame"       # noise_floor.drift_frame
    per_layer: "pd.DataFrame"   # noise_floor.per_layer_frame
    scopes: "pd.DataFrame"      # noise_floor.scope_table
    claims: List[dict]
    summary: dict
    out: Path


def checkpoint_steps(total: int, k: int) -> List[int]:
    """Return k evenly spaced checkpoint steps from 0 to `total` (both included)."""
    if k < 2 or total < k - 1:
        raise ValueError(f"checkpoints must be >= 2 and <= total steps + 1 (total {total}), got {k}")
    return sorted({round(i * total / (k - 1)) for i in range(k)})


def estimate(model, batchers: Dict[str, object], batch_ids: Sequence[int],
             order: Dict[str, list]) -> Dict[str, List[torch.Tensor]]:
    """Return {task: mean of g² over the given batches of that task}, one float32 tensor per isolatable tensor."""
    from ..engine.config import EPIConfig
    from ..engine.core import isolatable
    params = [p for _, p in isolatable(model, EPIConfig())]
    out = {}
    model.train()
    for task, b in batchers.items():
        acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for i in batch_ids:
            model.zero_grad(set_to_none=True)
            model(**b.batch(order[task][i])).loss.backward()
            torch._foreach_addcmul_(acc, [p.grad for p in params], [p.grad for p in params])
        torch._foreach_div_(acc, float(len(batch_ids)))
        out[task] = acc
    model.zero_grad(set_to_none=True)
    return out


def run(profile: str = "smoke", seed: int = 0, out: str | Path = "results/x3", checkpoints: Optional[int] = None,
        replicates: Optional[int] = None, batches: Optional[int] = None, minimum: float = nf.MINIMUM,
        command: Optional[str] = None, reuse: bool = False) -> X3Result:
    """Train, estimate at every checkpoint, decide the claims and write the results folder; return X3Result.

    reuse: return the results already in `out` when its summary.json was made with the same profile, seed and
    design (the notebook's rerun is then cheap); anything else is computed afresh."""
    from ..engine.config import EPIConfig
    from ..engine.core import isolatable
    from ..models.factory import load_model
    from ..training.data import StepData, balanced_schedule, make_batchers
    from ..training.device import describe
    from ..training.loop import LoopState, TrainConfig, make_optimizer, seed_everything, train_steps
    from .base_build import ensure_base
    from .run import STAGE_SEED_STRIDE

    t0 = time.time()
    k_default, r_default, m_default = DESIGN.get(profile, DESIGN["cpu"])
    k, reps, m = checkpoints or k_default, replicates or r_default, batches or m_default
    if reps < 2 or m < 1:
        raise ValueError(f"replicates must be >= 2 and batches >= 1, got {reps}, {m}")
    if reuse:
        done = load(out)
        if done and _made_with(done.summary, profile, seed, k, reps, m):
            log.info("X3: reusing %s", out)
            return done
    cfg = resolve(profile, protocol="mix", method="full_sft", seed=seed)
    if cfg.model != "tiny-base":
        raise ValueError(f"X3 runs on tiny-base; profile {profile!r} starts from {cfg.model!r} (use smoke or cpu)")
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model, tok = load_model(str(ensure_base(cfg)))
    names = [n for n, _ in isolatable(model, EPIConfig())]
    batchers = make_batchers(tok, cfg.tasks, n=cfg.train_records, seed=cfg.seed, batch_size=cfg.batch_size,
                             max_length=cfg.max_length, difficulty=cfg.difficulty)
    need = 2 * reps * m
    short = {t: len(b) for t, b in batchers.items() if len(b) < need}
    if short:
        raise ValueError(f"{need} estimation batches per task needed (2 × replicates × batches), but the batchers "
                         f"hold {short}: lower replicates/batches or raise train_records")
    order = {t: b.order(ESTIMATION_EPOCH) for t, b in batchers.items()}
    halves = {(r, h): list(range((2 * r + j) * m, (2 * r + j + 1) * m)) for r in range(reps)
              for j, h in enumerate("AB")}
    schedule = balanced_schedule(cfg.tasks, cfg.steps_per_task, seed=cfg.seed * STAGE_SEED_STRIDE)
    data = StepData(batchers, schedule)
    opt = make_optimizer(model, TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay))
    steps = checkpoint_steps(len(schedule), k)
    est, state, train_s = nf.Estimates(), LoopState(), 0.0
    for step in steps:
        t1 = time.time()
        state = train_steps(model, opt, data, steps=step, state=state, clip=cfg.clip, desc=None)
        train_s += time.time() - t1
        for (r, h), ids in halves.items():
            est.add(step, r, h, nf.scope_masks(estimate(model, batchers, ids, order), cfg.ratio, cfg.normalize))
        log.info("X3 checkpoint %d done (%.0f s)", step, time.time() - t0)
    drift = nf.drift_frame(est)
    per_layer = nf.per_layer_frame(est, names)
    scopes = nf.scope_table(drift, minimum)
    claims = nf.decide(drift, minimum)
    wall = time.time() - t0
    summary = {"profile": profile, "seed": cfg.seed, "base_seed": cfg.start_seed, "checkpoints": steps,
               "replicates": reps, "batches_per_task": m, "batch_size": cfg.batch_size, "ratio": cfg.ratio,
               "normalize": cfg.normalize, "lr": cfg.lr, "steps": len(schedule), "tasks": cfg.tasks,
               "coordinates": int(sum(p.numel() for _, p in isolatable(model, EPIConfig()))),
               "claims": claims, "wall_s": round(wall, 1), "train_s": round(train_s, 1),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
               "hardware": f"{describe(torch.device('cpu'))}, {__import__('os').cpu_count()} cores",
               "command": command or f"python -m epi.experiments.x3 run --profile {profile} --seed {seed} --out {out}"}
    out = write(Path(out), drift, per_layer, scopes, claims, summary)
    return X3Result(drift, per_layer, scopes, claims, summary, out)


RESULTS = Path(__file__).resolve().parents[2] / "results" / "x3"  # the committed results (repository root)


def _made_with(summary: dict, profile: str, seed: int, k: int, reps: int, m: int) -> bool:
    """Return True when a summary.json was made with this profile, seed and design (checkpoints, replicates,
    batches per task)."""
    s = summary
    return (s.get("profile"), s.get("seed"), len(s.get("checkpoints", [])), s.get("replicates"),
            s.get("batches_per_task")) == (profile, seed, k, reps, m)


def committed(profile: str, seed: int = 0, folder: str | Path | None = None) -> Optional[X3Result]:
    """Return the X3 results committed in the repository's results/x3 when they were made with this profile,
    seed and the profile's default design, else None.

    Notebook 01 shows them rather than recomputing them (about 5 minutes of the cpu profile's `make reproduce`);
    its RERUN_X3 parameter recomputes them in the notebook's own output folder instead.
    """
    done = load(Path(folder) if folder is not None else RESULTS)
    return done if done and _made_with(done.summary, profile, seed, *DESIGN.get(profile, DESIGN["cpu"])) else None


def load(out: str | Path) -> Optional[X3Result]:
    """Return the X3Result written in `out` (claims re-read from summary.json), or None when there is none."""
    import pandas as pd
    out = Path(out)
    if not (out / "summary.json").is_file() or not (out / "drift.csv").is_file():
        return None
    summary = json.loads((out / "summary.json").read_text())
    return X3Result(pd.read_csv(out / "drift.csv"), pd.read_csv(out / "per_layer.csv"), pd.read_csv(out / "scopes.csv"),
                    summary["claims"], summary, out)


def analyse(out: str | Path, minimum: float = nf.MINIMUM) -> X3Result:
    """Re-decide the claims and rewrite the tables, figure and README of the X3 folder `out` from its drift.csv
    and per_layer.csv (no training); return the X3Result."""
    done = load(out)
    if done is None:
        raise FileNotFoundError(f"no X3 results in {out}: run `python -m epi.experiments.x3 run --out {out}` first")
    scopes, claims = nf.scope_table(done.drift, minimum), nf.decide(done.drift, minimum)
    summary = {**done.summary, "claims": claims,
               "analysed": f"python -m epi.experiments.x3 analyse --out {out} ({time.strftime('%Y-%m-%d')})"}
    write(Path(out), done.drift, done.per_layer, scopes, claims, summary)
    return X3Result(done.drift, done.per_layer, scopes, claims, summary, Path(out))


def _plain(x):
    """Return x with non-finite floats as None (JSON without NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def write(out: Path, drift, per_layer, scopes, claims: List[dict], summary: dict) -> Path:
    """Write the results folder (CSVs, summary.json, claims.md, the figure, README.md); return it."""
    from ..analysis.tables import claims_table, markdown_table
    out.mkdir(parents=True, exist_ok=True)
    drift.to_csv(out / "drift.csv", index=False, float_format="%.6g")
    per_layer.to_csv(out / "per_layer.csv", index=False, float_format="%.6g")
    scopes.to_csv(out / "scopes.csv", index=False, float_format="%.6g")
    (out / "summary.json").write_text(json.dumps(_plain(summary), indent=1, ensure_ascii=False) + "\n")
    fig = nf.figure(drift, out, f"X3 ({summary['profile']}, seed {summary['seed']}): "
                                f"{summary['replicates']} replicates × 2 estimates of {summary['batches_per_task']} "
                                f"batch(es) per task")
    layer_means = per_layer.groupby("tensor")[["j_same_first", "j_same_last", "j_cross", "excess"]].mean()
    ranked = layer_means.sort_values("excess")
    s = summary
    lines = [f"<!-- made by: {s['command']} -->", "",
             f"# X3 claims: drift against the noise floor ({s['profile']}, seed {s['seed']})", "",
             f"Plain SFT of tiny-base (base seed {s['base_seed']}) on {', '.join(s['tasks'])}: {s['steps']} steps, "
             f"lr {s['lr']}, batch {s['batch_size']}; checkpoints at steps {s['checkpoints']}; at each, "
             f"{s['replicates']} replicates × 2 disjoint estimates (mean g² over {s['batches_per_task']} batch(es) "
             f"per task); top-{s['ratio']:.0%} sets, {s['normalize']} normaliser. D = ½(J_same(t) + J_same(t')) − "
             f"J(t, t'). {nf.UNITS}.", "",
             claims_table(claims), "",
             "## Per scope (first vs last checkpoint; per-task verdicts are descriptions, the claims are above)", "",
             markdown_table(scopes), "",
             "## Per tensor (global mask restricted to the tensor; mean over replicates; 3 least and 3 most drifting)",
             "", markdown_table(ranked.iloc[list(range(min(3, len(ranked)))) + list(range(max(3, len(ranked) - 3),
                                                                                      len(ranked)))].reset_index()),
             "", f"![drift]({fig.relative_to(out)})", ""]
    (out / "claims.md").write_text("\n".join(lines))
    readme = [f"# X3 — importance drift against the estimation noise floor ({s['profile']} profile)", "",
              "```bash", s["command"], "```", "",
              f"- profile `{s['profile']}`, training seed {s['seed']}, tiny-base seed {s['base_seed']}",
              f"- hardware: {s['hardware']}; torch {s['torch']}, {s['threads']} thread(s)",
              f"- wall time {s['wall_s']:.0f} s (training {s['train_s']:.0f} s, the rest estimating importance "
              f"{2 * s['replicates'] * len(s['checkpoints'])} times){', run on ' + s['date'] if s.get('date') else ''}",
              *([f"- claims re-decided from drift.csv: `{s['analysed']}`"] if s.get("analysed") else []),
              *([f"- note: {s['note']}"] if s.get("note") else []),
              f"- {s['coordinates']} isolatable coordinates; checkpoints {s['checkpoints']}", "",
              "Files: `drift.csv` (one row per scope, checkpoint pair t ≤ t2, replicate), `per_layer.csv`, "
              "`scopes.csv`, `claims.md`, `summary.json`, `figures/x3_drift.png`. Design: the docstring of "
              "`epi/analysis/noise_floor.py`.", ""]
    (out / "README.md").write_text("\n".join(readme))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epi.experiments.x3", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, estimate, decide and write the results folder")
    r.add_argument("--profile", default="cpu", choices=sorted(DESIGN))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="results/x3")
    r.add_argument("--checkpoints", type=int, default=None)
    r.add_argument("--replicates", type=int, default=None)
    r.add_argument("--batches", type=int, default=None)
    a = sub.add_parser("analyse", help="re-decide the claims from a results folder's drift.csv (no training)")
    a.add_argument("--out", default="results/x3")
    args = p.parse_args(argv)
    if args.command == "analyse":
        res = analyse(args.out)
        print(json.dumps([{k: c[k] for k in ("claim", "verdict")} for c in res.claims], indent=1, ensure_ascii=False))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = "python -m epi.experiments.x3 " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        res = run(args.profile, args.seed, args.out, args.checkpoints, args.replicates, args.batches, command=command)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps([{k: c[k] for k in ("claim", "verdict")} for c in res.claims], indent=1, ensure_ascii=False))
    print(f"wrote {res.out} in {res.summary['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: python -m epi {data, bench, reproduce, ...} (see `python -m epi --help`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _data(args) -> int:
    from .tasks.synthetic import write_dataset
    manifest = write_dataset(args.out, seed=args.seed, difficulty=args.difficulty)
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=1))
    return 0


def _bench(args) -> int:
    import torch
    from . import bench
    try:
        threads = [int(t) for t in str(args.threads).split(",") if t.strip()] or [0]
    except ValueError:
        raise SystemExit(f"--threads takes thread counts separated by commas (e.g. 1,2), got {args.threads!r}")
    if any(t < 0 for t in threads):
        raise SystemExit(f"--threads must be >= 0 (0 = torch's default), got {args.threads!r}")
    if args.reps < 1 or not args.min_seconds >= 0:
        raise SystemExit(f"--reps must be >= 1 and --min-seconds >= 0, got {args.reps} and {args.min_seconds}")
    print(f"# engine benchmark · device={args.device} · torch {torch.__version__} · threads "
          + ",".join(str(t or torch.get_num_threads()) for t in threads))
    print(bench.run(args.shapes.split(","), reps=args.reps, device=args.device, batch=args.batch, seq=args.seq,
                    threads=threads, min_seconds=args.min_seconds))
    return 0


# run settings that also have their own flag; a flag and a --set of the same setting must agree
FLAGS = {"protocol": "--protocol", "method": "--method", "seed": "--seed", "tasks": "--tasks",
         "train_tasks": "--train-tasks"}


def _overrides(args) -> dict:
    """Return the run settings the command line gives: --set items and the flags (which must agree)."""
    from .experiments.profiles import LIST_SETTINGS, parse_sets
    out = parse_sets(args.set)
    for key, flag in FLAGS.items():
        given = getattr(args, key, None)
        if given is None:
            continue  # not given: a --set of it (or the profile's value) stands
        value = [name.strip() for name in given.split(",") if name.strip()] if key in LIST_SETTINGS else given
        if key in out and out[key] != value:
            raise ValueError(f"{flag} {given} and --set {key}={_text(out[key])} disagree; give the setting once")
        out[key] = value
    return out


def _text(value) -> str:
    """Return a setting as a command line writes it (names comma-separated, JSON otherwise)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return value if isinstance(value, str) else json.dumps(value)


def _refuse(message: str) -> int:
    """Print a one-line error (the message's whitespace folded) and return the usage-error exit code."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return 2


def _run(args) -> int:
    from .experiments.profiles import resolve
    from .experiments.runner import RunRefused, output_folder, run_experiment
    from .training.checkpoints import CheckpointError
    try:
        config = resolve(args.profile, **_overrides(args))
    except ValueError as e:
        return _refuse(f"invalid run configuration: {e}")
    try:
        output_folder(args.out)
        print(f"run {config.run_name} · profile {config.profile} · out {args.out}")
        record = run_experiment(config, args.out, say=print, fresh=args.fresh)
    except (RunRefused, CheckpointError) as e:
        return _refuse(str(e))
    scores = " ".join(f"{t}={v:.2f}" for t, v in record["final_scores"].items())
    print(f"done {config.run_name} in {record['wall_s']} s · final {scores}")
    return 0


def _grid(args) -> int:
    from .experiments.profiles import resolve
    from .experiments.runner import RunRefused, output_folder, run_grid
    from .methods.registry import METHODS, MIX_ONLY
    from .training.checkpoints import CheckpointError
    methods = sorted(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        overrides = _overrides(args)
        given = sorted({"method", "seed"} & set(overrides))
        if given:
            raise ValueError(f"--set {given[0]}=... in a grid: give methods with --methods and seeds with --seeds")
        configs = [resolve(args.profile, method=m, seed=s, **overrides) for s in args.seeds for m in methods
                   if not (m in MIX_ONLY and overrides.get("protocol", "mix") != "mix")]
        if args.references:
            configs += [resolve(args.profile, method="full_sft", seed=s, **{**overrides, "protocol": "reference"})
                        for s in args.seeds]
    except ValueError as e:
        return _refuse(f"invalid run configuration: {e}")
    try:
        output_folder(args.out)
        print(f"grid: {len(configs)} runs · profile {args.profile} · {args.workers} worker(s) · out {args.out}",
              flush=True)
        run_grid(configs, args.out, workers=args.workers, say=lambda m: print(m, flush=True))
    except (RunRefused, CheckpointError) as e:
        return _refuse(str(e))
    return 0


def _compare(args) -> int:
    import logging

    from .analysis.compare import summary_table, write_tables
    from .experiments.collect import compare
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")  # skipped files, unpooled runs
    try:
        df = compare(args.root)
    except FileNotFoundError as e:
        return _refuse(str(e))
    print(summary_table(df))
    if args.out:
        write_tables(df, args.out, f"python -m epi compare {args.root} --out {args.out}")
        print(f"wrote {args.out}/summary.csv and summary.md")
    return 0


def _base(args) -> int:
    from .experiments.base_build import build_base
    from .experiments.profiles import resolve
    from .models.base_cache import base_dir, base_meta
    cfg = resolve(args.profile, seed=args.seed, base_seed=args.seed)  # the base of this seed, whatever the profile
    folder = base_dir(cfg)
    if not (folder / "meta.json").exists() or args.force:
        build_base(cfg)
    meta = base_meta(folder)
    print(f"tiny-base seed {args.seed} ({args.profile}): {folder}")
    print(" ".join(f"{t}={s['score']:.2f}" for t, s in meta["scores"].items()), f"· built in {meta['wall_s']} s")
    return 0


def _reproduce(args) -> int:
    from .reproduce import main as reproduce_main
    return reproduce_main(profile=args.profile, seed=args.seed, out=args.out, tier=args.tier)


def _render(args) -> int:
    from .reproduce import RENDERED, render
    return render(profile=args.profile, seed=args.seed, out=args.out,
                  notebooks=args.notebooks.split(",") if args.notebooks else RENDERED)


def _gpu_check(args) -> int:
    from . import gpu_check
    try:
        plan = gpu_check.plan(args.device, args.shapes.split(",") if args.shapes else None, args.budget_s)
        out = args.out or ("results/gpu" if plan.cuda else gpu_check.REHEARSAL_OUT)
        gpu_check.require_device(plan.device)  # before anything else: no GPU, no check (say how to rehearse)
        command = (f"python -m epi gpu-check --device {plan.device} --out {out} --budget-s {plan.budget_s:g}"
                   + (f" --shapes {args.shapes}" if args.shapes else ""))
        print(f"# {command} · work folder {args.work}", flush=True)
        record = gpu_check.run_check(plan, out, args.work, command, say=lambda m: print(m, flush=True))
    except (gpu_check.NoGPUError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/gpu_check.md, gpu_check.json, provenance.json in {record['wall_s']:.0f} s"
          + ("" if record["ok"] else " · some part failed: see gpu_check.md"))
    return 0 if record["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m epi", description="Evolving Parameter Isolation suite")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="regenerate the EPI-Mini sample (byte-identical for a seed)")
    d.add_argument("--out", default="data/epi_mini")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--difficulty", type=int, default=1)
    d.set_defaults(func=_data)

    b = sub.add_parser("bench", help="engine benchmark: step, refresh and memory ratios from one run")
    b.add_argument("--shapes", default="tiny,smollm2-135m")
    b.add_argument("--reps", type=int, default=7, help="EPI steps timed at least (each between two plain steps)")
    b.add_argument("--min-seconds", type=float, default=20.0,
                   help="keep timing short steps until this many seconds have passed (at most 100 x reps)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--seq", type=int, default=128)
    b.add_argument("--threads", default="0", help="torch threads, one measurement per count: e.g. 1,2 (0 = default)")
    b.set_defaults(func=_bench)

    run = sub.add_parser("run", help="run one experiment (resumes from its checkpoint when restarted)")
    run.add_argument("--method", default=None, help="default: the profile's (full_sft)")
    run.add_argument("--profile", default="cpu")
    run.add_argument("--protocol", default=None)
    run.add_argument("--seed", type=int, default=None, help="default: 0")
    run.add_argument("--tasks", default=None, help="comma-separated task names")
    run.add_argument("--train-tasks", dest="train_tasks", default=None, help="forgetting protocol: tasks trained")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any experiment setting")
    run.add_argument("--out", default="artifacts/runs")
    run.add_argument("--fresh", action="store_true",
                     help="discard what an earlier attempt of this run left in --out (checkpoint, results); "
                          "start over")
    run.set_defaults(func=_run)

    g = sub.add_parser("grid", help="run methods × seeds (finished runs are reused), in parallel workers")
    g.add_argument("--methods", default="all", help="comma-separated, or 'all'")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--profile", default="cpu")
    g.add_argument("--protocol", default=None)
    g.add_argument("--tasks", default=None)
    g.add_argument("--train-tasks", dest="train_tasks", default=None)
    g.add_argument("--references", action="store_true", help="also run the single-task references")
    g.add_argument("--set", action="append", metavar="KEY=VALUE")
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--out", default="artifacts/runs/cpu")
    g.set_defaults(func=_grid)

    c = sub.add_parser("compare", help="table of method × task (mean ± sd over seeds) from finished runs")
    c.add_argument("root")
    c.add_argument("--out", default=None, help="folder for summary.csv and summary.md")
    c.set_defaults(func=_compare)

    ba = sub.add_parser("base", help="pre-train and cache tiny-base for a seed")
    ba.add_argument("--profile", default="cpu")
    ba.add_argument("--seed", type=int, default=0)
    ba.add_argument("--force", action="store_true")
    ba.set_defaults(func=_base)

    r = sub.add_parser("reproduce", help="the main job on a profile (see README)")
    r.add_argument("--profile", default="cpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="artifacts")
    r.add_argument("--tier", choices=["quick", "full"], default=None,
                   help="quick: each grid sized to its lesson (the cpu default, ~30 min on 2 cores); full: every "
                        "notebook's own defaults (3 seeds of every arm, ~80 min at cpu)")
    r.set_defaults(func=_reproduce)

    rn = sub.add_parser("render", help="executed copies of the notebooks, with figures, in docs/notebooks (for GitHub)")
    rn.add_argument("--profile", default="smoke")
    rn.add_argument("--seed", type=int, default=0)
    rn.add_argument("--out", default="docs/notebooks")
    rn.add_argument("--notebooks", default=None, help="comma-separated prefixes (default: 01,...,07)")
    rn.set_defaults(func=_render)

    gc = sub.add_parser("gpu-check", help="the prepared GPU check: engine benchmark, Trainer path and notebook 07 "
                                          "on one GPU, offline, in <= 8 min (results/gpu; --device cpu rehearses it)")
    gc.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the rehearsal: tiny shapes, fp32)")
    gc.add_argument("--out", default=None, help="default results/gpu; artifacts/gpu-rehearsal with --device cpu")
    gc.add_argument("--budget-s", dest="budget_s", type=float, default=None,
                    help="seconds for all parts (default 480 on cuda, 240 on cpu); a part that would not fit is skipped")
    gc.add_argument("--shapes", default=None, help="benchmark shapes, comma-separated (default qwen2.5-0.5b,qwen2.5-1.5b)")
    gc.add_argument("--work", default="artifacts/gpu_check", help="scratch folder: model folders, executed notebook")
    gc.set_defaults(func=_gpu_check)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: python -m epi {data, bench, reproduce, ...} (see `python -m epi --help`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _data(args) -> int:
    from .tasks.synthetic import write_dataset
    manifest = write_dataset(args.out, seed=args.seed)
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=1))
    return 0


def _bench(args) -> int:
    import torch
    from . import bench
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# engine benchmark · device={args.device} · torch {torch.__version__} · threads {torch.get_num_threads()}")
    print(bench.run(args.shapes.split(","), reps=args.reps, device=args.device, batch=args.batch, seq=args.seq))
    return 0


def _reproduce(args) -> int:
    from .reproduce import main as reproduce_main
    return reproduce_main(profile=args.profile, seed=args.seed, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m epi", description="Evolving Parameter Isolation suite")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="regenerate the EPI-Mini sample (byte-identical for a seed)")
    d.add_argument("--out", default="data/epi_mini")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_data)

    b = sub.add_parser("bench", help="engine benchmark: step, refresh and memory ratios from one run")
    b.add_argument("--shapes", default="tiny,smollm2-135m")
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--device", default="cpu")
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--seq", type=int, default=128)
    b.add_argument("--threads", type=int, default=0)
    b.set_defaults(func=_bench)

    r = sub.add_parser("reproduce", help="the main job on a profile (see README)")
    r.add_argument("--profile", default="cpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="artifacts")
    r.set_defaults(func=_reproduce)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

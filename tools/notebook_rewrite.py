"""The loop both notebook tools share: rewrite each notebook through a function, or only report (--check)."""
import argparse
import json
from pathlib import Path
from typing import Callable


def main(transform: Callable[[dict, Path], dict], stale_message: str) -> int:
    """Apply `transform(nb, path)` to the notebooks named on the command line (in place, or with --check only
    list the ones that would change and return 1); return a process exit code."""
    p = argparse.ArgumentParser()
    p.add_argument("paths", nargs="+")
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    stale = []
    for path in map(Path, args.paths):
        text = path.read_text()
        new = json.dumps(transform(json.loads(text), path), indent=1, ensure_ascii=False) + "\n"
        if new != text:
            stale.append(str(path))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(stale_message, *stale, sep="\n  ")
        return 1
    return 0

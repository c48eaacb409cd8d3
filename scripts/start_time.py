"""Start-up cost of the commands people type most, against another checkout side by side (same machine, same
session, alternating runs so load drifts hit both):

    python scripts/start_time.py --index IDX --key KEY [--run RUN --image IMG] [--baseline /old/checkout]

Prints the median and range of wall seconds per command and the ratio baseline / this tree."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(tree: Path, args) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mclfir_dist.cli", *args], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--attribute", default="colour")
    ap.add_argument("--baseline", type=Path, help="another checkout of mclfir_dist (e.g. a git worktree)")
    ap.add_argument("--run", help="with --image: also time an image query through the run's model")
    ap.add_argument("--image")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    commands = {"mclfir --help": ["--help"],
                "mclfir search --key": ["search", "--index", args.index, "--key", args.key, "--attribute",
                                        args.attribute, "--k", "10"]}
    if args.run and args.image:
        commands["mclfir search --run --image"] = ["search", "--run", args.run, "--index", args.index, "--image",
                                                   args.image, "--attribute", args.attribute, "--k", "10"]
    trees = {"this tree": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    print(f"python {sys.version.split()[0]}, {args.repeats} runs each, alternating; seconds (median [min, max])")
    for name, cmd in commands.items():
        times = {t: [] for t in trees}
        for _ in range(args.repeats):
            for t, tree in trees.items():
                times[t].append(timed(tree, cmd))
        cells = [f"{t}: {statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]" for t, v in times.items()]
        ratio = (f"  baseline / this tree = {statistics.median(times['baseline']) / statistics.median(times['this tree']):.1f}x"
                 if "baseline" in times else "")
        print(f"{name:22s} " + "   ".join(cells) + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())

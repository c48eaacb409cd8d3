"""Seconds per training step of several methods, measured side by side.

    python -m mclfir_dist.bench.cost --config configs/fpi96_cpu.yaml --rounds 4 --steps 10 \\
        --arm mclfir 0 train.method=mclfir --arm mclfir 5 train.method=mclfir \\
        --arm static 5 train.method=static_joint  [key=value ...: for every arm]

A host's speed drifts within a session (one run went from 0.71 to 1.08 s/step over two hours on a 2-core Xeon
with nothing else running), so runs timed hours apart mix the method with the hour. Here each arm (a name, an
increment and its overrides) lives in its own process (one Accelerator each) and is warmed up once; then the arms
take turns, --rounds times, each running --steps end-to-end steps (the real loader feeding the engine's whole
step) while the others wait; each round starts at the next arm. An arm's seconds per step is its median over
rounds. Numbers only; nothing is asserted. `scripts/fpi96_study.py --phase cost` prices the cost claim with it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

from . import run_main
from ..errors import OutputError
from ..runfolder.record import machine_info
from ..utils.io import atomic_write_text

TAG = "@@cost "   # the protocol's lines on a child's stdout; anything else there is the child's own output


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # misuse is one line, as in every command
        print(f"bench.cost: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--arm", nargs="+", action="append", metavar="ARG",
                    help="a method to time: a name, the increment to open, its overrides (repeat for each arm)")
    ap.add_argument("--rounds", type=int, default=4, help="turns each arm takes")
    ap.add_argument("--steps", type=int, default=10, help="timed end-to-end steps per turn")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per arm before the first round")
    ap.add_argument("--out", help="scratch folder for the arms' run folders and logs (default: a temporary one)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--serve-arm", type=int, metavar="INCREMENT", help=argparse.SUPPRESS)   # a child process
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    if args.serve_arm is None:
        bad = [a for a in args.arm or [] if len(a) < 2 or not a[1].isdigit()]
        if not args.arm or bad:
            ap.error(f"give each --arm as NAME INCREMENT [KEY=VALUE ...]; got {bad[0] if bad else 'none'}")
        if min(args.rounds, args.steps) < 1 or args.warmup < 0:
            ap.error("--rounds and --steps must be at least 1, --warmup at least 0")
    return args


def serve_arm(args: argparse.Namespace) -> None:
    """The child: open the increment, warm up, then run `n` steps for each line `n` on stdin and answer with
    the seconds they took."""
    from .step import Bench
    bench = Bench(argparse.Namespace(config=args.config, overrides=args.overrides, out=args.out,
                                     warmup=args.warmup, steps=0), index=args.serve_arm)
    for _ in range(bench.held):   # the batches its queues filled while it was built
        next(bench.batches)
    if args.warmup:
        bench.steps(bench.batches, args.warmup)
    ips = bench.images_per_step
    print(TAG + json.dumps({"images_per_step": ips, "increment": bench.index,
                            "train_heads": list(bench.plan.train_heads)}), flush=True)
    for line in sys.stdin:
        n = int(line)
        print(TAG + json.dumps({"seconds": n * ips / bench.steps(bench.batches, n)}), flush=True)


class Arm:
    def __init__(self, name: str, increment: int, overrides: Sequence[str], args, folder: Path):
        self.name, self.increment = name, increment
        self.log = folder / f"{name}_{increment}.log"
        cmd = [sys.executable, "-m", "mclfir_dist.bench.cost", "--config", args.config, "--serve-arm",
               str(increment), "--warmup", str(args.warmup), "--out", str(folder / f"{name}_{increment}"),
               *args.overrides, *overrides]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log.open("w"), text=True)
        self.per_step: List[float] = []

    def answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        self.proc.wait()
        tail = [ln for ln in self.log.read_text().splitlines() if ln.strip()][-1:] or ["(no output)"]
        if self.proc.returncode == 2:   # a wrong key or increment: the child's own line, once
            print(f"bench.cost: arm {self.name}: {tail[0]}", file=sys.stderr)
            raise SystemExit(2)
        raise SystemExit(f"bench.cost: arm {self.name} (increment {self.increment}) failed (exit "
                         f"{self.proc.returncode}): {tail[0]}; its log: {self.log}")

    def turn(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        seconds = self.answer()["seconds"] / steps
        self.per_step.append(seconds)
        return seconds

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(args: argparse.Namespace, folder: Path) -> Dict[str, dict]:
    """Every arm started and warmed up one at a time (no two ever run at once), then the rounds."""
    arms: List[Arm] = []
    try:
        for name, increment, *overrides in args.arm:
            arm = Arm(name, int(increment), overrides, args, folder)
            arms.append(arm)
            arm.info = arm.answer()
            print(f"  {name} at increment {increment}: ready ({', '.join(arm.info['train_heads'])})", flush=True)
        for r in range(args.rounds):
            for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
                arm.turn(args.steps)
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{a.name}@{a.increment} "
                  f"{a.per_step[-1]:.3f}" for a in arms) + " s/step", flush=True)
    finally:
        for arm in arms:
            arm.close()
    return {f"{a.name}@{a.increment}": {"name": a.name, "increment": a.increment, "per_step": a.per_step,
                                       "median": statistics.median(a.per_step), **a.info} for a in arms}


def report(results: Dict[str, dict]) -> None:
    first = next(iter(results.values()))["median"]
    print(f"\n{'arm':24s} {'s/step (median)':>16s} {'range':>17s} {'x first':>8s}")
    for key, r in results.items():
        print(f"{key:24s} {r['median']:16.3f} {min(r['per_step']):8.3f}-{max(r['per_step']):.3f} "
              f"{r['median'] / first:8.2f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.serve_arm is not None:
        serve_arm(args)
        return {}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out or tmp)
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"--out {folder}: not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        results = measure(args, folder)
    report(results)
    if args.json:   # with where and how it was measured: seconds per step compare only on one machine
        record = {"arms": results, "machine": machine_info(), "measured_at": started, "rounds": args.rounds,
                  "steps": args.steps, "warmup": args.warmup, "config": str(args.config), "overrides": args.overrides}
        atomic_write_text(args.json, json.dumps(record, indent=1))
    return results


if __name__ == "__main__":
    run_main(main)

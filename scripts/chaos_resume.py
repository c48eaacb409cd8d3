"""Kill -9 chaos test of recovery: a tiny run is killed at N random points (random times, and inside
checkpoint writes), resumed with `--resume auto` until it finishes, and compared with an uninterrupted
run: accuracy matrix and every weight of the final checkpoint must be bit-identical.

    python scripts/chaos_resume.py N [--seed S] [--workdir DIR]      (scripts/chaos_resume.sh N)

Each trial builds its own shard set, so kills also land inside shard building. Prints one line per
trial and `exact: K/N`; exits 1 unless every trial was exact.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "data.build.synthetic.num_images=240", "data.build.synthetic.image_size=32", "data.build.samples_per_shard=60",
    "data.build.min_value_count=4", "data.image_size=32", "data.batch_doublets=8", "data.num_workers=0",
    "data.eval_batch_size=64", "model.head_channels=32", "model.embed_dim=16", "train.steps_per_increment=12",
    "train.checkpoint_every=2", "train.log_every=6", "train.num_threads=1", "eval.grid_queries=0",
    "eval.frozen_baseline=false", "optim.warmup_steps=2", "teacher.warmup_steps=5",
    "train.increments=[{name: a, attributes: [colour]},{name: b, attributes: [garment_length]},"
    "{name: c, attributes: [pattern]}]",
]


def command(run: Path, shards: Path):
    return [sys.executable, "-m", "mclfir_dist.train", "--config", str(ROOT / "configs/debug_cpu.yaml"),
            "--out", str(run), "--resume", "auto", f"data.shards={shards}", *OVERRIDES]


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def final_state(run: Path):
    import torch
    state = torch.load(sorted((run / "checkpoints").glob("increment_*.pt"))[-1], weights_only=True)
    flat = {}

    def walk(obj, prefix):
        for k, v in obj.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                flat[prefix + k] = v
    walk({"model": state["model"], "method": state["method"]}, "")
    return flat


def same(run: Path, reference: Path) -> str:
    """'' if run ended exactly like reference, else what differs."""
    import torch
    res, ref = (json.loads((r / "results.json").read_text()) for r in (run, reference))
    if not res.get("complete"):
        return "results.json not complete"
    if res["accuracy_matrix"] != ref["accuracy_matrix"]:
        return f"accuracy matrix differs: {res['accuracy_matrix'][-1]} vs {ref['accuracy_matrix'][-1]}"
    a, b = final_state(run), final_state(reference)
    if a.keys() != b.keys():
        return "checkpoint keys differ"
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    return f"{len(diff)} tensors differ, e.g. {diff[0]}" if diff else ""


def run_until_done(run: Path, shards: Path, kill_after: float, kill_in_write: int, log) -> int:
    """Start, kill once (after kill_after s, or inside checkpoint write number `kill_in_write` when > 0), resume."""
    kills = 0
    p = subprocess.Popen(command(run, shards), cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
    start = time.time()
    writes_seen = set()
    while p.poll() is None:
        if kill_in_write and (run / "checkpoints").is_dir():
            writes_seen |= {t.name for t in (run / "checkpoints").glob(".*.tmp")}
        in_write = kill_in_write and len(writes_seen) >= kill_in_write
        if in_write or (not kill_in_write and time.time() - start >= kill_after):
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            break
        time.sleep(0.002 if kill_in_write else 0.05)
    for _ in range(3):   # resume until finished
        if p.returncode == 0 and kills and json.loads((run / "results.json").read_text()).get("complete"):
            break
        p = subprocess.run(command(run, shards), cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
        if p.returncode == 0:
            break
    return kills


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, help="number of kill -9 trials")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    ap.add_argument("--workdir", help="where runs go (default: a temporary folder)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mclfir_chaos_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    reference = work / "reference"
    with open(work / "reference.log", "w") as log:
        t0 = time.time()
        p = subprocess.run(command(reference, work / "shards_reference"), cwd=ROOT, env=env(), stdout=log,
                           stderr=subprocess.STDOUT)
        wall = time.time() - t0
    if p.returncode != 0:
        print(f"the uninterrupted run failed (rc {p.returncode}); see {work / 'reference.log'}")
        return 1
    print(f"uninterrupted run: {wall:.1f} s; runs under {work}")
    exact = 0
    for trial in range(args.n):
        # every third trial dies inside a checkpoint write (the k-th of the run), the others at a random time
        in_write = rng.randint(1, 12) if trial % 3 == 2 else 0
        kill_after = rng.uniform(0.3, wall)
        run, shards = work / f"trial_{trial:02d}", work / f"shards_{trial:02d}"
        with open(work / f"trial_{trial:02d}.log", "w") as log:
            kills = run_until_done(run, shards, kill_after, in_write, log)
        problem = same(run, reference) if (run / "results.json").is_file() else "no results.json"
        exact += not problem
        when = f"inside checkpoint write {in_write}" if in_write else f"after {kill_after:.1f} s"
        print(f"trial {trial:2d}: killed {kills}x {when}: {'exact' if not problem else 'NOT exact: ' + problem}",
              flush=True)
    print(f"exact: {exact}/{args.n}")
    return 0 if exact == args.n else 1


if __name__ == "__main__":
    sys.exit(main())

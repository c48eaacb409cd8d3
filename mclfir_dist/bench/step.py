"""Where a training step's time goes: model alone, the engine's step, the loader, end to end.

    python -m mclfir_dist.bench.step --config configs/paper_gpu.yaml [--steps 50] [--warmup 10] [key=value ...]

In one run, on the config's first increment with distillation (the second if there is one):
  model      fwd + bwd + optimizer step of trunk + heads on tensors already on the device
  step       the engine's whole step (InfoNCE, method terms, teacher, optimizer, EMA) on a batch already
             on the device: Trainer.train_steps fed the same batch again and again
  loader     the training loader alone at steady state: at least --warmup batches dropped, and at least
             as many as its queues hold (workers x prefetch + the decode thread's), then --steps batches
             (at least 50 on a GPU) timed
  end2end    the engine's step fed by the real loader: its queues (refilled while the step was timed) are
             drained first, then --warmup steps, then --steps timed; undrained, the first timed steps
             would be fed from them and overstate a loader-bound rate
It prints images/s for each and the ratios end2end/step and loader/step (>= 1: the input keeps up), the
ops dispatched per step (each a kernel launch on a GPU: what bounds a small batch), the method's
after-step time (MCL-FIR: the EMA update), the AdamW step alone with each kernel choice
(optim.implementation) side by side and, with --project-doublets, the hours a run would take.
--profile FILE writes torch.profiler's tables for a few end-to-end steps (by self device time and by self
CPU time, and the share of the wall time the device was busy): why a figure is what it is, from one run.
--compare-precision runs the whole bench four times, each in its own process (one Accelerator each): fp32 and
bf16, channels_last off and on, and prints model / step / end2end images/s of each against fp32 without
channels_last (on a CPU: whether its bf16 matrix units pay; without them bf16 is emulated and slower).
Numbers only; nothing is asserted. Runs on CPU at tiny size (tested) and on a GPU at paper size.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from . import run_main
from ..configure import load_config
from ..data import batches_held_ahead
from ..errors import ConfigError
from ..methods import IncrementContext
from ..training.engine import Trainer, rows_per_task
from ..methods.optim import kernel_options
from ..utils.io import atomic_write_text
from ..utils.ops import OpCounter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adamw_ms(params, implementation: str, warmup: int, steps: int, device: torch.device) -> float:
    """ms per AdamW step with optim.implementation's kernels, on copies of `params` and their gradients."""
    copies = [p.detach().clone().requires_grad_() for p in params]
    for copy, p in zip(copies, params):
        copy.grad = p.grad.detach().clone()
    opt = torch.optim.AdamW(copies, lr=1e-4, **kernel_options(implementation, copies))
    for _ in range(max(1, warmup)):
        opt.step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / steps


def ops_per_step(run_steps) -> tuple:
    """(ops, of which in torch.optim) dispatched per step, views left out: run_steps(n) runs n engine steps;
    the count of 2 steps less that of 1, so per-call set-up cancels."""
    counts = []
    for n in (1, 2):
        with OpCounter() as ops:
            run_steps(n)
        counts.append((ops.total, ops.optimizer))
    return counts[1][0] - counts[0][0], counts[1][1] - counts[0][1]


def profile_steps(run_steps, steps: int, device: torch.device, path: str, header: str) -> float:
    """Profile run_steps(steps) and write torch.profiler's op tables to `path`; returns the share of the
    wall time the device was busy (kernels' self time over wall time; 0 on CPU). Low on a GPU: the step is
    bound by the host (launches, Python, the loader), not by the device's arithmetic."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run_steps(steps)
        wall_us = 1e6 * (time.perf_counter() - t0)
    averages = prof.key_averages()
    # the kernels' own rows (the CPU ops that launched them carry the same time again)
    device_us = sum(e.self_device_time_total for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    busy = device_us / wall_us
    sections = [f"{header}\n{steps} end-to-end steps profiled: {wall_us / 1000 / steps:.2f} ms/step wall; "
                f"device busy {100 * busy:.0f}% of it" + ("" if cuda else " (no device: CPU run)")]
    if cuda:
        sections.append("by self device time:\n" + averages.table(sort_by="self_device_time_total", row_limit=25))
    sections.append("by self CPU time:\n" + averages.table(sort_by="self_cpu_time_total", row_limit=25))
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return busy


def increment_with_distillation(trainer, index: Optional[int] = None):
    """(index, plan, context) of increment `index` (default: the second, the first if there is one): the earlier
    increments' heads are added, so the method's distillation through them runs as in a real run."""
    incs = trainer.cfg.train.increments
    index = (1 if len(incs) > 1 else 0) if index is None else index
    if not 0 <= index < len(incs):
        raise ConfigError(f"increment {index}: the config has increments 0-{len(incs) - 1}")
    old = [a for prev in incs[:index] for a in prev.attributes]
    plan = trainer.method.plan(index, incs[index].name, list(incs[index].attributes), old)
    for a in old:
        if a not in trainer.model.heads:
            trainer.model.add_head(a)
    return index, plan, IncrementContext(plan, old)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=50, help="timed steps / batches of each part")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps / batches before each part")
    ap.add_argument("--out", default="runs/bench_step", help="scratch run directory")
    ap.add_argument("--project-doublets", type=int, default=0, metavar="N",
                    help="also print the hours N training doublets would take at the measured end-to-end rate, "
                         "whatever the batch (the paper's 22 tasks x 12,500 steps x 16 doublets: 4400000)")
    ap.add_argument("--profile", metavar="FILE", help="write torch.profiler tables of a few end-to-end steps")
    ap.add_argument("--compare-precision", action="store_true",
                    help="fp32 against bf16, channels_last off and on: four runs side by side, ratios against fp32")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("overrides", nargs="*")
    return ap.parse_intermixed_args(argv)   # overrides may sit between the flags


class Bench:
    """One increment opened through the trainer's public step API, and each part timed on it."""

    def __init__(self, args: argparse.Namespace, index: Optional[int] = None):
        self.args = args
        cfg = load_config(args.config, list(args.overrides) + ["train.checkpoint_every=0", "eval.grid_queries=0",
                                                               f"train.log_every={10 ** 9}"])
        self.trainer = trainer = Trainer.create(cfg, args.out)
        self.cfg, self.rt = trainer.cfg, trainer.runtime   # effective (reference_batch_doublets may scale it)
        self.index, plan, ctx = increment_with_distillation(trainer, index)
        self.session = trainer.open_increment(plan, ctx)
        self.batches = iter(trainer.train_loader(plan))
        self.images_per_step = trainer.images_per_step
        self.held = batches_held_ahead(self.cfg.data)
        self.results: dict = {}

    @property
    def plan(self):
        return self.session.plan

    def rate(self, seconds: float, n: int) -> float:
        return n * self.images_per_step / seconds

    def steps(self, source, n: int) -> float:
        """images/s of n engine steps fed from `source`."""
        _sync(self.rt.device)
        start = time.perf_counter()
        self.trainer.train_steps(self.session.with_steps(n), source)
        _sync(self.rt.device)
        return self.rate(time.perf_counter() - start, n)

    def loader(self) -> None:
        """The loader alone, at steady state: past the first burst (every worker's first batch at once)."""
        for _ in range(max(self.args.warmup, self.held)):
            next(self.batches)
        t0 = time.perf_counter()
        for _ in range(self.args.steps):
            next(self.batches)
        self.results["loader"] = self.rate(time.perf_counter() - t0, self.args.steps)

    def step(self) -> None:
        """The engine's step on a batch already on the device. Images on the device; the rest stays on the
        host as every loader hands it over (the step counts each task's rows from the host copy)."""
        self.batch = batch = next(self.batches)
        self.on_device = {k: (v.to(self.rt.device) if k in ("images", "teacher_images") else v)
                          for k, v in batch.items()}
        fixed = itertools.repeat(self.on_device)
        self.steps(fixed, self.args.warmup)
        self.results["step"] = self.steps(fixed, self.args.steps)
        if not self.cfg.train.compile:   # a dispatch mode would make the compiled graphs retrace
            self.results["ops_per_step"] = ops_per_step(lambda n: self.steps(fixed, n))

    def end_to_end(self) -> None:
        """The step fed by the loader, once the batches its queues filled meanwhile are gone."""
        for _ in range(self.held):
            next(self.batches)
        self.steps(self.batches, self.args.warmup)
        self.results["end2end"] = self.steps(self.batches, self.args.steps)
        if self.args.profile:
            cfg = self.cfg
            header = (f"{cfg.name}: {self.images_per_step} images/step, channels_last {self.rt.channels_last}, "
                      f"compile {cfg.train.compile}, loader {self.trainer.data.loader}, on {self.rt.device}")
            profile_steps(lambda n: self.steps(self.batches, n), min(self.args.steps, 10), self.rt.device,
                          self.args.profile, header)

    def _forward(self):
        images = self.on_device["images"]
        if self.rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        task = self.on_device["task"].to(self.rt.device)
        counts = rows_per_task(self.batch["task"], len(self.plan.train_heads))
        with self.rt.acc.autocast():
            return self.session.model(images, task, self.plan.train_heads, counts)[0].float().pow(2).mean()

    def timed(self, fn, n: int) -> float:
        """Seconds of n calls of fn, after --warmup untimed ones."""
        for _ in range(self.args.warmup):
            fn()
        _sync(self.rt.device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(self.rt.device)
        return time.perf_counter() - t0

    def model_alone(self) -> None:
        """Trunk + heads fwd/bwd + optimizer step on the same batch; the method's after-step work (MCL-FIR:
        the EMA update); the AdamW step alone with each kernel choice, on copies of the trained tensors."""
        optimizer, n = self.session.optimizer, self.args.steps

        def model_step():
            self.rt.acc.backward(self._forward())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.results["model"] = self.rate(self.timed(model_step, n), n)
        unwrapped = self.rt.acc.unwrap_model(self.session.model)
        self.results["after_step_ms"] = 1000 * self.timed(lambda: self.trainer.method.after_step(unwrapped), n) / n
        self.rt.acc.backward(self._forward())
        self.trained = [p for p in unwrapped.parameters() if p.grad is not None]
        self.results["adamw_ms"] = {impl: adamw_ms(self.trained, impl, self.args.warmup, n, self.rt.device)
                                    for impl in ("fused", "foreach", "for_loop")}
        optimizer.zero_grad(set_to_none=True)

    def report(self) -> dict:
        r, cfg, rt, ips = self.results, self.cfg, self.rt, self.images_per_step
        device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "CPU"
        print(f"bench.step on {device}, {rt.world} process(es), {ips} images/step, precision {rt.precision}, "
              f"channels_last {rt.channels_last}, compile {cfg.train.compile}, loader "
              f"{self.trainer.data.loader}, increment {self.index} ({', '.join(self.plan.train_heads)})")
        for name in ("model", "step", "loader", "end2end"):
            print(f"  {name:8s} {r[name]:10.1f} images/s  {1000 * ips / r[name]:8.1f} ms/step")
        r["end2end/step"], r["loader/step"] = r["end2end"] / r["step"], r["loader"] / r["step"]
        print(f"  end2end/step {r['end2end/step']:.2f}   loader/step {r['loader/step']:.2f}")
        if "ops_per_step" in r:
            print(f"  ops dispatched per engine step: {r['ops_per_step'][0]} ({r['ops_per_step'][1]} in the "
                  f"optimizer); each is a kernel launch on a GPU (or a few, for a multi-tensor op)")
        print(f"  {cfg.train.method} after_step (EMA teacher update for mclfir): {r['after_step_ms']:.3f} ms")
        group = self.session.optimizer.param_groups[0]
        used = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "torch default"
        print(f"  AdamW step over {len(self.trained)} tensors: "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in r["adamw_ms"].items()) + f" (this run: {used})")
        if self.args.project_doublets:
            n = self.args.project_doublets
            r["projected_hours"] = 2 * n / r["end2end"] / 3600
            print(f"  {n} doublets ({-(-n // (ips // 2))} steps of {ips // 2}) at the end-to-end rate: "
                  f"{r['projected_hours']:.2f} h")
        return r


PRECISION_GRID = (("no", False), ("no", True), ("bf16", False), ("bf16", True))


def compare_precision(args: argparse.Namespace) -> dict:
    """The bench once per (precision, channels_last), each in a fresh process; a table against fp32."""
    common = ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--project-doublets", str(args.project_doublets)]
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision, layout in PRECISION_GRID:
            name = f"{'fp32' if precision == 'no' else precision}{' + channels_last' if layout else ''}"
            out = Path(tmp) / "r.json"
            cmd = [sys.executable, "-m", "mclfir_dist.bench.step", *common, "--json", str(out),
                   "--out", f"{args.out}/{precision}_{int(layout)}", *args.overrides,
                   f"train.mixed_precision={precision}", f"model.channels_last={str(layout).lower()}"]
            print(f"== {name}", flush=True)
            p = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if p.returncode == 2:   # a wrong key or shard folder: the child's own line, once
                lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
                print(lines[-1] if lines else f"bench.step: the {name} run refused its input", file=sys.stderr)
                raise SystemExit(2)
            print(p.stdout[-1500:], end="")
            if p.returncode != 0:
                raise SystemExit(f"bench.step --compare-precision: the {name} run failed (exit {p.returncode})")
            table[name] = json.loads(out.read_text())
    base = table["fp32"]
    print(f"\n{'setting':24s} {'model':>9s} {'step':>9s} {'end2end':>9s}   (images/s; x = against fp32)")
    for name, r in table.items():
        print(f"{name:24s} " + " ".join(f"{r[k]:9.1f}" for k in ("model", "step", "end2end"))
              + "   " + "  ".join(f"{k} {r[k] / base[k]:.2f}x" for k in ("model", "step", "end2end")))
    return table


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare_precision:
        return compare_precision(args)
    bench = Bench(args)
    bench.loader()
    bench.step()
    bench.end_to_end()
    bench.model_alone()
    results = bench.report()
    if args.json:
        atomic_write_text(args.json, json.dumps(results))
    return results


if __name__ == "__main__":
    run_main(main)

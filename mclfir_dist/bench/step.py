"""Where a training step's time goes: model alone, the engine's step, the loader, end to end.

    python -m mclfir_dist.bench.step --config configs/paper_gpu.yaml [--steps 50] [--warmup 10] [key=value ...]

In one run, on the config's first increment with distillation (the second if there is one):
  model      fwd + bwd + optimizer step of trunk + heads on tensors already on the device
  step       the engine's whole step (InfoNCE, method terms, teacher, optimizer, EMA) on a batch already
             on the device: trainer._steps fed the same batch again and again
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
Numbers only; nothing is asserted. Runs on CPU at tiny size (tested) and on a GPU at paper size.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adamw_ms(params, implementation: str, warmup: int, steps: int, device: torch.device) -> float:
    """ms per AdamW step with optim.implementation's kernels, on copies of `params` and their gradients."""
    from ..training.optim import kernel_options
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
    from ..utils.ops import OpCounter
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
    from torch.profiler import ProfilerActivity, profile
    from ..utils.io import atomic_write_text
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


def increment_with_distillation(trainer):
    """(index, plan, context) of the config's second increment (the first if there is one): the earlier
    increments' heads are added, so the method's distillation through them runs as in a real run."""
    from ..methods import IncrementContext
    incs = trainer.cfg.train.increments
    index = 1 if len(incs) > 1 else 0
    old = [a for prev in incs[:index] for a in prev.attributes]
    plan = trainer.method.plan(index, incs[index].name, list(incs[index].attributes), old)
    for a in old:
        if a not in trainer.model.heads:
            trainer.model.add_head(a)
    return index, plan, IncrementContext(plan, old)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=50, help="timed steps / batches of each part")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps / batches before each part")
    ap.add_argument("--out", default="runs/bench_step", help="scratch run directory")
    ap.add_argument("--project-doublets", type=int, default=0, metavar="N",
                    help="also print the hours N training doublets would take at the measured end-to-end rate, "
                         "whatever the batch (the paper's 22 tasks x 12,500 steps x 16 doublets: 4400000)")
    ap.add_argument("--profile", metavar="FILE", help="write torch.profiler tables of a few end-to-end steps")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from ..config import load_config
    from ..data import batches_held_ahead, build_train_loader
    from ..data.streams import epoch_seed
    from ..training.engine import Trainer, rows_per_task
    cfg = load_config(args.config, list(args.overrides) + ["train.checkpoint_every=0", "eval.grid_queries=0",
                                                           f"train.log_every={10 ** 9}"])
    trainer = Trainer(cfg, args.out)
    cfg = trainer.cfg   # effective (train.reference_batch_doublets may have scaled it)
    rt = trainer.runtime
    index, plan, ctx = increment_with_distillation(trainer)
    model, optimizer, scheduler, _, _ = trainer.setup_increment(plan, ctx)
    loader = build_train_loader(cfg.data, trainer.attribute_manifest[plan.train_heads[0]], plan.train_heads,
                                rt.rank, rt.world, epoch_seed(cfg.train.seed, index), trainer.loader_name, rt.device)
    batches = iter(loader)
    images_per_step = trainer.images_per_step
    results = {}

    # loader alone, at steady state: past the first burst (every worker's first batch at once)
    held = batches_held_ahead(cfg.data)
    for _ in range(max(args.warmup, held)):
        next(batches)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    results["loader"] = args.steps * images_per_step / (time.perf_counter() - t0)

    # the engine's step on a batch already on the device
    batch = next(batches)
    # images on the device; the rest stays on the host as every loader hands it over (the step counts
    # each task's rows from the host copy: on the device that count would be a sync per step)
    on_device = {k: (v.to(rt.device) if k in ("images", "teacher_images") else v) for k, v in batch.items()}
    fixed = itertools.repeat(on_device)

    def timed_steps(source, n):
        part = dataclasses.replace(plan, steps=n)
        _sync(rt.device)
        start = time.perf_counter()
        trainer._steps(part, ctx, model, optimizer, scheduler, source, 0, 0.0)
        _sync(rt.device)
        return n * images_per_step / (time.perf_counter() - start)

    timed_steps(fixed, args.warmup)
    results["step"] = timed_steps(fixed, args.steps)
    if not cfg.train.compile:   # a dispatch mode would make the compiled graphs retrace
        results["ops_per_step"] = ops_per_step(lambda n: timed_steps(fixed, n))

    # end to end: the same step fed by the loader, once the batches its queues filled meanwhile are gone
    for _ in range(held):
        next(batches)
    timed_steps(batches, args.warmup)
    results["end2end"] = timed_steps(batches, args.steps)
    if args.profile:
        header = (f"{cfg.name}: {images_per_step} images/step, channels_last {cfg.model.channels_last}, "
                  f"compile {cfg.train.compile}, loader {trainer.loader_name}, on {rt.device}")
        profile_steps(lambda n: timed_steps(batches, n), min(args.steps, 10), rt.device, args.profile, header)

    # model alone: trunk + heads fwd/bwd + optimizer step, same batch
    unwrapped = rt.acc.unwrap_model(model)
    images = on_device["images"]
    if cfg.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    task = on_device["task"].to(rt.device)
    task_counts = rows_per_task(batch["task"], len(plan.train_heads))

    def model_step():
        with rt.acc.autocast():
            emb, _, _ = model(images, task, plan.train_heads, task_counts)
            loss = emb.float().pow(2).mean()
        rt.acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        model_step()
    _sync(rt.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        model_step()
    _sync(rt.device)
    results["model"] = args.steps * images_per_step / (time.perf_counter() - t0)

    # the method's per-step work after the optimizer (MCL-FIR: the EMA teacher update)
    for _ in range(args.warmup):
        trainer.method.after_step(unwrapped)
    _sync(rt.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.method.after_step(unwrapped)
    _sync(rt.device)
    results["after_step_ms"] = 1000 * (time.perf_counter() - t0) / args.steps

    # the optimizer step alone, with each kernel choice, side by side on copies of the trained tensors
    with rt.acc.autocast():
        loss = model(images, task, plan.train_heads, task_counts)[0].float().pow(2).mean()
    rt.acc.backward(loss)
    trained = [p for p in unwrapped.parameters() if p.grad is not None]
    results["adamw_ms"] = {impl: adamw_ms(trained, impl, args.warmup, args.steps, rt.device)
                           for impl in ("fused", "foreach", "for_loop")}
    optimizer.zero_grad(set_to_none=True)
    del unwrapped

    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "CPU"
    print(f"bench.step on {device}, {rt.world} process(es), {images_per_step} images/step, precision "
          f"{rt.precision}, channels_last {cfg.model.channels_last}, compile {cfg.train.compile}, "
          f"loader {trainer.loader_name}, increment {index} ({', '.join(plan.train_heads)})")
    for name in ("model", "step", "loader", "end2end"):
        print(f"  {name:8s} {results[name]:10.1f} images/s  {1000 * images_per_step / results[name]:8.1f} ms/step")
    results["end2end/step"] = results["end2end"] / results["step"]
    results["loader/step"] = results["loader"] / results["step"]
    print(f"  end2end/step {results['end2end/step']:.2f}   loader/step {results['loader/step']:.2f}")
    if "ops_per_step" in results:
        total, optim_ops = results["ops_per_step"]
        print(f"  ops dispatched per engine step: {total} ({optim_ops} in the optimizer); each is a kernel "
              f"launch on a GPU (or a few, for a multi-tensor op)")
    print(f"  {cfg.train.method} after_step (EMA teacher update for mclfir): {results['after_step_ms']:.3f} ms")
    used = "fused" if optimizer.param_groups[0].get("fused") else \
        "foreach" if optimizer.param_groups[0].get("foreach") else "torch default"
    print(f"  AdamW step over {len(trained)} tensors: " +
          ", ".join(f"{k} {v:.3f} ms" for k, v in results["adamw_ms"].items()) + f" (this run: {used})")
    if args.project_doublets:
        steps = -(-args.project_doublets // (images_per_step // 2))
        results["projected_hours"] = 2 * args.project_doublets / results["end2end"] / 3600
        print(f"  {args.project_doublets} doublets ({steps} steps of {images_per_step // 2}) at the end-to-end "
              f"rate: {results['projected_hours']:.2f} h")
    return results


if __name__ == "__main__":
    import sys
    from ..config import ConfigError
    from ..data.manifest import ShardError
    try:
        main()
    except (ConfigError, ShardError) as e:   # a wrong key or shard folder: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

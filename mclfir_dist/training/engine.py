"""The increment loop: plan, train, evaluate, record, checkpoint.

The engine wires the parts and holds no method math: the method (methods/) plans each
increment and adds its loss terms, losses.py has the InfoNCE, optim.py the optimizer and
schedule, checkpoint.py the saved state, runtime.py the processes, evaluator.py the mAP
pass, results.py the record. One code path for 1..N processes (Accelerate: DDP or DeepSpeed);
only the main process prints and writes. Increment t reseeds everything from (seed, t), so a
run resumed at an increment boundary ends exactly like an uninterrupted one.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .batch_scaling import describe as describe_scaling, scale_to_global_batch
from .checkpoint import (Checkpointer, CheckpointError, ResumePoint, load_zero_optimizer_state, restore_model,
                         zero_optimizer_state)
from ..config import RunConfig, to_dict, to_yaml
from ..data import build_train_loader, choose_loader
from ..data.manifest import Manifest, ShardError
from ..data.pairing import positive_index
from ..data.shards import ensure_shards
from ..data.streams import epoch_seed
from .distributed import gather_objects
from ..evaluation.metrics import continual_metrics, dataset_maps
from ..evaluation.evaluator import Evaluator
from .losses import DoubletInfoNCE
from ..methods import IncrementContext, IncrementPlan, StepOutput, build_method
from ..model.mclfir import MCLFIRModel, build_model
from .optim import build_optimizer, build_scheduler
from ..evaluation.record import CostRecord, MetricsSink, RunRecord, summary_text
from .runtime import Runtime, rng_state, seed_everything, set_rng_state
from ..utils.io import atomic_write_text, ensure_writable_dir

log = logging.getLogger("mclfir")


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.runtime = rt = Runtime(cfg, self.run_dir)
        # step counts, lr and EMA decay for this run's global batch (train.reference_batch_doublets)
        cfg, scaling = scale_to_global_batch(cfg, rt.world)
        self.cfg, self.batch_scaling = cfg, scaling
        if scaling:
            log.info("batch scaling: %s", describe_scaling(scaling))
        self.checkpoints = Checkpointer(self.run_dir, rt.is_main)
        if rt.is_main:
            ensure_writable_dir(self.run_dir)   # a read-only or full --out fails here, before any work

        # shards: built once by the main process; the others wait and then read the manifest
        if rt.is_main:
            ensure_shards(cfg.data.shards, cfg.data.build)
        rt.barrier()
        self.manifests, self.attribute_manifest = attribute_manifests(cfg)
        self.skipped_shards = check_shard_sets(self.manifests, ("train", cfg.eval.split), cfg.data.skip_bad_shards)
        self.loader_name, why = choose_loader(cfg.data)
        log.info("loader: %s (%s)", self.loader_name, why)
        self.evaluator = Evaluator(cfg, rt, self.manifests, self.attribute_manifest, self.loader_name, self.run_dir)

        seed_everything(cfg.train.seed)  # same initial weights on every rank (the teacher copies them)
        self.model: MCLFIRModel = build_model(cfg.model, cfg.data.image_size, rt.device)
        if cfg.train.compile:
            self.model.compile_in_place(cfg.train.compile_mode, cfg.train.compile_backend)
        self.method = build_method(cfg, rt)
        self.method.setup(self.model)
        increments = cfg.train.increments   # plans are pure functions of the config: the whole run's steps
        self.plans = [self.method.plan(i, inc.name, list(inc.attributes), [a for prev in increments[:i]
                                                                            for a in prev.attributes])
                      for i, inc in enumerate(increments)]
        self.record = RunRecord.new(to_dict(cfg), str(cfg.data.shards))
        self.record.data["attribute_shards"] = {a: str(m.root) for a, m in self.attribute_manifest.items()}
        self.record.data["skipped_shards"] = self.skipped_shards
        self.record.data["batch_scaling"] = scaling
        self.global_step, self.start_increment, self.resumed = 0, 0, resume
        self.resume_point: Optional[ResumePoint] = self._restore() if resume else None
        self.metrics = MetricsSink(rt.acc, cfg.name)
        if rt.is_main:
            self.checkpoints.remove_stale_temporaries()   # a fresh start after a kill inside a write
            self.run_dir.mkdir(parents=True, exist_ok=True)
            header = f"# effective config; {describe_scaling(scaling)}\n" if scaling else ""
            atomic_write_text(self.run_dir / "config.yaml", header + to_yaml(cfg))

    # ---------------------------------------------------------------- state

    def _state(self, index: int) -> dict:
        return {"increment": index, "global_step": self.global_step, "heads": self.model.attributes,
                "frozen": list(self.model.frozen), "model": self.model.state_dict(),
                "method": self.method.state_dict(), "config": to_dict(self.cfg), "results": self.record.data,
                "rng": rng_state()}

    def _restore(self) -> ResumePoint:
        point = self.checkpoints.resume_point()
        if point is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.checkpoints.dir}")
        state = point.state
        restore_model(self.model, state)
        self.method.load_state_dict(state["method"])
        self.record.data = state["results"]
        self.global_step = state["global_step"]
        set_rng_state(state["rng"])
        self.start_increment = point.next_increment
        where = f"step {state['step']} of increment {state['increment']}" if point.partial else \
            f"increment {self.start_increment}"
        log.info("resumed from %s: continuing at %s", point.path, where)
        return point if point.partial else None

    # ---------------------------------------------------------------- one increment

    def _prepare_model(self, plan: IncrementPlan, ctx: IncrementContext, resuming: bool) -> None:
        cfg = self.cfg
        if plan.rebuild_model and not resuming:
            seed_everything(cfg.train.seed)   # the initial (pretrained) model again
            self.model = build_model(cfg.model, cfg.data.image_size, self.runtime.device)
            if cfg.train.compile:
                self.model.compile_in_place(cfg.train.compile_mode, cfg.train.compile_backend)
        self.method.begin_increment(ctx, self.model, resuming)
        seed_everything(epoch_seed(cfg.train.seed, plan.index))  # new heads: identical on every rank
        for a in plan.train_heads:
            if a not in self.model.heads:
                self.model.add_head(a)
        seed_everything(epoch_seed(cfg.train.seed, plan.index, self.runtime.rank))  # per-rank randomness from here
        self.model.configure(plan.train_heads, plan.frozen_heads, plan.train_encoder)

    def _train_increment(self, plan: IncrementPlan, ctx: IncrementContext) -> CostRecord:
        cfg, rt = self.cfg, self.runtime
        partial = self.resume_point.state if self.resume_point and self.resume_point.state["increment"] == plan.index \
            else None
        self.resume_point = None
        model, optimizer, scheduler, start_step, seconds_before = self.setup_increment(plan, ctx, partial)
        # a mid-increment resume replays the stream up to its step (exact with the torch loader)
        loader = build_train_loader(cfg.data, self.attribute_manifest[plan.train_heads[0]], plan.train_heads,
                                    rt.rank, rt.world, epoch_seed(cfg.train.seed, plan.index), self.loader_name,
                                    rt.device, start_batch=start_step)
        seconds = self._steps(plan, ctx, model, optimizer, scheduler, iter(loader), start_step, seconds_before)
        del loader
        self.record.add_skipped(f"train/increment_{plan.index:02d}",
                                sorted(k for keys in gather_objects(self.skipped_train) for k in keys))
        rt.acc.free_memory()  # drops the DDP/DeepSpeed wrapper; the next increment re-prepares
        self.method.end_increment(ctx, self.model)
        rt.sync_buffers([self.model] + self.method.modules())
        images = plan.steps * self.images_per_step
        return CostRecord(plan.index, plan.name, plan.steps, images, seconds, images / max(seconds, 1e-9), 0.0,
                          rt.world, seconds * rt.world, rt.backend, self.images_per_step, 2 * cfg.data.batch_doublets,
                          rt.rank_max_diff([self.model] + self.method.modules()))

    def setup_increment(self, plan: IncrementPlan, ctx: IncrementContext, partial: Optional[dict] = None):
        """Model, optimizer and schedule of an increment, prepared by Accelerate (state from `partial` if given):
        (wrapped model, optimizer, scheduler, start step, train seconds so far)."""
        cfg, rt = self.cfg, self.runtime
        self._prepare_model(plan, ctx, resuming=partial is not None)
        optimizer = build_optimizer(cfg.optim, self.model.trunk, [self.model.heads[a] for a in plan.train_heads],
                                    plan.encoder_lr_scale)
        scheduler = build_scheduler(cfg.optim, optimizer, plan.steps)
        rt.set_micro_batch(2 * cfg.data.batch_doublets)
        start_step, seconds_before = 0, 0.0
        if partial is not None:
            if partial["optimizer"] is not None:
                optimizer.load_state_dict(partial["optimizer"])
            scheduler.load_state_dict(partial["scheduler"])
            start_step, seconds_before = partial["step"], partial["elapsed_train_seconds"]
        model, optimizer = rt.acc.prepare(self.model, optimizer)
        if partial is not None and partial.get("zero_world"):
            self._load_zero_partition(partial, optimizer)
        return model, optimizer, scheduler, start_step, seconds_before

    def _load_zero_partition(self, partial: dict, optimizer) -> None:
        """Under ZeRO each rank restores its own optimizer partition, after prepare() has partitioned it."""
        rt = self.runtime
        if partial["zero_world"] != rt.world:
            raise CheckpointError(f"{self.checkpoints.partial_path}: saved by {partial['zero_world']} DeepSpeed "
                                  f"ranks, resumed with {rt.world}; resume with the same number of processes "
                                  f"(or from the last increment checkpoint: delete partial.pt)")
        zero = optimizer.optimizer   # Accelerate's wrapper around DeepSpeed's ZeRO optimizer
        ranks = range(rt.world) if getattr(zero, "elastic_checkpoint", False) else [rt.rank]
        load_zero_optimizer_state(zero, {r: self.checkpoints.load_zero_shard(partial, r) for r in ranks},
                                  rt.rank, rt.world)

    def _steps(self, plan: IncrementPlan, ctx: IncrementContext, model, optimizer, scheduler, batches,
               start_step: int, seconds_before: float) -> float:
        """The optimizer steps of one increment; returns its training seconds."""
        cfg, rt, acc = self.cfg, self.runtime, self.runtime.acc
        loss_fn = DoubletInfoNCE(cfg.loss.temperature, cfg.loss.mask_same_value, cfg.loss.multi_positive,
                                 cfg.loss.gather, rt.rank, rt.world)
        unwrapped = acc.unwrap_model(model)
        checkpoint_every = cfg.train.checkpoint_every
        fault = _fault_injection()
        self.skipped_train: List[str] = []
        model.train()
        t0 = window_start = time.time()
        window_steps = 0
        nonfinite = torch.zeros((), dtype=torch.bool, device=rt.device)
        # compiled with CUDA graphs: each step replays them anew (outputs of the last step may be overwritten)
        cuda_graphs = cfg.train.compile and rt.device.type == "cuda" and \
            cfg.train.compile_mode in ("reduce-overhead", "max-autotune")
        for step in range(start_step, plan.steps):
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            if fault == (rt.rank, step):
                raise RuntimeError(f"injected fault on rank {rt.rank} at step {step} (MCLFIR_FAULT_RANK/STEP)")
            batch = next(batches)
            self.skipped_train += batch.get("skipped", [])
            with acc.autocast():
                loss, nce, terms, stats = step_loss(batch, model, unwrapped, self.method, ctx, loss_fn,
                                                    plan.train_heads, rt.device, cfg.model.channels_last)
            nonfinite = nonfinite | ~torch.isfinite(loss.detach())   # read at log and checkpoint time: no sync here
            acc.backward(loss)
            if cfg.optim.grad_clip > 0 and acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            self.method.after_step(unwrapped)
            self.global_step += 1
            window_steps += 1
            logging_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == plan.steps
            saving_now = checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < plan.steps
            if (logging_now or saving_now) and bool(nonfinite):
                raise FloatingPointError(f"the loss became {loss.item()} at increment {plan.index}, step {step} or "
                                         f"earlier (checked every train.log_every steps); lower optim.lr?")
            if logging_now:
                seconds = time.time() - window_start
                self._log_step(plan, step, optimizer, seconds, window_steps, loss, nce, terms, stats)
                window_start, window_steps = time.time(), 0
            if saving_now:
                self._save_partial(plan.index, step + 1, optimizer, scheduler, seconds_before + time.time() - t0)
        rt.barrier()
        return seconds_before + time.time() - t0

    def _log_step(self, plan, step, optimizer, seconds, steps, loss, nce, terms, stats) -> None:
        ips = steps * self.images_per_step / max(seconds, 1e-9)
        per_step = seconds / max(steps, 1)
        left_here = plan.steps - step - 1
        left_run = left_here + sum(p.steps for p in self.plans[plan.index + 1:] if not p.skip)
        values = {"loss/total": loss.item(), "loss/nce": nce.item(),
                  **{f"loss/{t.name}": t.value.item() for t in terms},
                  "throughput/images_per_s": ips, "train/negative_pool": float(stats["negative_pool"]),
                  **{f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}}
        values.setdefault("loss/kd", 0.0)
        values.update(self.method.log_values())
        self.metrics.emit(values, self.global_step,
                          f"inc {plan.index} step {step + 1}/{plan.steps}  loss {values['loss/total']:.4f}  "
                          f"nce {values['loss/nce']:.4f}  kd {values['loss/kd']:.5f}  {ips:.1f} img/s  "
                          f"pool {values['train/negative_pool']:.0f}  {1000 * per_step:.0f} ms/step  "
                          f"ETA increment {_duration(left_here * per_step)}, run {_duration(left_run * per_step)} "
                          f"(+ evaluation)")

    def _save_partial(self, index: int, step: int, optimizer, scheduler, seconds: float) -> None:
        """Mid-increment checkpoint (train.checkpoint_every): enough to continue this increment.
        Under ZeRO every rank first writes its optimizer partition; partial.pt, written last, names them."""
        rt = self.runtime
        extra = {"optimizer": optimizer.state_dict() if rt.deepspeed is None else None, "zero_world": 0}
        if rt.deepspeed is not None:
            self.checkpoints.save_zero_shard(index, step, rt.rank, zero_optimizer_state(optimizer.optimizer))
            extra["zero_world"] = rt.world
            rt.barrier()
        if rt.is_main:
            self.checkpoints.save_partial({**self._state(index), "step": step, **extra,
                                           "scheduler": scheduler.state_dict(), "elapsed_train_seconds": seconds})
            self.checkpoints.remove_zero_shards(keep=(index, step) if rt.deepspeed is not None else None)
        rt.barrier()

    @property
    def images_per_step(self) -> int:
        return 2 * self.cfg.data.batch_doublets * self.runtime.world

    # ---------------------------------------------------------------- the run

    def run(self) -> dict:
        cfg, rt = self.cfg, self.runtime
        run_start, wall_before = time.time(), self.record.data.get("wall_seconds", 0.0)
        if self.resumed and rt.is_main:   # heals a results.json that a kill left behind its checkpoint
            self.record.save(self.run_dir)
        if self.start_increment == 0 and not self.record.data["random_map"]:
            self.evaluator.baselines(self.model, self.record.data)
        increments = cfg.train.increments
        for index in range(self.start_increment, len(increments)):
            inc = increments[index]
            old = [a for prev in increments[:index] for a in prev.attributes]
            plan = self.plans[index]
            log.info("=== increment %d/%d '%s': training heads %s, frozen %s, %d steps", index, len(increments) - 1,
                     inc.name, plan.train_heads, plan.frozen_heads, plan.steps)
            for a in inc.attributes:
                self.record.data["learned_at"][a] = index
            if plan.skip:
                log.info("increment %d not run (%s); its cost is estimated from a measured one", index,
                         cfg.train.method)
                self.record.skip_increment(CostRecord(index, inc.name, plan.steps, 0, 0.0, 0.0, 0.0, rt.world, 0.0,
                                                      rt.backend, self.images_per_step, 2 * cfg.data.batch_doublets,
                                                      estimated=True))
                continue
            cost = self._train_increment(plan, IncrementContext(plan, old))
            self._evaluate_and_record(plan, cost)
            if index == len(increments) - 1:
                self.record.fill_estimates(cost)
                self.record.finish(self.record.data["metrics"][-1])
            self.record.data["wall_seconds"] = wall_before + time.time() - run_start
            self.checkpoints.save_increment(index, self._state(index))
            rt.barrier()
            if rt.is_main:
                self.record.save(self.run_dir)
        if rt.is_main:
            text = summary_text(self.record.data)
            atomic_write_text(self.run_dir / "summary.md", text + "\n")
            print("\n" + text + "\n", flush=True)
            self.metrics.text("summary", text, len(increments))
        rt.barrier()
        self.metrics.close()   # on every rank, last: Accelerate's end_training also ends the process group
        return self.record.data

    def _evaluate_and_record(self, plan: IncrementPlan, cost: CostRecord) -> None:
        seen = plan.evaluated_heads
        row, details, cost.eval_seconds, groups = self.evaluator.evaluate(self.model, seen)
        for manifest, embeddings in groups:
            self.record.add_skipped(f"{self.cfg.eval.split}/{Path(manifest.root).name}", embeddings.skipped)
        record = self.record.data
        metrics = continual_metrics(record["accuracy_matrix"] + [row], record["learned_at"])
        dataset_of = {a: Path(m.root).name for a, m in self.attribute_manifest.items()}
        metrics["dataset_map"] = dataset_maps(details, dataset_of)
        self.record.add_increment(row, details, metrics, cost,
                                  {"world_size": self.runtime.world, "backend": self.runtime.backend,
                                   "global_batch": self.images_per_step, "loader": self.loader_name,
                                   "mixed_precision": self.runtime.precision})
        log.info("increment %d: mAP %s | avg %.2f | train %.1fs (%.1f img/s) | eval %.1fs", plan.index,
                 {a: round(100 * v, 2) for a, v in row.items()}, 100 * metrics["average_map"],
                 cost.train_seconds, cost.images_per_second, cost.eval_seconds)
        # mAP against the global step, like the losses; costs per increment
        self.metrics.emit({f"map/{a}": v for a, v in row.items()}, self.global_step)
        self.metrics.emit({"map/average": metrics["average_map"], "forgetting/average": metrics["average_forgetting"]},
                          self.global_step)
        self.metrics.emit({"cost/train_seconds": cost.train_seconds, "cost/eval_seconds": cost.eval_seconds,
                           "cost/images_per_second": cost.images_per_second,
                           "cost/device_seconds": cost.device_seconds}, plan.index)
        if self.runtime.is_main:
            for manifest, embeddings in groups:
                self.evaluator.retrieval_grids(manifest, embeddings, plan.index, self.metrics)


def step_loss(batch: dict, model, unwrapped: MCLFIRModel, method, ctx: IncrementContext, loss_fn: DoubletInfoNCE,
              heads: Sequence[str], device: torch.device, channels_last: bool = False) -> tuple:
    """The forward of one training step: (loss, InfoNCE, the method's terms, the InfoNCE stats) for a loader
    batch, whose tensors may be on the host (moved here) or already on `device` (images from a device loader).
    `model` may be wrapped (DDP); the method reads heads from `unwrapped`."""
    images = batch["images"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    task = batch["task"].to(device, non_blocking=True)     # pinned by the loader on CUDA
    value = batch["value"].to(device, non_blocking=True)
    task_counts = rows_per_task(batch["task"], len(heads))
    emb, pooled, fmap = model(images, task, heads, task_counts)
    nce, stats = loss_fn(emb, value, task, positive_index(emb.shape[0], device))
    terms = method.distillation(ctx, unwrapped, StepOutput(batch, images, emb, pooled, fmap))
    loss = nce
    for term in terms:
        loss = loss + term.weight * term.value
    return loss, nce, terms, stats


def rows_per_task(task: torch.Tensor, heads: int) -> List[int]:
    """Rows of each head in a batch, counted from the loader's host copy of `task` (on the device, reading
    the count back would be a sync every step)."""
    return torch.bincount(task, minlength=heads).tolist()


def attribute_manifests(cfg: RunConfig) -> Tuple[List[Manifest], Dict[str, Manifest]]:
    """The run's shard sets, and attribute -> its shard set (an increment may name its own: a run across datasets)."""
    loaded: Dict[str, Manifest] = {str(cfg.data.shards): Manifest.load(cfg.data.shards)}
    out: Dict[str, Manifest] = {}
    for inc in cfg.train.increments:
        root = inc.shards or str(cfg.data.shards)
        if root not in loaded:
            loaded[root] = Manifest.load(root)
        for a in inc.attributes:
            loaded[root].attribute_index(a)
            out[a] = loaded[root]
    return list(loaded.values()), out


def check_shard_sets(manifests: Sequence[Manifest], splits: Sequence[str], skip_bad: bool) -> Dict[str, list]:
    """Every shard's size and sample count against its manifest, before any training. A mismatch stops the
    run naming the shard, or (data.skip_bad_shards) leaves the shard out; the skips are returned for results.json."""
    skipped: Dict[str, list] = {}
    for manifest in manifests:
        for split in dict.fromkeys(splits):
            problems = manifest.verify(split)
            if not problems:
                continue
            where = f"{split}/{Path(manifest.root).name}"
            if not skip_bad:
                file, problem = problems[0]
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise ShardError(f"{Path(manifest.root) / file}: {problem}{more}. Rebuild the shards, or set "
                                 f"data.skip_bad_shards=true to leave bad shards out")
            manifest.exclude([file for file, _ in problems])
            if not manifest.shard_files(split):
                raise ShardError(f"every {split} shard of {manifest.root} is damaged: {problems[0][1]}")
            skipped[where] = [{"file": file, "problem": problem} for file, problem in problems]
            log.warning("data.skip_bad_shards: leaving out %d %s shard(s) of %s: %s", len(problems), split,
                        manifest.root, "; ".join(f"{f}: {p}" for f, p in problems))
    return skipped


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _fault_injection():
    """(rank, step) at which to raise, from MCLFIR_FAULT_RANK/MCLFIR_FAULT_STEP (tests of failure handling)."""
    if "MCLFIR_FAULT_RANK" not in os.environ:
        return None
    return int(os.environ["MCLFIR_FAULT_RANK"]), int(os.environ.get("MCLFIR_FAULT_STEP", "0"))


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict:
    return Trainer(cfg, run_dir, resume).run()

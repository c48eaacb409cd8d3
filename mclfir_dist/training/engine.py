"""The increment loop: plan, train, evaluate, record, checkpoint.

The engine wires the parts and holds no method math: the method (methods/) plans each increment and
adds its loss terms; losses.py has the InfoNCE, optim.py the optimizer and schedule, state.py the
checkpoints, metrics.py the logging, prepare.py the data, runtime.py the processes, evaluation/ the
mAP pass and the record. One code path for 1..N processes (Accelerate: DDP or DeepSpeed); only the
main process prints and writes. Increment t reseeds everything from (seed, t), so a run resumed at an
increment boundary ends exactly like an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch

from ..config import ConfigError, RunConfig, flat_keys, to_dict, to_yaml
from ..errors import WorkerDiedError
from ..data import build_train_loader, dead_workers
from ..data.remote import stats_for_results as remote_stats
from ..data.pairing import positive_index, task_quotas
from ..data.streams import epoch_seed
from ..evaluation.compatibility import compatibility, load_snapshot, save_snapshot, snapshot
from ..evaluation.evaluator import Evaluator
from ..evaluation.metrics import continual_metrics, dataset_maps
from ..evaluation.record import summary_text, verdict
from ..runfolder.layout import RunFolder
from ..runfolder.record import CostRecord, RunRecord
from ..methods import IncrementContext, IncrementPlan, StepOutput, build_method
from ..model.mclfir import MCLFIRModel, build_model
from ..utils.io import atomic_write_text, ensure_writable_dir
from .batch_scaling import describe as describe_scaling
from .cluster import check_run_dir, nodes_of
from .batch_scaling import scale_to_global_batch
from ..utils.distributed import gather_objects
from ..methods.losses import DoubletInfoNCE
from .metrics import MetricsProcessor, peak_memory_mb
from ..methods.optim import build_optimizer, build_scheduler
from .prepare import PreparedData, prepare_data
from .runtime import Runtime, rng_state, seed_everything, set_rng_state
from .selection import Selection, selected_prefixes
from .signals import RunStopped, SignalStop
from .state import Partial, Progress, RunParts, RunState
from .trial import TrialPruned, TrialReporter

log = logging.getLogger("mclfir")


@dataclass
class IncrementSession:
    """An increment being trained: what `Trainer.open_increment` prepared and `Trainer.train_steps` runs."""
    plan: IncrementPlan
    ctx: IncrementContext
    model: torch.nn.Module          # as prepared by Accelerate (DDP/DeepSpeed-wrapped when distributed)
    optimizer: object
    scheduler: object
    start_step: int = 0             # > 0 when resumed inside the increment
    seconds_before: float = 0.0     # training seconds of the increment before this session
    selection_state: Optional[dict] = None   # validation inside the increment, as the partial saved it

    def with_steps(self, steps: int) -> "IncrementSession":
        """The same session, `steps` long (benchmarks time a few steps at a time)."""
        return dataclasses.replace(self, plan=dataclasses.replace(self.plan, steps=steps), start_step=0,
                                   seconds_before=0.0)


@dataclass
class StepsDone:
    """What `Trainer.train_steps` returns: the session's training seconds (validation excluded), the steps done
    (train.patience may end an increment early), its validation curve and pick, and the keys of skipped images."""
    seconds: float
    steps: int
    selection: Selection
    skipped: List[str]


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, runtime: Runtime, data: PreparedData,
                 batch_scaling: Optional[dict] = None, resume: bool = False, requested: Optional[RunConfig] = None):
        self.cfg, self.run_dir, self.runtime, self.data = cfg, Path(run_dir), runtime, data
        self.requested = requested or cfg   # what the user asked for, before the batch scaling
        self.evaluator = Evaluator(cfg, runtime, data.manifests, data.attribute_manifest, data.loader, self.run_dir)
        seed_everything(cfg.train.seed)  # same initial weights on every rank (the teacher copies them)
        self.model: MCLFIRModel = self._build_model()
        self.method = build_method(cfg, runtime)
        self.method.setup(self.model)
        self.plans = plan_increments(self.method, cfg)   # pure functions of the config: the whole run's steps
        check_negatives(self.plans, cfg, runtime.world)
        self.record = RunRecord.new(to_dict(cfg), str(cfg.data.shards))
        self.record.set_sources({a: str(m.root) for a, m in data.attribute_manifest.items()}, data.skipped_shards,
                                batch_scaling)
        self.state = RunState(self.run_dir, runtime, cfg.train.checkpoint_every)
        self.progress = Progress(0, 0)
        if resume:
            self.progress = self.state.restore(self.parts())
        self.record.set_remote_shards(remote_stats())   # what this start read: a resume's comes from the cache
        self.resumed = resume
        # the previous increment's eval embeddings (main process): the deployed index, for compatibility
        self.deployed = load_snapshot(self.run_dir, self.progress.next_increment - 1) if runtime.is_main else None
        self.metrics = MetricsProcessor(runtime.acc, cfg.name, cfg.train.log_every, self.images_per_step, self.plans)
        self.trial = TrialReporter.of(cfg, runtime.is_main, runtime.world)   # a `mclfir tune` trial: reports
        self.stop = SignalStop()   # installed by run(): from then on a signal saves and stops instead of killing
        self.state.start_writing()
        if runtime.is_main:
            header = f"# effective config; {describe_scaling(batch_scaling)}\n" if batch_scaling else ""
            atomic_write_text(RunFolder(self.run_dir).config, header + to_yaml(cfg))

    @classmethod
    def create(cls, cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> "Trainer":
        """Processes, the batch scaling for their global batch, the data, then the trainer."""
        runtime = Runtime(cfg, run_dir)
        runtime.views = check_run_dir(run_dir, resume)   # every rank sees the run (and knows its node)
        requested = cfg
        cfg, scaling = scale_to_global_batch(cfg, runtime.world)   # steps, lr, EMA decay for this global batch
        if scaling:
            log.info("batch scaling: %s", describe_scaling(scaling))
        if runtime.is_main:
            ensure_writable_dir(run_dir)   # a read-only or full --out fails here, before any work
        return cls(cfg, run_dir, runtime, prepare_data(cfg, runtime), scaling, resume, requested)

    def parts(self) -> RunParts:
        return RunParts(self.cfg, self.model, self.method, self.record, self.progress.global_step, self.requested)

    @property
    def images_per_step(self) -> int:
        return 2 * self.cfg.data.batch_doublets * self.runtime.world

    def _build_model(self) -> MCLFIRModel:
        cfg = self.cfg
        model = build_model(cfg.model, cfg.data.image_size, self.runtime.device, self.runtime.channels_last)
        if cfg.train.compile:
            model.compile_in_place(cfg.train.compile_mode, cfg.train.compile_backend)
        return model

    # ---------------------------------------------------------------- one increment

    def _prepare_model(self, plan: IncrementPlan, ctx: IncrementContext, resuming: bool) -> None:
        seed = self.cfg.train.seed
        if plan.rebuild_model and not resuming:
            seed_everything(seed)   # the initial (pretrained) model again
            self.model = self._build_model()
        self.method.begin_increment(ctx, self.model, resuming)
        seed_everything(epoch_seed(seed, plan.index))  # new heads: identical on every rank
        for a in plan.train_heads:
            if a not in self.model.heads:
                self.model.add_head(a)
        seed_everything(epoch_seed(seed, plan.index, self.runtime.rank))  # per-rank randomness from here
        self.model.configure(plan.train_heads, plan.frozen_heads, plan.train_encoder)

    def open_increment(self, plan: IncrementPlan, ctx: IncrementContext,
                       partial: Optional[Partial] = None) -> IncrementSession:
        """Model, optimizer and schedule of an increment, prepared by Accelerate (state from `partial` if given)."""
        cfg, rt = self.cfg, self.runtime
        self._prepare_model(plan, ctx, resuming=partial is not None)
        optimizer = build_optimizer(cfg.optim, self.model.trunk, [self.model.heads[a] for a in plan.train_heads],
                                    plan.encoder_lr_scale)
        scheduler = build_scheduler(cfg.optim, optimizer, plan.steps)
        rt.set_micro_batch(2 * cfg.data.batch_doublets)
        if partial is not None:
            self.state.load_into_optimizer(partial, optimizer, scheduler)
        model, optimizer = rt.acc.prepare(self.model, optimizer)
        if partial is None:
            return IncrementSession(plan, ctx, model, optimizer, scheduler)
        self.state.load_zero_partition(partial, optimizer)
        return IncrementSession(plan, ctx, model, optimizer, scheduler, partial.step, partial.elapsed_train_seconds,
                                partial.selection)

    def train_loader(self, plan: IncrementPlan, start_batch: int = 0):
        """The increment's doublet batches from `start_batch` on (a resume replays the stream up to it)."""
        cfg, rt = self.cfg, self.runtime
        return build_train_loader(cfg.data, self.data.attribute_manifest[plan.train_heads[0]], plan.train_heads,
                                  rt.rank, rt.world, epoch_seed(cfg.train.seed, plan.index), self.data.loader,
                                  rt.device, start_batch=start_batch)

    def _train_increment(self, plan: IncrementPlan, ctx: IncrementContext) -> CostRecord:
        rt, partial = self.runtime, self.progress.partial
        if partial is not None and partial.increment != plan.index:
            partial = None
        self.progress.partial = None
        session = self.open_increment(plan, ctx, partial)
        loader = self.train_loader(plan, session.start_step)
        batches = iter(loader)
        try:
            done = self.train_steps(session, batches)
        except RuntimeError as e:
            self._raise_if_a_worker_died(batches, plan, e)
            raise
        seconds, steps, selection = done.seconds, done.steps, done.selection
        del loader
        self.record.add_skipped(f"train/increment_{plan.index:02d}",
                                sorted(k for keys in gather_objects(done.skipped) for k in keys))
        rt.release_prepared()
        self.method.end_increment(ctx, self.model)
        rt.sync_buffers([self.model] + self.method.modules())
        return CostRecord(increment=plan.index, name=plan.name, steps=steps,
                          images_seen=steps * self.images_per_step, train_seconds=seconds,
                          images_per_second=steps * self.images_per_step / max(seconds, 1e-9),
                          val_seconds=round(selection.seconds, 3), selection=selection.record() if selection.every else {},
                          eval_seconds=0.0, world_size=rt.world, device_seconds=seconds * rt.world,
                          backend=rt.backend, global_batch=self.images_per_step,
                          per_rank_batch=2 * self.cfg.data.batch_doublets,
                          rank_max_diff=rt.rank_max_diff([self.model] + self.method.modules()),
                          data_wait_seconds=round(self.metrics.wait_increment, 3),
                          peak_memory_mb=round(peak_memory_mb(rt.device), 1))

    def _raise_if_a_worker_died(self, batches, plan: IncrementPlan, error: RuntimeError) -> None:
        """torch's traceback for a killed loader worker becomes one line naming it and where to resume."""
        died = dead_workers(batches)
        if not died:
            return
        names = {int(s): s.name for s in signal.Signals}
        how = ", ".join(f"pid {pid} " + (f"killed by {names.get(-code, f'signal {-code}')}" if code < 0
                                         else f"exit {code}") for pid, code in died)
        kept = [p for p in [self.state.files.partial_path, *reversed(self.state.files.increments())] if p.is_file()]
        where = f"the last checkpoint, {kept[0]}, is kept" if kept else "no checkpoint was written yet"
        raise WorkerDiedError(f"a data loader worker died in increment {plan.index} ({how}; SIGKILL is most often "
                              f"the out-of-memory killer: fewer data.num_workers or a smaller data.batch_doublets "
                              f"use less memory); {where}: continue with --resume") from error

    def train_steps(self, session: IncrementSession, batches: Iterator[dict]) -> StepsDone:
        """The optimizer steps of a session: its seconds, steps, validation and skipped images (StepsDone)."""
        cfg, rt, acc, plan = self.cfg, self.runtime, self.runtime.acc, session.plan
        loss_fn = DoubletInfoNCE(cfg.loss.temperature, cfg.loss.mask_same_value, cfg.loss.multi_positive,
                                 cfg.loss.gather, rt.rank, rt.world)
        model, unwrapped = session.model, acc.unwrap_model(session.model)
        done = StepsDone(0.0, session.start_step, Selection(cfg.eval.every_steps, cfg.train.select,
                                                            cfg.train.patience), [])
        done.selection.load_state_dict(session.selection_state)
        fault = _fault_injection()
        model.train()
        t0 = time.time()
        self.metrics.start_increment()
        nonfinite = torch.zeros((), dtype=torch.bool, device=rt.device)
        # compiled with CUDA graphs: each step replays them anew (outputs of the last step may be overwritten)
        cuda_graphs = cfg.train.compile and rt.device.type == "cuda" and \
            cfg.train.compile_mode in ("reduce-overhead", "max-autotune")
        for step in range(session.start_step, plan.steps):
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            if fault == (rt.rank, step):
                raise RuntimeError(f"injected fault on rank {rt.rank} at step {step} (MCLFIR_FAULT_RANK/STEP)")
            batch = self.metrics.next_batch(batches)
            done.skipped += batch.get("skipped", [])
            with acc.autocast():
                loss, nce, terms, stats = step_loss(batch, model, unwrapped, self.method, session.ctx, loss_fn,
                                                    plan.train_heads, rt.device, rt.channels_last)
            nonfinite = nonfinite | ~torch.isfinite(loss.detach())   # read at log and checkpoint time: no sync here
            self._optimizer_step(session, loss)
            self.method.after_step(unwrapped)
            self.progress.global_step += 1
            logging_now = self.metrics.step_done(step, plan.steps)
            saving_now = self.state.partial_due(step + 1, plan.steps)
            if (logging_now or saving_now) and bool(nonfinite):
                raise FloatingPointError(f"the loss became {loss.item()} at increment {plan.index}, step {step} or "
                                         f"earlier (checked every train.log_every steps); lower optim.lr?")
            if logging_now:
                self.metrics.log_step(plan, step, self.progress.global_step, session.optimizer, loss, nce, terms,
                                      stats, self.method.log_values())
            done.steps = step + 1
            if done.selection.due(step + 1, plan.steps):
                started = time.time()
                early = self._validate(plan, unwrapped, step + 1, done.selection)
                t0 += time.time() - started   # validation is not training time
                if early:
                    log.info("train.patience: no better val mAP in %d evaluations: increment %d ends at step %d/%d",
                             cfg.train.patience, plan.index, step + 1, plan.steps)
                    break
            stopping = self.stop.agreed() and step + 1 < plan.steps   # the increment's end saves by itself
            if saving_now or stopping:
                self.state.save_partial(plan.index, step + 1, self.parts(), session.optimizer, session.scheduler,
                                        session.seconds_before + time.time() - t0, done.selection.state_dict())
            if stopping:
                raise RunStopped(self.stop.signum, f"saved {self.state.files.partial_path} at increment "
                                                   f"{plan.index}, step {step + 1}/{plan.steps}")
        done.selection.finish(unwrapped, done.steps)
        rt.barrier()
        done.seconds = session.seconds_before + time.time() - t0
        return done

    def _validate(self, plan: IncrementPlan, model, steps_done: int, selection: Selection) -> bool:
        """Score the trained heads on the validation split (RNG untouched, so training continues exactly);
        True when train.patience says the increment should end."""
        saved, started = rng_state(), time.time()
        row, _, _, _ = self.evaluator.evaluate(model, plan.train_heads, split="val")
        set_rng_state(saved)
        score = sum(row.values()) / len(row)
        selection.seconds += time.time() - started
        self.metrics.log_validation(plan.index, self.progress.global_step, row, score)
        if self.trial:
            self.trial.report(self.progress.global_step, score)
        return selection.observe(steps_done, score, model,
                                      selected_prefixes(plan.train_heads, plan.train_encoder))

    def _optimizer_step(self, session: IncrementSession, loss: torch.Tensor) -> None:
        acc, clip = self.runtime.acc, self.cfg.optim.grad_clip
        acc.backward(loss)
        if clip > 0 and acc.sync_gradients:
            acc.clip_grad_norm_(session.model.parameters(), clip)
        session.optimizer.step()
        session.optimizer.zero_grad(set_to_none=True)
        session.scheduler.step()

    # ---------------------------------------------------------------- the run

    def run(self) -> dict:
        with self.stop.installed(self.runtime.world):
            return self._run_handled()

    def _run_handled(self) -> dict:
        try:
            return self._run()
        except TrialPruned as e:   # the study's pruner: results.json says so, and the run ends normally
            log.info("tune: trial %d %s", self.cfg.tune.trial, e)
            self._record_trial(pruned_at_step=e.step)
            self.record.save(self.run_dir)
            self.metrics.close()
            return self.record.data
        except WorkerDiedError:
            self.metrics.close()
            raise
        except RunStopped:
            requeued = self.stop.requeue(self.runtime.is_main)   # SIGUSR1 under SLURM
            if requeued:
                log.info("%s", requeued)
            self.metrics.close()
            raise

    def _record_trial(self, pruned_at_step: Optional[int] = None) -> None:
        if self.cfg.tune.study:
            flat = {k: v for k, v in flat_keys(to_dict(self.cfg)).items() if k in self.cfg.tune.params}
            self.record.set_trial(self.cfg.tune.study, self.cfg.tune.trial, flat, pruned_at_step is not None,
                                  pruned_at_step)

    def _run(self) -> dict:
        rt = self.runtime
        self._record_trial()
        run_start, wall_before = time.time(), self.record.wall_seconds
        if self.resumed and rt.is_main:   # heals a results.json that a kill left behind its checkpoint
            self.record.save(self.run_dir)
        if self.progress.next_increment == 0 and not self.record.has_baselines:
            self.record.set_baselines(*self.evaluator.baselines(self.model))
        elif self.progress.extended_at is not None:
            self._extension_baselines()
        last = len(self.plans) - 1
        for plan in self.plans[self.progress.next_increment:]:
            self._run_increment(plan)
            self.record.set_wall_seconds(wall_before + time.time() - run_start)
            self.state.save_increment(plan.index, self.parts())
            if rt.is_main:
                self.record.save(self.run_dir)
            if self.stop.agreed():
                raise RunStopped(self.stop.signum, f"saved {self.state.files.increment_path(plan.index)} after "
                                                   f"increment {plan.index}")
        if rt.is_main:
            text = summary_text(self.record.data)
            atomic_write_text(RunFolder(self.run_dir).summary, text + "\n")
            print("\n" + text + "\n", flush=True)
            self.metrics.text("summary", text, last + 1)
        rt.barrier()
        self.metrics.close()   # on every rank, last: Accelerate's end_training also ends the process group
        return self.record.data

    def _extension_baselines(self) -> None:
        """An extension's new attributes get the baselines a run trained in one go has: from the initial
        model, rebuilt from the seed (the RNG is put back, so training continues exactly)."""
        saved = rng_state()
        seed_everything(self.cfg.train.seed)
        initial = self._build_model()
        random_map, frozen_map = self.evaluator.baselines(initial)
        known = self.record.data["random_map"]
        self.record.set_baselines({a: v for a, v in random_map.items() if a not in known},
                                  {a: v for a, v in frozen_map.items() if a not in known})
        del initial
        set_rng_state(saved)

    def _run_increment(self, plan: IncrementPlan) -> None:
        rt, attributes = self.runtime, self.cfg.train.increments[plan.index].attributes
        log.info("=== increment %d/%d '%s': training heads %s, frozen %s, %d steps", plan.index,
                 len(self.plans) - 1, plan.name, plan.train_heads, plan.frozen_heads, plan.steps)
        self.record.mark_learned(attributes, plan.index)
        if plan.skip:
            log.info("increment %d not run (%s); its cost is estimated from a measured one", plan.index,
                     self.cfg.train.method)
            self.record.skip_increment(CostRecord(
                increment=plan.index, name=plan.name, steps=plan.steps, images_seen=0, train_seconds=0.0,
                images_per_second=0.0, eval_seconds=0.0, world_size=rt.world, device_seconds=0.0, backend=rt.backend,
                global_batch=self.images_per_step, per_rank_batch=2 * self.cfg.data.batch_doublets, estimated=True))
            return
        old = [a for inc in self.cfg.train.increments[:plan.index] for a in inc.attributes]
        cost = self._train_increment(plan, IncrementContext(plan, old))
        self._evaluate_and_record(plan, cost)
        if plan.index == len(self.plans) - 1:
            self.record.fill_estimates(cost)
            self.record.finish()

    def _evaluate_and_record(self, plan: IncrementPlan, cost: CostRecord) -> None:
        row, details, cost.eval_seconds, groups = self.evaluator.evaluate(self.model, plan.evaluated_heads)
        for manifest, embeddings in groups:
            self.record.add_skipped(f"{self.cfg.eval.split}/{Path(manifest.root).name}", embeddings.skipped)
        metrics = continual_metrics(self.record.accuracy_matrix + [row], self.record.learned_at)
        dataset_of = {a: Path(m.root).name for a, m in self.data.attribute_manifest.items()}
        metrics["dataset_map"] = dataset_maps(details, dataset_of)
        self.record.add_increment(row, details, metrics, cost)
        self.record.set_launch(world_size=self.runtime.world, nodes=nodes_of(self.runtime.views),
                               hosts=sorted({v["host"] for v in self.runtime.views}), backend=self.runtime.backend,
                               global_batch=self.images_per_step, loader=self.data.loader,
                               mixed_precision=self.runtime.precision,
                               precision_reason=self.runtime.acc.precision_reason,
                               channels_last=self.runtime.channels_last)
        self.metrics.log_increment(plan.index, self.progress.global_step, row, metrics, cost)
        if self.trial:   # after results.json has this increment's row (saved by the caller either way)
            self.record.save(self.run_dir)
            self.trial.report(self.progress.global_step, metrics["average_map"])
        if self.runtime.is_main:
            self._measure_compatibility(plan.index, groups)
            for manifest, embeddings in groups:
                self.evaluator.retrieval_grids(manifest, embeddings, plan.index, self.metrics)

    def _measure_compatibility(self, index: int, groups) -> None:
        """Old attributes against the previous increment's embeddings (the deployed index); main process."""
        if self.deployed:
            rows = compatibility(self.deployed, groups, self.cfg.eval.split, self.cfg.eval.query_chunk)
            if rows:
                self.record.set_compatibility(index, rows)
                log.info("compatibility after increment %d: %s (%s)", index, verdict(rows),
                         {a: f"reembedded {100 * r['reembedded']:.2f} / deployed {100 * r['deployed_index']:.2f} "
                             f"/ previous {100 * r['previous']:.2f}" for a, r in rows.items()})
        self.deployed = snapshot(groups)
        save_snapshot(self.run_dir, index, self.deployed)


def plan_increments(method, cfg: RunConfig) -> List[IncrementPlan]:
    increments = cfg.train.increments
    return [method.plan(i, inc.name, list(inc.attributes), [a for prev in increments[:i] for a in prev.attributes])
            for i, inc in enumerate(increments)]


def check_negatives(plans: Sequence[IncrementPlan], cfg: RunConfig, world: int) -> None:
    """Mixed batches split the doublets over an increment's attributes. An attribute with one doublet in the
    whole (gathered) batch has no negative: its InfoNCE is 0 and nothing is learnt, silently; refuse it."""
    if cfg.data.task_sampling == "rotate":
        return
    pool = world if cfg.loss.gather else 1
    for p in plans:
        if p.skip or len(p.train_heads) < 2:
            continue
        n = cfg.data.batch_doublets
        if n < len(p.train_heads) or min(task_quotas(n, len(p.train_heads))) * pool < 2:
            raise ConfigError(f"increment {p.index} ('{p.name}') trains {len(p.train_heads)} attributes in mixed "
                              f"batches of data.batch_doublets={n} ({pool} rank(s) gathered): some attribute gets "
                              f"one doublet per batch or none, so no negative and no learning; use "
                              f"data.task_sampling=rotate or at least {2 * len(p.train_heads)} doublets")


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


def _fault_injection():
    """(rank, step) at which to raise, from MCLFIR_FAULT_RANK/MCLFIR_FAULT_STEP (tests of failure handling)."""
    if "MCLFIR_FAULT_RANK" not in os.environ:
        return None
    return int(os.environ["MCLFIR_FAULT_RANK"]), int(os.environ.get("MCLFIR_FAULT_STEP", "0"))


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict:
    return Trainer.create(cfg, run_dir, resume).run()

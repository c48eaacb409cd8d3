"""The run state: every stateful part of a run in one resumable checkpoint, and the one owner of
when and how it is written and read back (the run loop holds no checkpoint code).

The parts: the model (trunk and heads, which are frozen), the method's state (e.g. the EMA teacher),
the optimizer and schedule (inside an increment), the data position (increment and step: the loaders
replay to it), the RNG, the run record (results.json) and the counters. When: after every increment,
every `train.checkpoint_every` steps inside one, and on request (`request_save`, e.g. from a signal
handler). How: atomically, with a format tag, per-rank ZeRO optimizer partitions first; reading falls
back to the newest checkpoint that loads (checkpoint.py has the file format)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import RunConfig, to_dict
from ..errors import CheckpointError, ConfigError
from ..runfolder.record import RunRecord
from .checkpoint import Checkpointer, ResumePoint, load_zero_optimizer_state, restore_model, zero_optimizer_state
from .resume_rules import check_resume, config_hash
from .runtime import Runtime, rng_state, set_rng_state

log = logging.getLogger("mclfir")


@dataclass
class RunParts:
    """What a checkpoint captures, as the run holds it now."""
    cfg: RunConfig
    model: object           # MCLFIRModel (unwrapped)
    method: object          # methods.Method
    record: RunRecord
    global_step: int
    requested: Optional[RunConfig] = None   # the user's config before batch scaling (what a resume compares)


@dataclass(frozen=True)
class Partial:
    """A run stopped inside an increment (partial.pt, typed): where, and what continues it exactly."""
    increment: int
    step: int
    elapsed_train_seconds: float
    scheduler: dict
    optimizer: Optional[dict] = None   # None under ZeRO: each rank's partition is a file of its own
    selection: Optional[dict] = None   # eval.every_steps' curve and best state so far
    zero_world: int = 0                # DeepSpeed ranks that wrote optimizer partitions (0: none)
    rank_world: int = 0                # processes that wrote their own method state and RNG (0: one process)

    @classmethod
    def of(cls, state: dict) -> "Partial":
        return cls(state["increment"], state["step"], state["elapsed_train_seconds"], state["scheduler"],
                   state.get("optimizer"), state.get("selection"), state.get("zero_world", 0),
                   state.get("rank_world", 0))


@dataclass
class Progress:
    """Where a resumed run continues."""
    next_increment: int
    global_step: int
    partial: Optional[Partial] = None   # set when the run stopped inside an increment
    extended_at: Optional[int] = None   # the first increment the config adds to the run's (an extension)


class RunState:
    def __init__(self, run_dir: str | Path, runtime: Runtime, checkpoint_every: int = 0):
        self.runtime = runtime
        self.files = Checkpointer(run_dir, runtime.is_main)
        self.checkpoint_every = checkpoint_every
        self.save_requested = False

    # -- when ---------------------------------------------------------------------------------
    def request_save(self) -> None:
        """Write a partial checkpoint after the current step (every rank must call it at the same step)."""
        self.save_requested = True

    def partial_due(self, steps_done: int, steps: int) -> bool:
        """A mid-increment checkpoint after `steps_done` of `steps` (the increment's end has its own)."""
        if steps_done >= steps:
            return False
        every = self.checkpoint_every
        return self.save_requested or bool(every and steps_done % every == 0)

    # -- what ---------------------------------------------------------------------------------
    @staticmethod
    def capture(index: int, parts: RunParts) -> dict:
        m = parts.model
        return {"increment": index, "global_step": parts.global_step, "heads": m.attributes,
                "frozen": list(m.frozen), "model": m.state_dict(), "method": parts.method.state_dict(),
                "config": to_dict(parts.cfg), "results": parts.record.state_dict(), "rng": rng_state(),
                "requested_config": to_dict(parts.requested or parts.cfg)}

    # -- how: save ----------------------------------------------------------------------------
    def save_increment(self, index: int, parts: RunParts) -> None:
        self.files.save_increment(index, self.capture(index, parts))
        self.runtime.barrier()

    def save_partial(self, index: int, step: int, parts: RunParts, optimizer, scheduler, seconds: float,
                     selection: Optional[dict] = None) -> None:
        """Enough to continue this increment at `step`. Under ZeRO every rank first writes its optimizer
        partition; partial.pt, written last by the main process, names them."""
        rt = self.runtime
        extra = {"optimizer": optimizer.state_dict() if rt.deepspeed is None else None, "zero_world": 0,
                 "rank_world": 0}
        if rt.deepspeed is not None:
            self.files.save_zero_shard(index, step, rt.rank, zero_optimizer_state(optimizer.optimizer))
            extra["zero_world"] = rt.world
        if rt.world > 1:
            self.files.save_rank_state(index, step, rt.rank, {"method": parts.method.state_dict(), "rng": rng_state()})
            extra["rank_world"] = rt.world
            rt.barrier()
        if rt.is_main:
            self.files.save_partial({**self.capture(index, parts), "step": step, **extra,
                                     "scheduler": scheduler.state_dict(), "elapsed_train_seconds": seconds,
                                     "selection": selection})
            self.files.remove_rank_files(keep=(index, step) if rt.world > 1 else None)
        self.save_requested = False
        rt.barrier()

    def start_writing(self) -> None:
        """Main process, before the run writes anything: temp files a kill left behind go."""
        if self.runtime.is_main:
            self.files.remove_stale_temporaries()

    # -- how: load ----------------------------------------------------------------------------
    def _check_config(self, state: dict, parts: RunParts) -> Optional[int]:
        """What the user asked for now must be what the run was asked for (its original config) or the run's
        saved effective config (config.yaml, which `--resume RUN` reads), every key compared, the batch-scaled
        ones too. A checkpoint from before requested_config: the effective configs, scaled keys left out."""
        asked = f"--resume {self.files.run_dir}"
        if not isinstance(state.get("requested_config"), dict) or parts.requested is None:
            return check_resume(state["config"], parts.cfg, asked)
        try:
            return check_resume(state["requested_config"], parts.requested, asked, scaled=False)
        except ConfigError as first:
            try:
                return check_resume(state["config"], parts.requested, asked, scaled=False)
            except ConfigError:
                raise first from None

    def restore(self, parts: RunParts) -> Progress:
        """Load the newest good checkpoint into the parts (model, method, record, RNG)."""
        point: Optional[ResumePoint] = self.files.resume_point()
        if point is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.files.dir}")
        state = point.state
        first_new = self._check_config(state, parts)
        restore_model(parts.model, state)
        parts.record.load_state_dict(state["results"])
        if first_new is not None:
            config = to_dict(parts.cfg)
            parts.record.extend(config, first_new, config_hash(config))
            log.info("extending the run: increments %s added after increment %d",
                     [inc.name for inc in parts.cfg.train.increments[first_new:]], first_new - 1)
        own = self._rank_state(state, parts.cfg.train.resume_other_world) if point.partial else None
        parts.method.load_state_dict((own or state)["method"])
        set_rng_state((own or state)["rng"])
        where = f"step {state['step']} of increment {state['increment']}" if point.partial else \
            f"increment {point.next_increment}"
        log.info("resumed from %s: continuing at %s", point.path, where)
        return Progress(point.next_increment, state["global_step"], Partial.of(state) if point.partial else None,
                        first_new)

    def _rank_state(self, partial: dict, other_world_ok: bool) -> Optional[dict]:
        """This rank's own method state and RNG from a partial of several processes; None where the partial
        has none (one process) or the world size changed (then every rank continues from the main one's)."""
        saved, rt = partial.get("rank_world", 0), self.runtime
        saved_world = saved or partial.get("zero_world", 0) or 1
        if saved_world != rt.world and not other_world_ok:
            raise CheckpointError(f"{self.files.partial_path} was saved by {saved_world} processes inside increment "
                                  f"{partial['increment']}; this launch has {rt.world}: the global batch and the "
                                  f"InfoNCE negative pool would change mid-increment. Relaunch with {saved_world} "
                                  "processes, or pass train.resume_other_world=true to continue anyway (not "
                                  "bit-exact)")
        if saved and saved != rt.world:
            log.warning("%s was saved by %d processes and resumes with %d: every rank continues from rank 0's "
                        "method state and RNG (not bit-exact)", self.files.partial_path, saved, rt.world)
        if not saved or saved != rt.world:
            return None
        return self.files.load_rank_state(partial["increment"], partial["step"], rt.rank)

    @staticmethod
    def load_into_optimizer(partial: Partial, optimizer, scheduler) -> None:
        """Before Accelerate's prepare(): the optimizer (without ZeRO) and the schedule."""
        if partial.optimizer is not None:
            optimizer.load_state_dict(partial.optimizer)
        scheduler.load_state_dict(partial.scheduler)

    def load_zero_partition(self, partial: Partial, optimizer) -> None:
        """After prepare() has partitioned the optimizer: under ZeRO each rank restores its own partition."""
        if not partial.zero_world:
            return
        rt = self.runtime
        if partial.zero_world != rt.world:
            raise CheckpointError(f"{self.files.partial_path}: saved by {partial.zero_world} DeepSpeed "
                                  f"ranks, resumed with {rt.world}; resume with the same number of processes "
                                  f"(or from the last increment checkpoint: delete partial.pt)")
        zero = optimizer.optimizer   # Accelerate's wrapper around DeepSpeed's ZeRO optimizer
        ranks = range(rt.world) if getattr(zero, "elastic_checkpoint", False) else [rt.rank]
        load_zero_optimizer_state(zero, {r: self.files.load_zero_shard(partial.increment, partial.step, r)
                                         for r in ranks},
                                  rt.rank, rt.world)

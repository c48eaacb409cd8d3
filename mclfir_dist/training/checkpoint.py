"""Checkpoints: one component saves and loads every stateful part of a run.

Two kinds, both written atomically (temp file + rename):
- `checkpoints/increment_XX.pt` after every increment: model (trunk + all heads), frozen heads,
  method state (e.g. the EMA teacher), config, results so far, RNG, global step.
- `checkpoints/partial.pt` every `train.checkpoint_every` steps inside an increment: the same plus
  optimizer, schedule, step and train seconds so far. Under DeepSpeed ZeRO-1/2 each rank holds only
  its partition of the optimizer, so each rank also writes `partial_zero_XX_SSSSSSS_rankRRRRR.pt`
  (increment, step, rank) before the main process writes `partial.pt`, which names them; a partial
  whose shards are not all there is treated as damaged. With several processes every rank also writes
  `partial_rank_XX_SSSSSSS_rankRRRRR.pt` (its method state and RNG, which differ between ranks inside an
  increment), so a resume with the same number of processes is exact.

A checkpoint holds only tensors and plain Python types, and every load uses
`torch.load(weights_only=True)`, so a crafted file cannot run code. model/saved.py is the reading side (the
format tag, every tensor checked, `load_run_model`), which using a trained model needs without training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple


from ..version import __version__
from .. import configure  # noqa: F401  every registry filled before a run's saved config is checked
from ..errors import CheckpointError, UnsafeCheckpointError
from ..model.saved import (INCREMENT_FORMAT, PARTIAL_FORMAT, RANK_STATE_FORMAT, ZERO_SHARD_FORMAT,  # noqa: F401
                           latest_good_increment, load_checkpoint, load_run_model, restore_model)
from ..runfolder.layout import RunFolder
from ..utils.io import atomic_torch_save

log = logging.getLogger("mclfir")

PARTIAL_NAME = "partial.pt"


@dataclass
class ResumePoint:
    state: dict
    path: Path
    partial: bool          # True: continue inside state["increment"] at state["step"]

    @property
    def next_increment(self) -> int:
        return self.state["increment"] + (0 if self.partial else 1)


class Checkpointer:
    def __init__(self, run_dir: str | Path, is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.dir = RunFolder(self.run_dir).checkpoints
        self.is_main = is_main

    def increment_path(self, index: int) -> Path:
        return self.dir / f"increment_{index:02d}.pt"

    @property
    def partial_path(self) -> Path:
        return self.dir / PARTIAL_NAME

    def increments(self) -> List[Path]:
        return sorted(self.dir.glob("increment_*.pt"))

    def save_increment(self, index: int, state: dict) -> Path:
        path = self.increment_path(index)
        if self.is_main:
            atomic_torch_save(path, {"format": INCREMENT_FORMAT, "version": __version__, **state})
            self.partial_path.unlink(missing_ok=True)  # superseded
            self.remove_rank_files()
        return path

    def save_partial(self, state: dict) -> None:
        if self.is_main:
            atomic_torch_save(self.partial_path, {"format": PARTIAL_FORMAT, "version": __version__, **state})

    def zero_shard_path(self, index: int, step: int, rank: int) -> Path:
        return self.dir / f"partial_zero_{index:02d}_{step:07d}_rank{rank:05d}.pt"

    def save_zero_shard(self, index: int, step: int, rank: int, state: dict) -> Path:
        """One rank's ZeRO optimizer partition; written by every rank (not only the main one)."""
        path = self.zero_shard_path(index, step, rank)
        atomic_torch_save(path, {"format": ZERO_SHARD_FORMAT, "version": __version__, "rank": rank, **state})
        return path

    def rank_state_path(self, index: int, step: int, rank: int) -> Path:
        return self.dir / f"partial_rank_{index:02d}_{step:07d}_rank{rank:05d}.pt"

    def save_rank_state(self, index: int, step: int, rank: int, state: dict) -> Path:
        """What differs between ranks inside an increment (the method's state, e.g. the EMA teacher's BatchNorm
        statistics copied from each rank's own batches, and the RNG); written by every rank."""
        path = self.rank_state_path(index, step, rank)
        atomic_torch_save(path, {"format": RANK_STATE_FORMAT, "version": __version__, "rank": rank, **state})
        return path

    def load_rank_state(self, index: int, step: int, rank: int) -> dict:
        return load_checkpoint(self.rank_state_path(index, step, rank), (RANK_STATE_FORMAT,))

    def remove_rank_files(self, keep: Optional[Tuple[int, int]] = None) -> None:
        """Per-rank files (ZeRO shards, rank states) of older partials (all of them when `keep` is None); main
        process only."""
        if not self.is_main:
            return
        for kind in ("zero", "rank"):
            keep_prefix = None if keep is None else f"partial_{kind}_{keep[0]:02d}_{keep[1]:07d}_"
            for p in self.dir.glob(f"partial_{kind}_*.pt"):
                if keep_prefix is None or not p.name.startswith(keep_prefix):
                    p.unlink(missing_ok=True)

    def load_zero_shard(self, index: int, step: int, rank: int) -> dict:
        return load_checkpoint(self.zero_shard_path(index, step, rank), (ZERO_SHARD_FORMAT,))

    def _check_rank_files(self, partial: dict) -> None:
        files = [(self.zero_shard_path, "ZeRO optimizer shard", partial.get("zero_world", 0)),
                 (self.rank_state_path, "rank state", partial.get("rank_world", 0))]
        for path_of, what, world in files:
            for rank in range(world):
                path = path_of(partial["increment"], partial["step"], rank)
                if not path.is_file():
                    raise CheckpointError(f"{self.partial_path}: damaged: its {what} {path.name} is missing")

    def remove_stale_temporaries(self) -> List[Path]:
        """Temp files of atomic writes that a kill interrupted (`.NAME.XXXX.tmp`: checkpoints, results, summary)."""
        stale = [p for d in (self.dir, self.run_dir) if d.is_dir() for p in d.glob(".*.tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def latest_increment(self) -> Optional[Tuple[Path, dict]]:
        """Newest increment checkpoint that loads; damaged ones are named and skipped (`self.problems`)."""
        found, self.problems = latest_good_increment(self.increments())
        return found

    def resume_point(self) -> Optional[ResumePoint]:
        """Where a resumed run continues: a newer partial increment if one loads, else the last increment."""
        stale = self.remove_stale_temporaries()
        if stale:
            log.info("removed %d stale temporary file(s) of interrupted writes: %s", len(stale),
                     ", ".join(p.name for p in stale))
        done = self.latest_increment()
        done_index = -1 if done is None else done[1]["increment"]
        if self.partial_path.is_file():
            try:
                partial = load_checkpoint(self.partial_path, (PARTIAL_FORMAT,))
                self._check_rank_files(partial)
                if partial["increment"] == done_index + 1:
                    return ResumePoint(partial, self.partial_path, True)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as e:
                log.error("%s; falling back to the last increment checkpoint", e)
        return None if done is None else ResumePoint(done[1], done[0], False)


def zero_optimizer_state(zero_optimizer) -> dict:
    """A ZeRO-1/2 rank's optimizer partition as tensors and plain types, so it loads with weights_only=True.
    DeepSpeed's own checkpoints pickle objects (the loss scaler, slice mappings) and load with
    weights_only=False; those objects are rebuilt by the optimizer, and the scaler's numbers are kept."""
    state = zero_optimizer.state_dict()
    scaler = state.pop("loss_scaler", None)
    state.pop("param_slice_mappings", None)   # only for DeepSpeed's universal checkpoints
    state["zero_stage"] = int(state["zero_stage"])
    state["loss_scaler_numbers"] = {k: v for k, v in vars(scaler).items()
                                    if isinstance(v, (bool, int, float))} if scaler is not None else {}
    return state


def load_zero_optimizer_state(zero_optimizer, states: dict, rank: int, world: int) -> None:
    """Inverse of zero_optimizer_state for the same world size. `states` maps rank -> saved partition:
    this rank's alone, or every rank's when the optimizer uses DeepSpeed's elastic checkpoints."""
    numbers = states[rank].get("loss_scaler_numbers", {})
    clean = {r: {k: v for k, v in s.items() if k not in ("format", "version", "rank", "loss_scaler_numbers")}
             for r, s in states.items()}
    zero_optimizer.load_state_dict([clean.get(r) for r in range(world)],
                                   load_optimizer_states=True, load_from_fp32_weights=True)
    for key, value in numbers.items():
        if hasattr(zero_optimizer.loss_scaler, key):
            setattr(zero_optimizer.loss_scaler, key, value)

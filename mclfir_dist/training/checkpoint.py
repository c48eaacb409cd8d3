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
`torch.load(weights_only=True)`, so a crafted file cannot run code. Its `format` tag is checked.
Training (`--resume`), `mclfir eval` and `load_run_model` all load through here.
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..version import __version__
from ..configure import config_from_dict
from ..errors import CheckpointError, ConfigError, PluginError, UnsafeCheckpointError
from ..model.mclfir import build_model
from ..runfolder.layout import RunFolder
from ..utils.io import atomic_torch_save
from ..utils.names import check_attribute

log = logging.getLogger("mclfir")

PARTIAL_NAME = "partial.pt"
INCREMENT_FORMAT = "mclfir-ckpt/2"
PARTIAL_FORMAT = "mclfir-partial/2"
ZERO_SHARD_FORMAT = "mclfir-zero-shard/1"
RANK_STATE_FORMAT = "mclfir-rank-state/1"



def load_checkpoint(path: str | Path, expect: Tuple[str, ...] = (INCREMENT_FORMAT, PARTIAL_FORMAT)) -> dict:
    """Load with weights_only=True and check the format tag."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = [line.strip() for line in str(e).splitlines() if "Unsupported" in line or "Unpickler error" in line]
        raise UnsafeCheckpointError(f"{path}: refused to load: it holds more than tensors and plain types, so it could "
                              f"run code ({why[0] if why else type(e).__name__})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt not in expect:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r}, this version reads {' or '.join(expect)}")
    if fmt in (INCREMENT_FORMAT, PARTIAL_FORMAT):
        check_contents(state, path)
    return state


_FIELDS = {"increment": int, "global_step": int, "heads": list, "frozen": list, "model": dict, "method": dict,
           "config": dict, "results": dict, "rng": dict}


def check_contents(state: dict, path: Path) -> None:
    """Every field a reader uses, with its type; head names safe to use as file names; every model tensor
    with the name, shape and dtype the checkpoint's own config builds, and finite. A checkpoint that fails
    is damaged: resume falls back to the one before, and eval/embed/export refuse it with its name."""
    for key, kind in _FIELDS.items():
        if key not in state:
            raise CheckpointError(f"{path}: damaged checkpoint: field '{key}' is missing")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{path}: damaged checkpoint: field '{key}' is a {type(state[key]).__name__}, "
                                  f"not a {kind.__name__}")
    if state["increment"] < 0 or state["global_step"] < 0:
        raise CheckpointError(f"{path}: damaged checkpoint: negative increment or global_step")
    for name in state["heads"]:
        check_attribute(name, f"{path}: head", CheckpointError)
    if len(set(state["heads"])) != len(state["heads"]) or not set(state["frozen"]) <= set(state["heads"]):
        raise CheckpointError(f"{path}: damaged checkpoint: heads {state['heads']} and frozen {state['frozen']} "
                              "do not agree")
    try:
        cfg = config_from_dict(state["config"], str(path))
    except PluginError:
        raise   # not damage: the user has not loaded the run's plug-ins
    except ConfigError as e:
        raise CheckpointError(f"{path}: its saved config is not valid: {e}") from None
    cfg.model.pretrained, cfg.model.weights = False, ""
    with torch.device("meta"):   # names, shapes and dtypes only: no memory, no initialisation cost
        model = build_model(cfg.model, cfg.data.image_size)
        for name in state["heads"]:
            model.add_head(name)
    expected = model.state_dict()
    saved = state["model"]
    missing, extra = [k for k in expected if k not in saved], [k for k in saved if k not in expected]
    if missing or extra:
        raise CheckpointError(f"{path}: damaged checkpoint: the model's tensors do not match its config "
                              f"({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    for key, want in expected.items():
        got = saved[key]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            what = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckpointError(f"{path}: damaged checkpoint: tensor '{key}' is {what}, the model needs "
                                  f"{tuple(want.shape)} {want.dtype}")
    bad = _first_non_finite(saved) or _first_non_finite(state["method"], "method.")
    if bad:
        raise CheckpointError(f"{path}: damaged checkpoint: tensor '{bad}' holds NaN or inf")


def _first_non_finite(tree, prefix: str = "") -> Optional[str]:
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    for k, v in items:
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"{prefix}{k}"
        elif isinstance(v, (dict, list, tuple)):
            found = _first_non_finite(v, f"{prefix}{k}.")
            if found:
                return found
    return None


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
        self.problems = []
        for path in reversed(self.increments()):
            try:
                return path, load_checkpoint(path, (INCREMENT_FORMAT,))
            except UnsafeCheckpointError:
                raise
            except CheckpointError as e:
                self.problems.append(str(e))
                log.error("%s; falling back to an earlier checkpoint", e)
        return None

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


def restore_model(model, state: dict) -> None:
    """Add the checkpoint's heads to a freshly built model, load its weights, freeze its frozen heads."""
    for attribute in state["heads"]:
        if attribute not in model.heads:
            model.add_head(attribute)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:   # the run's config builds another model than the checkpoint's
        raise CheckpointError(f"checkpoint of increment {state['increment']} does not fit this model: "
                              f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    model.configure(train_heads=[], frozen_heads=state["frozen"], train_trunk=False)


def load_run_model(run_dir: str | Path, checkpoint: Optional[str | Path] = None):
    """(model in eval mode, RunConfig, checkpoint path) of a run's newest good increment checkpoint."""
    if checkpoint is not None:
        path, state = Path(checkpoint), load_checkpoint(checkpoint, (INCREMENT_FORMAT,))
    else:
        files = Checkpointer(run_dir)
        found = files.latest_increment()
        if found is None:
            why = f": every one is damaged; the newest: {files.problems[0]}" if files.problems else ""
            raise CheckpointError(f"no usable checkpoint under {RunFolder(run_dir).checkpoints}{why}")
        path, state = found
    cfg = config_from_dict(state["config"], str(path))
    cfg.model.pretrained, cfg.model.weights = False, ""   # weights come from the checkpoint
    model = build_model(cfg.model, cfg.data.image_size)
    restore_model(model, state)
    model.eval()
    return model, cfg, path

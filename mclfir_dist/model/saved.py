"""A trained model read back from a run folder, as data: `load_checkpoint` (torch.load(weights_only=True), the
format tag, every field and every model tensor checked against a model built on the meta device from the
checkpoint's own config), the newest good increment checkpoint, and `load_run_model`. Using a model (search,
serve, embed, export) reads runs through here without importing training, methods or data loading: the saved
config is checked against the registries loaded in this process (the trunks, and any named plug-ins)."""
from __future__ import annotations

import hashlib
import logging
import pickle
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .. import config as schema
from ..errors import CheckpointError, ConfigError, PluginError, UnsafeCheckpointError
from ..plugins import require_saved
from ..runfolder.layout import RunFolder
from ..utils.names import check_attribute
from . import trunks  # noqa: F401  the built-in trunks: what a saved model.trunk is checked against
from .mclfir import build_model

log = logging.getLogger("mclfir")

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
        cfg = saved_config(state["config"], str(path))
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
        found, problems = latest_good_increment(sorted(RunFolder(run_dir).checkpoints.glob("increment_*.pt")))
        if found is None:
            why = f": every one is damaged; the newest: {problems[0]}" if problems else ""
            raise CheckpointError(f"no usable checkpoint under {RunFolder(run_dir).checkpoints}{why}")
        path, state = found
    cfg = saved_config(state["config"], str(path))
    cfg.model.pretrained, cfg.model.weights = False, ""   # weights come from the checkpoint
    model = build_model(cfg.model, cfg.data.image_size)
    restore_model(model, state)
    model.eval()
    return model, cfg, path


def saved_config(d: dict, where: str = "a saved config") -> schema.RunConfig:
    """A saved config (a checkpoint's) -> RunConfig, checked against the registries this process has loaded.
    The plug-ins it names must be loaded already (or trusted: --trust-run-plugins); it imports nothing."""
    require_saved(d.get("plugins") or [], where)
    cfg = schema.from_dict(d)
    schema.validate(cfg)
    return cfg


def latest_good_increment(paths: List[Path]) -> Tuple[Optional[Tuple[Path, dict]], List[str]]:
    """((path, state) of the newest increment checkpoint that loads, or None; the damaged newer ones' errors)."""
    problems = []
    for path in reversed(paths):
        try:
            return (path, load_checkpoint(path, (INCREMENT_FORMAT,))), problems
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            problems.append(str(e))
            log.error("%s; falling back to an earlier checkpoint", e)
    return None, problems


def model_identity(model, attribute: str) -> str:
    """A hash of the weights that make `attribute`'s embeddings (trunk and that head): two embeddings are
    comparable only when it matches."""
    h = hashlib.sha256()
    for part in (model.trunk, model.heads[attribute]):
        for name, tensor in sorted(part.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

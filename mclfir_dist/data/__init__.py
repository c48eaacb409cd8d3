"""Data: shard building, manifest, loaders (torch, DALI) and doublet batching.

`build_train_loader` / `build_eval_loader` are the only entry points the engine uses; both
loaders hand over the same batch contract (see pairing.py).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence, Tuple

from ..config import DataConfig
from .manifest import Manifest

log = logging.getLogger(__name__)


def transform_spec(cfg: DataConfig):
    from .loader_torch import TransformSpec
    return TransformSpec(cfg.image_size, cfg.resize_ratio, cfg.flip, cfg.teacher_view)


def choose_loader(cfg: DataConfig) -> Tuple[str, str]:
    """(loader name, reason). `auto` picks DALI where it imports and runs."""
    if cfg.loader == "torch":
        return "torch", "data.loader=torch"
    from . import loader_dali
    ok, why = loader_dali.available()
    if cfg.loader == "dali":
        if not ok:
            raise RuntimeError(f"data.loader=dali but DALI cannot run here: {why}")
        return "dali", f"data.loader=dali ({why})"
    return ("dali", f"auto: {why}") if ok else ("torch", f"auto: DALI unavailable ({why})")


def build_train_loader(cfg: DataConfig, manifest: Manifest, attributes: Sequence[str], rank: int, world: int,
                       seed: int, loader: str = "torch", device=None) -> Iterable[dict]:
    columns = [manifest.attribute_index(a) for a in attributes]
    if loader == "dali":
        from .loader_dali import dali_train_batches
        return dali_train_batches(cfg, manifest, columns, rank, world, seed, device)
    from .loader_torch import DoubletStream, make_loader
    ds = DoubletStream(manifest.shard_files("train"), columns, cfg.batch_doublets, transform_spec(cfg),
                       rank, world, seed, cfg.shuffle_buffer)
    return make_loader(ds, cfg.num_workers)


def build_eval_loader(cfg: DataConfig, manifest: Manifest, split: str, rank: int, world: int,
                      keys: Optional[set] = None, loader: str = "torch", device=None) -> Iterable[dict]:
    if loader == "dali" and keys is None:
        from .loader_dali import dali_eval_batches
        return dali_eval_batches(cfg, manifest, split, rank, world, device)
    from .loader_torch import EvalStream, make_loader
    ds = EvalStream(manifest.shard_files(split), transform_spec(cfg), cfg.eval_batch_size, rank, world, keys)
    return make_loader(ds, cfg.num_workers)

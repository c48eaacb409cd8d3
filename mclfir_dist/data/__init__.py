"""Data: shard building, manifest, loaders (torch, DALI) and doublet batching.

The loader modules are imported when a loader is built, not with the package: `mclfir --help` and the
shard tools stay quick (torchvision's transforms and DALI cost seconds to import).

`build_train_loader` / `build_eval_loader` are the only entry points the engine uses. Loaders
are registered in `LOADERS` (name -> Loader); every loader hands over the same batch contract
(see pairing.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Tuple

from ..config import ConfigError, DataConfig
from ..registry import Registry
from .manifest import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loader:
    available: Callable[[], Tuple[bool, str]]      # (usable here, why)
    train: Callable[..., Iterable[dict]]           # (cfg, manifest, columns, rank, world, seed, device[, start_batch])
    eval: Callable[..., Iterable[dict]]            # (cfg, manifest, split, rank, world, device)
    exact_resume: bool = False                     # train(start_batch=s) yields exactly batches s, s+1, ...


LOADERS: Registry[Loader] = Registry("loader", "data.loader", extra_choices=("auto",))


def _torch_train(cfg, manifest, columns, rank, world, seed, device=None, start_batch=0):
    from .loader_torch import DoubletStream, make_loader, transform_spec
    from .pairing import label_noise
    stream = DoubletStream(manifest.shard_files("train"), columns, cfg.batch_doublets, transform_spec(cfg),
                           rank, world, seed, cfg.shuffle_buffer, start_batch, cfg.task_sampling == "rotate",
                           label_noise(cfg, manifest, columns))
    return make_loader(stream, cfg.num_workers, device)


def _torch_eval(cfg, manifest, split, rank, world, device=None, keys=None):
    from .loader_torch import EvalStream, make_loader, transform_spec
    return make_loader(EvalStream(manifest.shard_files(split), transform_spec(cfg), cfg.eval_batch_size, rank, world,
                                  keys), cfg.num_workers, device)


def _dali_available():
    from . import loader_dali
    return loader_dali.available()


def _dali_train(cfg, manifest, columns, rank, world, seed, device=None, start_batch=0):
    from .loader_dali import dali_train_batches
    batches = dali_train_batches(cfg, manifest, columns, rank, world, seed, device)
    if start_batch:
        # DALI's reader and random ops cannot be positioned, but they are seeded: running the pipeline
        # through the first start_batch batches (decode + augment, no model) lands on the same state
        import time
        t0 = time.time()
        for _ in range(start_batch):
            next(batches)
        log.info("DALI: replayed %d batches to the saved data position in %.1fs", start_batch, time.time() - t0)
    return batches


def _dali_eval(cfg, manifest, split, rank, world, device=None):
    from .loader_dali import dali_eval_batches
    return dali_eval_batches(cfg, manifest, split, rank, world, device)


def _device_available():
    from .loader_device import available
    return available()


def _device_train(cfg, manifest, columns, rank, world, seed, device=None, start_batch=0):
    from .loader_device import device_train_batches
    return device_train_batches(cfg, manifest, columns, rank, world, seed, device, start_batch)


def _device_eval(cfg, manifest, split, rank, world, device=None):
    from .loader_device import device_eval_batches
    return device_eval_batches(cfg, manifest, split, rank, world, device)


LOADERS.register("torch", label="webdataset + torchvision.io")(
    Loader(lambda: (True, "always available"), _torch_train, _torch_eval, exact_resume=True))
LOADERS.register("dali", label="NVIDIA DALI")(Loader(_dali_available, _dali_train, _dali_eval, exact_resume=True))
LOADERS.register("torch_gpu", label="webdataset + batched torchvision.io.decode_jpeg and augmentation on the GPU")(
    Loader(_device_available, _device_train, _device_eval, exact_resume=True))


def choose_loader(cfg: DataConfig, cuda: Optional[bool] = None) -> Tuple[str, str]:
    """(loader name, reason). `auto`: DALI where it imports and runs; else, with CUDA, decode and augment on
    the GPU with torchvision (torch_gpu); else the CPU torch loader."""
    if cfg.loader != "auto":
        ok, why = LOADERS.get(cfg.loader).available()
        if not ok:
            raise RuntimeError(f"data.loader={cfg.loader} but it cannot run here: {why}")
        return cfg.loader, f"data.loader={cfg.loader}"
    ok, why = LOADERS.get("dali").available()
    if ok:
        return "dali", f"auto: {why}"
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    if cuda:
        return "torch_gpu", f"auto: DALI unavailable ({why}); CUDA is here, so decode and augment on the GPU"
    return "torch", f"auto: DALI unavailable ({why}) and no CUDA: decode and augment in CPU workers"


def build_train_loader(cfg: DataConfig, manifest: Manifest, attributes: Sequence[str], rank: int, world: int,
                       seed: int, loader: str = "torch", device=None, start_batch: int = 0) -> Iterable[dict]:
    """Doublet batches of `attributes`, from batch `start_batch` on (exactly the batches an uninterrupted
    stream would give for loaders with exact_resume; a loader without it gets a stream reseeded from
    (seed, start_batch), with a warning)."""
    columns = [manifest.attribute_index(a) for a in attributes]
    entry = LOADERS.get(loader)
    if cfg.label_noise and loader not in ("torch", "dali", "torch_gpu"):
        raise ConfigError(f"data.label_noise={cfg.label_noise}: the plug-in loader {loader!r} does not apply it "
                          "(the built-in loaders do)")
    if start_batch and entry.exact_resume:
        return entry.train(cfg, manifest, columns, rank, world, seed, device, start_batch=start_batch)
    if start_batch:
        from .streams import epoch_seed
        log.warning("data.loader=%s cannot replay its stream: resuming at batch %d on a freshly seeded one "
                    "(not bit-exact; the torch loader is)", loader, start_batch)
        seed = epoch_seed(seed, start_batch, 7)
    return entry.train(cfg, manifest, columns, rank, world, seed, device)


def dead_workers(batches) -> list:
    """(pid, exit code) of each worker of a DataLoader iterator that has died (a negative code is the signal).
    torch reports a killed worker as a plain RuntimeError; this tells that case apart by state, not text."""
    return [(w.pid, w.exitcode) for w in getattr(batches, "_workers", None) or [] if w.exitcode not in (None, 0)]


def batches_held_ahead(cfg: DataConfig) -> int:
    """At most how many batches a train loader holds ready when its consumer pauses: the DataLoader workers'
    requests ahead, plus torch_gpu's decode thread (its queue and the batch in hand) or DALI's prefetch
    queue. A benchmark drains this many before timing a loader-bound rate."""
    from .loader_torch import PREFETCH_FACTOR
    return cfg.num_workers * PREFETCH_FACTOR + 3


def build_eval_loader(cfg: DataConfig, manifest: Manifest, split: str, rank: int, world: int,
                      keys: Optional[set] = None, loader: str = "torch", device=None) -> Iterable[dict]:
    if keys is not None:   # a subset by key (retrieval grids): the torch loader reads it directly
        return _torch_eval(cfg, manifest, split, rank, world, keys=keys)
    return LOADERS.get(loader).eval(cfg, manifest, split, rank, world, device)

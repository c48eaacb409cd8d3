"""The torch loader: webdataset shards -> torchvision.io.decode_jpeg -> v2 transforms -> batches.

Training yields doublet batches (see pairing.py) forever, epoch after epoch; the engine
stops on steps, so every rank runs the same number of batches by construction.
Evaluation yields (images, labels, keys) for this rank's slice of a split, once.
A JPEG that fails to decode is counted, logged with its key, skipped, and reported to the
engine in the batch's `skipped` list (results.json counts them).

Exact resume: a stream is a pure function of (seed, increment, epoch, stream id). Pairing looks
at labels only, and every sample's augmentation is seeded by its own position in the stream,
so `start_batch=s` replays the pairing of the first s batches without augmenting them (it still
decodes, so a corrupt JPEG is skipped exactly as it was) and then yields batch s, s+1, ... exactly
as an uninterrupted stream would.
"""
from __future__ import annotations

import itertools
import logging
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from ..model.preprocess import eval_transform as _eval_transform
from ..model.preprocess import normalise as _normalise
from .images import DEFAULT_MAX_PIXELS, ImageRejected, decode
from .pairing import DoubletBatcher, collate_doublets
from .streams import decode_labels, epoch_seed, iter_partition, iter_shard, shuffled

log = logging.getLogger(__name__)


@dataclass
class TransformSpec:
    image_size: int
    resize_ratio: float = 1.14
    flip: bool = True
    teacher_view: str = "perspective"   # perspective | same
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def resize(self) -> int:
        return int(round(self.image_size * self.resize_ratio))


def transform_spec(cfg) -> TransformSpec:
    """The transforms of a DataConfig."""
    return TransformSpec(cfg.image_size, cfg.resize_ratio, cfg.flip, cfg.teacher_view, cfg.max_image_pixels)


def train_transforms(spec: TransformSpec):
    """(geometry on uint8, normalisation, teacher view on uint8 or None)."""
    geom = [v2.Resize(spec.resize, antialias=True), v2.RandomCrop(spec.image_size)]
    if spec.flip:
        geom.append(v2.RandomHorizontalFlip())
    teacher = v2.RandomPerspective(distortion_scale=0.3, p=1.0) if spec.teacher_view == "perspective" else None
    return v2.Compose(geom), _normalise(), teacher


def eval_transform(spec: TransformSpec):
    return _eval_transform(spec.image_size, spec.resize)


class CorruptCounter:
    def __init__(self):
        self.count = 0
        self.pending: List[str] = []

    def report(self, key: str, err: Exception) -> None:
        self.count += 1
        self.pending.append(key)
        log.warning("skipping sample '%s': %s; %d skipped so far", key, err, self.count)

    def drain(self) -> List[str]:
        """Keys skipped since the last call (handed to the engine with the next batch)."""
        out, self.pending = self.pending, []
        return out


def _stream_identity(rank: int, world: int):
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return rank * nw + wid, world * nw, wid, nw


class DoubletStream(IterableDataset):
    """Endless doublet batches for one increment's attributes on one rank.

    `start_batch`: the first batch (in the DataLoader's order) to yield; earlier ones are replayed
    without augmentation, so a resumed increment sees exactly the batches it would have seen."""

    def __init__(self, shards: Sequence[Path], attribute_columns: Sequence[int], batch_doublets: int,
                 spec: TransformSpec, rank: int, world: int, seed: int, shuffle_buffer: int = 512,
                 start_batch: int = 0, rotate: bool = False, noise=None):
        self.shards, self.columns, self.batch_doublets = list(shards), list(attribute_columns), batch_doublets
        self.spec, self.rank, self.world, self.seed = spec, rank, world, seed
        self.shuffle_buffer, self.start_batch, self.rotate, self.noise = shuffle_buffer, start_batch, rotate, noise

    def _samples(self, stream_id: int, n_streams: int, corrupt: CorruptCounter) -> Iterator[dict]:
        """Decoded (not yet augmented) samples, each with the seed of its own augmentation."""
        for epoch in itertools.count():
            rng = random.Random(epoch_seed(self.seed, epoch, stream_id))
            raw = iter_partition(self.shards, stream_id, n_streams, self.seed, epoch)
            for position, s in enumerate(shuffled(raw, self.shuffle_buffer, rng)):
                try:
                    img = self._load(s["jpg"])
                except ImageRejected as e:
                    corrupt.report(s["__key__"], e)
                    continue
                yield {"key": s["__key__"], "labels": decode_labels(s["lbl"]), "decoded": img,
                       "aug_seed": epoch_seed(self.seed, epoch, stream_id, position, 1)}

    def _load(self, jpeg: bytes) -> torch.Tensor:
        """What the workers do with a sample's JPEG: decode it here (the device loader overrides this)."""
        return decode(jpeg, self.spec.max_pixels)

    def _augment(self, pairs, transforms) -> None:
        geom, norm, teacher = transforms
        for pair in pairs:
            for sample in pair:
                if "image" in sample:
                    continue
                seed_augmentation(sample["aug_seed"])
                img = geom(sample["decoded"])
                sample["image"] = norm(img)
                sample["teacher_image"] = norm(teacher(img)) if teacher is not None else sample["image"]

    def _paired(self, corrupt: CorruptCounter) -> Iterator[tuple]:
        """(pairs, tasks) of every batch this worker yields, after the `start_batch` replay."""
        stream_id, n_streams, worker, n_workers = _stream_identity(self.rank, self.world)
        # the DataLoader takes batches from its workers in turn: global batch i is this worker's if i % n == w
        to_skip = len(range(worker, self.start_batch, n_workers))
        batcher = DoubletBatcher(self.columns, self.batch_doublets, self.rotate, self.noise)
        for samples in self._samples(stream_id, n_streams, corrupt):
            batcher.add(samples)
            if not batcher.batch_ready():
                continue
            pairs, tasks = batcher.pop_pairs()
            if to_skip:
                to_skip -= 1
                continue
            yield pairs, tasks

    def __iter__(self) -> Iterator[dict]:
        transforms = train_transforms(self.spec)
        corrupt = CorruptCounter()
        for pairs, tasks in self._paired(corrupt):
            self._augment(pairs, transforms)
            batch = collate_doublets(pairs, tasks, self.columns)
            batch["skipped"] = corrupt.drain()
            yield batch


class EvalStream(IterableDataset):
    """One pass over a split's shards, this rank's samples only, in deterministic order."""

    def __init__(self, shards: Sequence[Path], spec: TransformSpec, batch_size: int, rank: int = 0, world: int = 1,
                 keys: Optional[set] = None):
        self.shards, self.spec, self.batch_size = list(shards), spec, batch_size
        self.rank, self.world, self.keys = rank, world, keys

    def __iter__(self) -> Iterator[dict]:
        stream_id, n_streams, _, _ = _stream_identity(self.rank, self.world)
        tf = eval_transform(self.spec)
        corrupt = CorruptCounter()
        batch: List[dict] = []
        # sample-level split over the shards in file order: same slices every time
        position = 0
        for path in self.shards:
            for s in iter_shard(path):
                mine = position % n_streams == stream_id
                position += 1
                if not mine or (self.keys is not None and s["__key__"] not in self.keys):
                    continue
                try:
                    img = self._load(s["jpg"], tf)
                except ImageRejected as e:   # only the image's own fault; a failing transform stops the run
                    corrupt.report(s["__key__"], e)
                    continue
                batch.append({"image": img, "labels": decode_labels(s["lbl"]), "key": s["__key__"]})
                if len(batch) == self.batch_size:
                    yield {**self._collate(batch), "skipped": corrupt.drain()}
                    batch = []
        if batch or corrupt.pending:
            yield {**self._collate(batch), "skipped": corrupt.drain()}

    def _collate(self, rows: List[dict]) -> Dict:
        return collate_eval(rows)

    def _load(self, jpeg: bytes, transform) -> torch.Tensor:
        return transform(decode(jpeg, self.spec.max_pixels))


def collate_eval(rows: List[dict]) -> Dict:
    if not rows:
        return {"images": torch.zeros(0), "labels": torch.zeros(0, 0, dtype=torch.long), "keys": []}
    return {"images": torch.stack([r["image"] for r in rows]),
            "labels": torch.stack([torch.as_tensor(r["labels"]) for r in rows]),
            "keys": [r["key"] for r in rows]}


def seed_augmentation(seed: int) -> None:
    """Seed the global CPU generator, which torchvision's random transforms draw from. Not torch.manual_seed:
    in a process where CUDA is not initialised (every DataLoader worker) it also queues a CUDA seeding with
    a formatted stack trace, ~0.8 ms a sample, nearly half of what a torch_gpu worker does per sample."""
    torch.random.default_generator.manual_seed(seed)


# batches each DataLoader worker may have requested ahead of the consumer
PREFETCH_FACTOR = 4


# what the main process stops on, saving first (training/signals.py)
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(_worker_id: int) -> None:
    """A worker leaves stopping to the main process. SLURM signals every process of a step and Ctrl-C the whole
    foreground group; torch's worker dies of SIGTERM, and the main process then failed with a traceback and no
    checkpoint. The loader still stops its workers through their queues as it closes."""
    for s in WORKER_IGNORED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def make_loader(dataset: IterableDataset, num_workers: int, device=None) -> DataLoader:
    """For a CUDA `device` the batches come in pinned memory, so that their copies to the device are
    asynchronous (a copy from pageable memory may wait for the device)."""
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin,
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
                      persistent_workers=False, prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None)

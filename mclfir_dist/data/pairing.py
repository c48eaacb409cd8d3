"""Doublet batching: how every anchor is guaranteed a positive.

Samples arrive shuffled. Each one is routed to one of the increment's attributes it is
labelled for (the one with the fewest ready doublets, so tasks stay balanced). Per
(attribute, value) we hold at most one pending sample; when a second sample with that value
arrives, the two form a doublet (anchor, positive). A batch takes a fixed quota of doublets
per attribute, so every rank's batch has the same size and uses every new head. With `rotate`
(data.task_sampling=rotate) a batch is instead all one attribute's doublets, attribute after attribute
in turn, so each anchor competes with as many rows as in a one-attribute increment.

Batch layout (the contract of both loaders, after pairing): `images[0:B]` are anchors and
`images[B:2B]` their positives, so the positive of row i is row (i + B) mod 2B. Samples still
pending when an epoch ends wait for the next epoch; none is ever used without a positive, and
none is its own positive (its next-epoch copy does not pair with it).
"""
from __future__ import annotations

import hashlib
from collections import deque
from typing import Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch


def task_quotas(batch_doublets: int, n_tasks: int) -> List[int]:
    base, extra = divmod(batch_doublets, n_tasks)
    q = [base + (1 if t < extra else 0) for t in range(n_tasks)]
    if min(q) == 0:
        raise ValueError(f"data.batch_doublets={batch_doublets} is smaller than the increment's {n_tasks} attributes")
    return q


class LabelNoise:
    """data.label_noise: a fraction of the training labels replaced by another value of the same attribute.
    Which labels and which wrong values is a function of (seed, key, column) alone, as in a mislabelled
    dataset: every epoch, rank, loader and method of one seed sees the same wrong labels; evaluation never
    goes through here, so its labels stay clean."""

    def __init__(self, fraction: float, seed: int, sizes: Dict[int, int]):
        self.fraction, self.seed, self.sizes = fraction, seed, dict(sizes)

    def _unit(self, key: str, column: int, draw: int) -> float:
        digest = hashlib.blake2b(f"{self.seed}/{key}/{column}/{draw}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2 ** 64

    def __call__(self, key: str, labels) -> np.ndarray:
        out = np.array(labels, dtype=np.int64, copy=True)
        for c, size in self.sizes.items():
            if out[c] >= 0 and size > 1 and self._unit(key, c, 0) < self.fraction:
                out[c] = (out[c] + 1 + int(self._unit(key, c, 1) * (size - 1))) % size   # never the true value
        return out


def label_noise(cfg, manifest, columns: Sequence[int]) -> Optional[LabelNoise]:
    """The LabelNoise of a DataConfig for these label columns (None at data.label_noise=0)."""
    if not cfg.label_noise:
        return None
    values = manifest.data["attributes"]
    return LabelNoise(cfg.label_noise, cfg.label_noise_seed, {c: len(values[c]["values"]) for c in columns})


class DoubletBatcher:
    """Turns a stream of decoded samples into balanced doublet batches.

    `attribute_columns[t]` is the label-vector column of task t. A sample is a dict with
    'image' (tensor), 'labels' (int64 vector), 'key' and optionally 'teacher_image'.
    """

    def __init__(self, attribute_columns: Sequence[int], batch_doublets: int, rotate: bool = False,
                 noise: Optional[LabelNoise] = None):
        self.columns, self.noise = list(attribute_columns), noise
        self.quotas = task_quotas(batch_doublets, len(self.columns))
        self.batch_doublets, self.rotate, self.turn = batch_doublets, rotate and len(self.columns) > 1, 0
        self.pending: List[Dict[int, dict]] = [dict() for _ in self.columns]
        self.ready: List[Deque[Tuple[dict, dict]]] = [deque() for _ in self.columns]

    def add(self, sample: dict) -> None:
        if self.noise is not None:
            sample["labels"] = self.noise(sample["key"], sample["labels"])
        labels = sample["labels"]
        tasks = [t for t, c in enumerate(self.columns) if labels[c] >= 0]
        if not tasks:
            return
        t = min(tasks, key=lambda i: (len(self.ready[i]), i))
        value = int(labels[self.columns[t]])
        other = self.pending[t].get(value)
        if other is None:
            self.pending[t][value] = sample
        elif other["key"] != sample["key"]:
            del self.pending[t][value]
            self.ready[t].append((other, sample))
        # else: the same image again (it waited across an epoch boundary); it keeps waiting for a partner

    def batch_ready(self) -> bool:
        if self.rotate:
            return len(self.ready[self.turn]) >= self.batch_doublets
        return all(len(r) >= q for r, q in zip(self.ready, self.quotas))

    def pop_pairs(self) -> Tuple[List[Tuple[dict, dict]], List[int]]:
        """The next batch's (anchor, positive) pairs and their task indices, not yet collated."""
        if self.rotate:
            t, self.turn = self.turn, (self.turn + 1) % len(self.columns)
            return [self.ready[t].popleft() for _ in range(self.batch_doublets)], [t] * self.batch_doublets
        pairs, tasks = [], []
        for t, q in enumerate(self.quotas):
            for _ in range(q):
                pairs.append(self.ready[t].popleft())
                tasks.append(t)
        return pairs, tasks

    def pop_batch(self) -> dict:
        return collate_doublets(*self.pop_pairs(), self.columns)

    def batches(self, samples: Iterable[dict]) -> Iterator[dict]:
        for s in samples:
            self.add(s)
            if self.batch_ready():
                yield self.pop_batch()


def collate_doublets(pairs: Sequence[Tuple[dict, dict]], tasks: Sequence[int], columns: Sequence[int]) -> dict:
    anchors = [a for a, _ in pairs]
    positives = [p for _, p in pairs]
    rows = anchors + positives
    task = torch.tensor(list(tasks) * 2, dtype=torch.long)
    labels = torch.stack([torch.as_tensor(np.asarray(r["labels"])) for r in rows]).long()
    col = torch.tensor(columns, dtype=torch.long)[task]
    batch = {
        "labels": labels,
        "task": task,
        "value": labels.gather(1, col[:, None]).squeeze(1),
        "keys": [r["key"] for r in rows],
    }
    if "image" in rows[0]:   # the device loader collates before decoding: images come later
        batch["images"] = torch.stack([r["image"] for r in rows])
    if "teacher_image" in rows[0]:
        batch["teacher_images"] = torch.stack([r["teacher_image"] for r in rows])
    return batch


def positive_index(n_rows: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Row of each row's positive in the anchors-then-positives layout."""
    half = n_rows // 2
    return (torch.arange(n_rows, device=device) + half) % n_rows

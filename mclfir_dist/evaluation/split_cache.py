"""A run's eval splits, decoded once per process: validation every N steps and the pass at the end of each
increment replay the batches of the first pass instead of decoding every JPEG again (on 2 CPU cores at 48 px,
decoding was about half of each evaluation). Eval transforms are deterministic, so a replay gives the batches
a fresh pass would, bit for bit. Bounded by eval.cache_mb; a split that does not fit streams every time."""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Iterable, Iterator, List

import torch


def batch_bytes(batch: dict) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))


class SplitCache:
    def __init__(self, limit_mb: float):
        self.limit = int(limit_mb * 2 ** 20)
        self.used = 0
        self.splits: Dict[Hashable, List[dict]] = {}

    def batches(self, key: Hashable, make_loader: Callable[[], Iterable[dict]]) -> Iterable[dict]:
        """The cached batches of `key`, or a fresh pass over make_loader() that is kept if it ends and fits."""
        if key in self.splits:
            return self.splits[key]
        return self._record(key, make_loader())

    def _record(self, key: Hashable, loader: Iterable[dict]) -> Iterator[dict]:
        kept: List[dict] = []
        size, fits = 0, self.limit > 0
        for batch in loader:
            if fits:
                size += batch_bytes(batch)
                fits = self.used + size <= self.limit
                if fits:
                    kept.append(batch)
                else:
                    kept.clear()
            yield batch
        if fits:   # only a pass that ran to its end is kept
            self.splits[key], self.used = kept, self.used + size

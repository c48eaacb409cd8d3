"""Reading shards as a sample stream, split disjointly across ranks and loader workers.

Every (rank, worker) pair is one *stream*. Each epoch the shard order is reshuffled from
(seed, increment, epoch). With at least as many shards as streams, each stream reads whole
shards (position % n_streams); otherwise every stream reads every shard and keeps samples by
position. Either way the streams of one epoch partition the split: no sample is lost or repeated.
"""
from __future__ import annotations

import random
import tarfile
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .manifest import IMAGE_EXT, LABEL_EXT, ShardError, label_problem, manifest_entry


def epoch_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (seed, increment, epoch, stream...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def iter_shard(path: Path) -> Iterator[Dict]:
    """Samples of one tar as {'__key__', 'jpg', 'lbl'}; a broken tar is reported by name. A shard beside a
    manifest must have the manifest's size and sample count (Python's tarfile stops silently at some cuts)."""
    expected = manifest_entry(Path(path))
    try:
        if expected is not None and "bytes" in expected and Path(path).stat().st_size != expected["bytes"]:
            raise ShardError(f"{path}: {Path(path).stat().st_size} bytes, the manifest says {expected['bytes']} "
                             "(truncated or replaced); rebuild the shards, or set data.skip_bad_shards=true")
        count = 0
        with open(path, "rb") as f:
            files = ({**fs, "__url__": str(path)} for fs in tar_file_iterator(f))
            for sample in group_by_keys(files):
                if IMAGE_EXT not in sample or LABEL_EXT not in sample:
                    raise ShardError(f"{path}: sample '{sample.get('__key__')}' lacks .{IMAGE_EXT} or .{LABEL_EXT}")
                problem = label_problem(sample[LABEL_EXT], Path(path))
                if problem:   # a wrong label would become a wrong number, never a skipped sample
                    raise ShardError(f"{path}: sample '{sample['__key__']}': {problem}; rebuild the shards")
                count += 1
                yield sample
        if expected is not None and count != int(expected["count"]):
            raise ShardError(f"{path}: {count} samples, the manifest says {expected['count']}; rebuild the shards, "
                             "or set data.skip_bad_shards=true")
    except FileNotFoundError:
        raise ShardError(f"shard not found: {path}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"{path}: not a readable tar shard ({type(e).__name__}: {e})") from None


def partition(shards: Sequence[Path], stream_id: int, n_streams: int, seed: int, epoch: int
              ) -> Tuple[List[Path], int, int]:
    """This stream's shards for `epoch`, plus (sample_stride, sample_offset) for sample-level splits."""
    order = list(shards)
    random.Random(epoch_seed(seed, epoch)).shuffle(order)
    if len(order) >= n_streams:
        return order[stream_id::n_streams], 1, 0
    return order, n_streams, stream_id


def iter_partition(shards: Sequence[Path], stream_id: int, n_streams: int, seed: int, epoch: int) -> Iterator[Dict]:
    mine, stride, offset = partition(shards, stream_id, n_streams, seed, epoch)
    position = 0
    for path in mine:
        for sample in iter_shard(path):
            if position % stride == offset:
                yield sample
            position += 1


def shuffled(samples: Iterator[Dict], buffer_size: int, rng: random.Random) -> Iterator[Dict]:
    """Reservoir-style shuffle buffer (bounded memory)."""
    buf: List[Dict] = []
    for s in samples:
        if len(buf) < buffer_size:
            buf.append(s)
            continue
        i = rng.randrange(len(buf))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def decode_labels(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i4").astype(np.int64)

"""The DALI loader: fn.readers.webdataset over our shards (with their index files), nvJPEG
`mixed` decode on the GPU or CPU decode with `device_id=None`, the torch loader's augmentations,
then the same doublet batching, so the engine sees the torch loader's batch contract.

- Sharded by rank: `shard_id` = rank, `num_shards` = world size; shuffled from the seed (the
  reader's RNG runs on, so every epoch has a different order). The engine stops on steps, so every
  rank runs the same number of batches.
- The teacher's extra view is a random perspective warp (fn.experimental.warp_perspective with a
  per-sample matrix drawn inside the graph) of the same crop.
- A corrupt JPEG stops a DALI pipeline. We then scan this pipeline's shards with the CPU decoder,
  log and count each bad key, write index files without them (DALI reads by the index's offsets),
  and rebuild the pipeline: the run goes on without the bad samples.
- A missing index file is rebuilt (into a cache folder when the shard folder is read-only); a
  shard that is not a tar is reported by name.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..config import DataConfig
from ..model.preprocess import IMAGENET_MEAN, IMAGENET_STD
from .images import DEFAULT_MAX_PIXELS, ImageRejected, decode
from .loader_torch import TransformSpec, collate_eval
from .manifest import IMAGE_EXT, LABEL_EXT, SID_EXT, Manifest, ShardError
from .pairing import DoubletBatcher, label_noise
from .shards import write_index
from .streams import iter_shard

log = logging.getLogger(__name__)


def available() -> Tuple[bool, str]:
    """Whether DALI imports and runs here, and which decoder it would use."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA runtime under the wheel
        return False, f"nvidia.dali does not import ({type(e).__name__}: {e})"
    try:
        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def probe():
            return fn.random.uniform(range=(0, 1), shape=(1,))
        p = probe()
        p.build()
        p.run()
    except Exception as e:
        return False, f"a CPU DALI pipeline does not run ({type(e).__name__}: {e})"
    if torch.cuda.is_available():
        return True, f"DALI {nvidia.dali.__version__}, nvJPEG mixed decode on GPU"
    return True, f"DALI {nvidia.dali.__version__}, CPU decode (device_id=None): no CUDA here"


# ---------------------------------------------------------------- shards and index files

def check_shards(shards: Sequence[Path]) -> None:
    for p in shards:
        if not p.is_file():
            raise ShardError(f"shard not found: {p}")
        if not tarfile.is_tarfile(p):
            raise ShardError(f"{p}: not a tar file (corrupt or truncated shard)")


def _cache_dir() -> Path:
    d = Path(os.environ.get("MCLFIR_CACHE", Path(tempfile.gettempdir()) / "mclfir_idx_cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def ensure_index_files(shards: Sequence[Path], index_files: Sequence[Path]) -> List[Path]:
    """The index of every shard; missing ones are rebuilt (logged), next to the shard if writable."""
    out = []
    for tar, idx in zip(shards, index_files):
        if not idx.is_file():
            target = idx if os.access(idx.parent, os.W_OK) else _cache_dir() / f"{abs(hash(str(tar)))}_{idx.name}"
            log.warning("index file %s is missing: rebuilding it at %s", idx, target)
            write_index(tar, target)
            idx = target
        out.append(idx)
    return out


def scan_corrupt(shards: Sequence[Path], max_pixels: int = DEFAULT_MAX_PIXELS) -> Dict[Path, List[str]]:
    """Keys whose JPEG does not decode or is over the pixel limit, per shard (CPU decoder)."""
    from PIL import Image
    bad: Dict[Path, List[str]] = {}
    for p in shards:
        for s in iter_shard(p):
            try:
                decode(s[IMAGE_EXT], max_pixels)
                with Image.open(io.BytesIO(s[IMAGE_EXT])) as im:  # stricter about truncated data
                    im.load()
            except (ImageRejected, OSError, SyntaxError):   # PIL's decode errors
                bad.setdefault(p, []).append(s["__key__"])
    return bad


_VALIDATED: Dict[tuple, List[str]] = {}


def validated_index_files(shards: Sequence[Path], index_files: Sequence[Path], max_pixels: int = DEFAULT_MAX_PIXELS
                          ) -> Tuple[List[Path], List[str]]:
    """Index files without the samples whose JPEG does not decode on the CPU, and those samples' keys.

    DALI's decoders can crash the process (not raise) on some corrupt JPEGs, so an evaluation split is
    checked before DALI sees it; the result is cached per shard file (path, size, mtime)."""
    out, bad_keys = [], []
    for tar, idx in zip(shards, index_files):
        st = tar.stat()
        key = (str(tar), st.st_size, st.st_mtime_ns, max_pixels)
        if key not in _VALIDATED:
            _VALIDATED[key] = scan_corrupt([tar], max_pixels).get(tar, [])
        bad = _VALIDATED[key]
        for k in bad:
            log.warning("skipping sample '%s' in %s: JPEG does not decode or is over the pixel limit (checked before "
                        "DALI reads it)", k, tar)
        bad_keys += bad
        out.append(filtered_index(idx, bad) if bad else idx)
    return out, bad_keys


def filtered_index(idx: Path, drop: Sequence[str]) -> Path:
    """A copy of a wds2idx index without the samples named in `drop`. Always filter the shard's own index
    (never a filtered copy): the copy's name is a digest plus the original name, so it stays short."""
    lines = idx.read_text().split("\n")
    body = [l for l in lines[1:] if l and l.split()[3].split(".", 1)[0] not in set(drop)]
    digest = hashlib.sha1(repr((str(idx.resolve()), sorted(drop))).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{digest}_{idx.name}"
    out.write_text("\n".join([f"v1.2 {len(body)}"] + body) + "\n")
    return out


# ---------------------------------------------------------------- pipelines

def _perspective_matrix(size: int, distortion: float = 0.3):
    """A random 3x3 perspective matrix per sample, built in the DALI graph (checkpointable)."""
    from nvidia.dali import fn, types
    u = lambda lo, hi: fn.random.uniform(range=(lo, hi))
    k = distortion / 2
    one = types.Constant(1.0)
    return fn.stack(fn.stack(one + u(-k / 2, k / 2), u(-k / 2, k / 2), u(-k, k) * size / 4),
                    fn.stack(u(-k / 2, k / 2), one + u(-k / 2, k / 2), u(-k, k) * size / 4),
                    fn.stack(u(-k, k) / size, u(-k, k) / size, one))


def _crop_roi(shape, crop: int, resize: int, pos):
    """Relative (y, x) start/end in the source of a crop x crop window placed at `pos` (0..1) in
    the image resized so that its shorter side is `resize`."""
    from nvidia.dali import fn, math, types
    h = fn.cast(fn.slice(shape, 0, 1, axes=[0]), dtype=types.FLOAT)
    w = fn.cast(fn.slice(shape, 1, 1, axes=[0]), dtype=types.FLOAT)
    short = math.min(h, w)
    fh = crop * short / (resize * h)     # fraction of the height the crop covers
    fw = crop * short / (resize * w)
    y0 = pos[0] * (1.0 - fh)
    x0 = pos[1] * (1.0 - fw)
    return fn.cat(y0, x0), fn.cat(y0 + fh, x0 + fw)


def _build_pipeline(shards, index_files, spec: TransformSpec, batch_size: int, shard_id: int, num_shards: int,
                    seed: int, train: bool, threads: int, device_id: Optional[int], shuffle_buffer: int):
    from nvidia.dali import fn, pipeline_def, types

    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]
    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        jpegs, labels, sid = fn.readers.webdataset(
            paths=[str(p) for p in shards], index_paths=[str(p) for p in index_files],
            ext=[IMAGE_EXT, LABEL_EXT, SID_EXT], dtypes=[types.UINT8, types.INT32, types.INT64],
            missing_component_behavior="error", shard_id=shard_id, num_shards=num_shards,
            random_shuffle=train, initial_fill=max(2, shuffle_buffer), pad_last_batch=not train,
            stick_to_shard=not train, name="Reader")
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        # "resize the shorter side to R, then crop S x S" as one resize of the crop's region of the
        # source: only S x S output pixels are computed (about 2x faster on large photos, same result)
        pos = (fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))) if train else (0.5, 0.5)
        start, end = _crop_roi(fn.peek_image_shape(jpegs), spec.image_size, spec.resize, pos)
        crop = fn.resize(images, size=(spec.image_size, spec.image_size), roi_start=start, roi_end=end,
                         roi_relative=True, antialias=True, dtype=types.UINT8)
        mirror = fn.random.coin_flip() if (train and spec.flip) else 0
        if train and spec.teacher_view == "perspective":
            crop = fn.flip(crop, horizontal=mirror)
            student = fn.crop_mirror_normalize(crop, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
            warped = fn.experimental.warp_perspective(crop, matrix=_perspective_matrix(spec.image_size), fill_value=0)
            teacher = fn.crop_mirror_normalize(warped, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
        else:
            student = fn.crop_mirror_normalize(crop, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std,
                                               mirror=mirror)
            teacher = student
        if gpu:
            labels, sid = labels.gpu(), sid.gpu()
        return student, teacher, labels, sid

    p = pipe()
    p.build()
    return p


class DaliSampleSource:
    """Endless (train) or one-pass (eval) per-sample dicts from a DALI pipeline, surviving corrupt JPEGs."""

    OUTPUTS = ["image", "teacher_image", "labels", "sid"]

    def __init__(self, shards: Sequence[Path], index_files: Sequence[Path], keys: Sequence[str], spec: TransformSpec,
                 batch_size: int, rank: int, world: int, seed: int, train: bool, threads: int,
                 device: Optional[torch.device], shuffle_buffer: int = 512):
        check_shards(shards)
        self.shards, self.keys = list(shards), list(keys)
        self.index_files = ensure_index_files(self.shards, index_files)
        self._own_index_files = list(self.index_files)   # corrupt samples are always filtered out of these
        self.spec, self.batch_size, self.rank, self.world = spec, batch_size, rank, world
        self.seed, self.train, self.threads, self.shuffle_buffer = seed, train, threads, shuffle_buffer
        self.device_id = (device.index or 0) if device is not None and device.type == "cuda" else None
        self.corrupt: List[str] = []
        self._reported = 0
        if not train:   # an eval pass must not meet a corrupt JPEG inside DALI (it can segfault)
            self.index_files, self.corrupt = validated_index_files(self.shards, self.index_files, spec.max_pixels)

    def drain_skipped(self) -> List[str]:
        """Keys dropped as corrupt since the last call (handed to the engine with the next batch)."""
        out = self.corrupt[self._reported:]
        self._reported = len(self.corrupt)
        return out

    def _iterator(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        # DALI's batch is only the decode unit (pairing comes after), but a training pass that drops partial
        # batches yields nothing when it exceeds this rank's share of samples: cap it there
        batch_size = max(1, min(self.batch_size, len(self.keys) // self.world)) if self.train else self.batch_size
        pipe = _build_pipeline(self.shards, self.index_files, self.spec, batch_size, self.rank, self.world,
                               self.seed % (2 ** 31), self.train, self.threads, self.device_id, self.shuffle_buffer)
        return DALIGenericIterator([pipe], self.OUTPUTS, reader_name="Reader", auto_reset=False,
                                   last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)

    def _drop_corrupt(self, err: Exception) -> None:
        bad = scan_corrupt(self.shards, self.spec.max_pixels)
        if not bad:
            raise RuntimeError(f"DALI failed to decode a sample of {[str(p) for p in self.shards]} but the CPU "
                               f"decoders accept every one; DALI said: {err}") from err
        for shard, keys in bad.items():
            for k in keys:
                if k not in self.corrupt:
                    self.corrupt.append(k)
                    log.warning("skipping sample '%s' in %s: JPEG does not decode (%d skipped so far)",
                                k, shard, len(self.corrupt))
        self.index_files = [filtered_index(idx, bad.get(tar, [])) if bad.get(tar) else idx
                            for tar, idx in zip(self.shards, self._own_index_files)]

    def __iter__(self) -> Iterator[dict]:
        it = None
        seen = set()
        while True:
            try:
                if it is None:
                    it = self._iterator()  # DALI runs the first batches here already
                for out in it:
                    d = out[0]
                    labels = d["labels"].long().cpu().numpy()  # once per batch, not per sample
                    sids = d["sid"].reshape(-1).tolist()
                    for i, sid in enumerate(sids):
                        if not self.train:
                            if sid in seen:  # pad_last_batch repeats the last sample
                                continue
                            seen.add(sid)
                        yield {"key": self.keys[sid], "image": d["image"][i], "teacher_image": d["teacher_image"][i],
                               "labels": labels[i]}
                if not self.train:
                    return
                it.reset()
            except RuntimeError as e:
                if "decod" not in str(e).lower() and "jpeg" not in str(e).lower():
                    raise
                self._drop_corrupt(e)
                it = None  # rebuilt without the bad samples; an eval pass skips what it already gave


def dali_train_batches(cfg: DataConfig, manifest: Manifest, columns: Sequence[int], rank: int, world: int,
                       seed: int, device=None) -> Iterator[dict]:
    spec = TransformSpec(cfg.image_size, cfg.resize_ratio, cfg.flip, cfg.teacher_view, cfg.max_image_pixels)
    src = DaliSampleSource(manifest.shard_files("train"), manifest.index_files("train"), manifest.keys("train"), spec,
                           2 * cfg.batch_doublets, rank, world, seed, True, cfg.dali_threads, device,
                           cfg.shuffle_buffer)
    batcher = DoubletBatcher(columns, cfg.batch_doublets, cfg.task_sampling == "rotate",
                             label_noise(cfg, manifest, columns))
    for batch in batcher.batches(iter(src)):
        batch["skipped"] = src.drain_skipped()
        yield batch


def dali_eval_batches(cfg: DataConfig, manifest: Manifest, split: str, rank: int, world: int, device=None):
    spec = TransformSpec(cfg.image_size, cfg.resize_ratio, False, "same", cfg.max_image_pixels)
    src = DaliSampleSource(manifest.shard_files(split), manifest.index_files(split), manifest.keys(split), spec,
                           cfg.eval_batch_size, rank, world, 0, False, cfg.dali_threads, device)
    rows: List[dict] = []
    for s in src:
        rows.append(s)
        if len(rows) == cfg.eval_batch_size:
            yield {**collate_eval(rows), "skipped": src.drain_skipped()}
            rows = []
    if rows or src.corrupt[src._reported:]:
        yield {**collate_eval(rows), "skipped": src.drain_skipped()}


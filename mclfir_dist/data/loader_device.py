"""The device loader: batched JPEG decode and augmentation on the GPU, for machines without DALI.

CPU workers read, shuffle and pair exactly as the torch loader does, but do not decode: they hand
over JPEG bytes, labels and each sample's augmentation seed. The main process decodes a whole batch
with one `torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on CUDA), then augments on the
device with the torch loader's own transforms and random draws: per sample, resize / random crop /
flip from the sample's seed; for the batch, the teacher's perspective view as one `grid_sample`
with a per-sample grid (torchvision's perspective formula, batched). On CPU tensors the result is
the torch loader's, to float rounding; that is how CI tests this path.

- A JPEG whose batch does not decode is found by decoding the batch one image at a time; its key is
  logged and counted, and the whole batch is dropped (its doublets cannot be completed here).
- Resume is exact: batches before `start_batch` are decoded (to drop exactly the batches an
  uninterrupted run dropped) but not augmented.
"""
from __future__ import annotations

import logging
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from .loader_torch import (DoubletStream, EvalStream, TransformSpec, collate_eval, eval_transform, make_loader,
                           train_transforms)
from .pairing import collate_doublets

log = logging.getLogger(__name__)

JPEG_SOI = b"\xff\xd8"


def jpeg_bytes(jpeg: bytes) -> torch.Tensor:
    """A sample's JPEG as a uint8 tensor, undecoded; what is plainly not a JPEG is refused here."""
    if len(jpeg) < 4 or jpeg[:2] != JPEG_SOI:
        raise RuntimeError("not a JPEG (no start-of-image marker)")
    return torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)


class RawDoubletStream(DoubletStream):
    """The torch loader's doublet stream with undecoded images (`jpegs`) and their `aug_seeds`."""

    def _load(self, jpeg: bytes) -> torch.Tensor:
        return jpeg_bytes(jpeg)

    def __iter__(self) -> Iterator[dict]:
        from .loader_torch import CorruptCounter
        corrupt = CorruptCounter()
        for pairs, tasks in self._paired(corrupt):
            rows = [a for a, _ in pairs] + [p for _, p in pairs]
            batch = collate_doublets(pairs, tasks, self.columns)
            batch["jpegs"] = [r["decoded"] for r in rows]
            batch["aug_seeds"] = [r["aug_seed"] for r in rows]
            batch["skipped"] = corrupt.drain()
            yield batch


class RawEvalStream(EvalStream):
    def _load(self, jpeg: bytes, transform) -> torch.Tensor:
        return jpeg_bytes(jpeg)

    def _collate(self, rows: List[dict]) -> dict:
        batch = collate_eval([{**r, "image": torch.zeros(0)} for r in rows])
        batch["images"] = [r["image"] for r in rows]   # undecoded, of different lengths
        return batch


def decode_batch(jpegs: Sequence[torch.Tensor], keys: Sequence[str], device) -> tuple:
    """(decoded images on `device`, keys that failed). One batched call; one at a time only on failure."""
    device = torch.device(device)
    try:
        return decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device), []
    except RuntimeError:
        bad = []
        for data, key in zip(jpegs, keys):
            try:
                decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                bad.append(key)
                log.warning("skipping sample '%s': JPEG does not decode on %s (%s)", key, device,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None, bad or list(keys)


def perspective_grid(coefficients: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's perspective sampling grid (v2.functional.perspective), one per row of
    `coefficients` (N, 8): (N, height, width, 2)."""
    n, dtype, device = coefficients.shape[0], coefficients.dtype, coefficients.device
    c = coefficients
    one = torch.ones(n, device=device, dtype=dtype)
    theta1 = torch.stack([torch.stack([c[:, 0], c[:, 1], c[:, 2]], 1), torch.stack([c[:, 3], c[:, 4], c[:, 5]], 1)], 1)
    theta2 = torch.stack([torch.stack([c[:, 6], c[:, 7], one], 1)] * 2, 1)
    base = torch.empty(1, height, width, 3, dtype=dtype, device=device)
    base[..., 0].copy_(torch.linspace(0.5, width - 0.5, steps=width, device=device, dtype=dtype))
    base[..., 1].copy_(torch.linspace(0.5, height - 0.5, steps=height, device=device, dtype=dtype).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * width, 0.5 * height], dtype=dtype, device=device)
    flat = base.view(1, height * width, 3).expand(n, -1, -1)
    grid = flat.bmm(theta1.transpose(1, 2).div(scale)).div_(flat.bmm(theta2.transpose(1, 2))).sub_(1.0)
    return grid.view(n, height, width, 2)


def batched_perspective(images: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """v2.RandomPerspective's output (bilinear, fill 0) for a uint8 batch, each image with its own
    coefficients, in one grid_sample."""
    n, channels, height, width = images.shape
    grid = perspective_grid(coefficients.to(images.device, torch.float32), height, width)
    with_mask = torch.cat([images.float(), images.new_ones((n, 1, height, width), dtype=torch.float32)], 1)
    sampled = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    pixels, mask = sampled[:, :channels], sampled[:, channels:]
    return pixels.mul_(mask).round_().to(images.dtype)


class DeviceAugmenter:
    """The torch loader's training augmentation applied to decoded images already on the device."""

    def __init__(self, spec: TransformSpec):
        self.spec = spec
        self.geometry, self.normalise, self.teacher = train_transforms(spec)

    def __call__(self, images: List[torch.Tensor], seeds: Sequence[int]) -> tuple:
        """(normalised views, normalised teacher views) as (N, 3, S, S) float batches."""
        views, coefficients = [], []
        size = self.spec.image_size
        placeholder = torch.zeros((), dtype=torch.uint8).expand(3, size, size)   # make_params reads its shape
        for img, seed in zip(images, seeds):
            torch.manual_seed(seed)   # the same draws, in the same order, as DoubletStream._augment
            views.append(self.geometry(img))
            if self.teacher is not None:
                torch.rand(1)         # RandomPerspective's p check (p = 1), drawn as its forward() does
                coefficients.append(self.teacher.make_params([placeholder])["coefficients"])
        batch = torch.stack(views)
        normalised = self.normalise(batch)
        if self.teacher is None:
            return normalised, normalised
        warped = batched_perspective(batch, torch.tensor(coefficients, dtype=torch.float32))
        return normalised, self.normalise(warped)


class DeviceDoubletBatches:
    """Doublet batches decoded and augmented on `device`, from RawDoubletStream workers."""

    def __init__(self, stream: RawDoubletStream, num_workers: int, device, start_batch: int = 0):
        self.stream, self.num_workers, self.device, self.start_batch = stream, num_workers, device, start_batch
        self.skipped_total = 0

    def __iter__(self) -> Iterator[dict]:
        augment = DeviceAugmenter(self.stream.spec)
        pending_skipped: List[str] = []
        produced = 0
        for raw in make_loader(self.stream, self.num_workers):
            jpegs, seeds = raw.pop("jpegs"), raw.pop("aug_seeds")
            pending_skipped += raw.pop("skipped")
            images, bad = decode_batch(jpegs, raw["keys"], self.device)
            if images is None:
                self.skipped_total += len(bad)
                log.warning("dropped a batch of %d images: %s did not decode (%d skipped so far)", len(jpegs),
                            ", ".join(bad), self.skipped_total)
                pending_skipped += bad
                continue
            produced += 1
            if produced <= self.start_batch:   # replay: decoded (to drop what was dropped), not augmented
                continue
            raw["images"], raw["teacher_images"] = augment(images, seeds)
            raw["skipped"], pending_skipped = pending_skipped, []
            yield raw


def device_train_batches(cfg, manifest, columns, rank: int, world: int, seed: int, device=None,
                         start_batch: int = 0) -> DeviceDoubletBatches:
    from . import transform_spec
    stream = RawDoubletStream(manifest.shard_files("train"), columns, cfg.batch_doublets, transform_spec(cfg),
                              rank, world, seed, cfg.shuffle_buffer, rotate=cfg.task_sampling == "rotate")
    return DeviceDoubletBatches(stream, cfg.num_workers, device or "cpu", start_batch)


def device_eval_batches(cfg, manifest, split: str, rank: int, world: int, device=None,
                        keys: Optional[set] = None) -> Iterator[dict]:
    """The torch loader's eval batches (resize, centre crop, normalise), decoded on `device`."""
    from . import transform_spec
    spec = transform_spec(cfg)
    transform = eval_transform(spec)
    device = device or "cpu"
    stream = RawEvalStream(manifest.shard_files(split), spec, cfg.eval_batch_size, rank, world, keys)
    for raw in make_loader(stream, cfg.num_workers):
        jpegs = raw["images"]
        skipped = list(raw["skipped"])
        images, bad = decode_batch(jpegs, raw["keys"], device) if jpegs else ([], [])
        if images is None:   # keep the good ones: evaluation has no pairs to complete
            good = [i for i, k in enumerate(raw["keys"]) if k not in bad]
            skipped += bad
            images = [decode_jpeg(jpegs[i], mode=ImageReadMode.RGB, device=torch.device(device)) for i in good]
            raw["labels"], raw["keys"] = raw["labels"][good], [raw["keys"][i] for i in good]
        raw["images"] = torch.stack([transform(img) for img in images]) if images else torch.zeros(0)
        raw["skipped"] = skipped
        yield raw


def available():
    if torch.cuda.is_available():
        return True, f"batched torchvision.io.decode_jpeg and augmentation on {torch.cuda.get_device_name()}"
    return True, "no CUDA here: decodes and augments CPU tensors in the main process (for tests; slower than torch)"

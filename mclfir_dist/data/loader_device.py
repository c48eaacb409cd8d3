"""The device loader: batched JPEG decode and augmentation on the GPU, for machines without DALI.

CPU workers read, shuffle and pair exactly as the torch loader does, but do not decode: they read
each JPEG's size from its header and draw its augmentation (resize, crop box, flip, the teacher's
perspective) from the sample's own seed, with the torch loader's transforms and in its order, and
hand over bytes + parameters. The training process decodes the batch with one
`torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on CUDA) and applies the parameters:
same-size images resized together, crops as views, flips in one select, then the perspective view
for the whole batch in one `grid_sample` (torchvision's formula, batched). No random number is drawn
on the device side, so on CUDA this runs in a background thread on its own stream, overlapping the
training step. On CPU tensors the batches are the torch loader's (views bit-identical, teacher views
within one level); that is how CI tests it.

- A sample whose header does not parse is skipped in the worker, as the torch loader skips a JPEG
  that does not decode. A batch that then fails to decode on the device is decoded one image at a
  time to name the culprit; its key is logged and counted, and the batch is dropped (its doublets
  cannot be completed here).
- Resume is exact: batches before `start_batch` are decoded (to drop exactly the batches an
  uninterrupted run dropped) but not augmented.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from .images import check_jpeg_header
from .loader_torch import (CorruptCounter, DoubletStream, EvalStream, TransformSpec, collate_eval, eval_transform,
                           make_loader, seed_augmentation, train_transforms, transform_spec)
from .pairing import collate_doublets, label_noise

log = logging.getLogger(__name__)



def resized_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """v2.Resize(short_side)'s output (height, width): the shorter edge to short_side."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_side * long / short)
    return (new_long, short_side) if width <= height else (short_side, new_long)


class AugmentationDraws:
    """The torch loader's random draws for one sample, made without its pixels: the same transform
    objects and the same order as DoubletStream._augment (Resize, RandomCrop, RandomHorizontalFlip, then
    the teacher's RandomPerspective), from the same per-sample seed."""

    def __init__(self, spec: TransformSpec):
        self.spec = spec
        geometry, _, self.teacher = train_transforms(spec)
        self.crop = next(t for t in geometry.transforms if isinstance(t, v2.RandomCrop))
        self.flip = next((t for t in geometry.transforms if isinstance(t, v2.RandomHorizontalFlip)), None)

    @staticmethod
    def _shape(height: int, width: int) -> torch.Tensor:
        return torch.zeros((), dtype=torch.uint8).expand(3, height, width)   # make_params reads shapes only

    def __call__(self, seed: int, height: int, width: int) -> dict:
        return self.batch([(seed, height, width)])[0]

    def batch(self, samples: Sequence[Tuple[int, int, int]]) -> List[dict]:
        """The draws of each (seed, height, width); the teacher's perspective coefficients are solved for
        the whole batch in one batched least-squares call (one at a time it was a quarter of a worker's time)."""
        out, corners = [], []
        for seed, height, width in samples:
            seed_augmentation(seed)
            size = resized_size(height, width, self.spec.resize)
            crop = self.crop.make_params([self._shape(*size)])
            flip = self.flip is not None and bool(torch.rand(1) < self.flip.p)   # its forward(): skip if rand >= p
            if self.teacher is not None:
                torch.rand(1)   # RandomPerspective's p check (p = 1), drawn as its forward() draws it
                corners.append(perspective_corners(self.spec.image_size, self.spec.image_size,
                                                   self.teacher.distortion_scale))
            out.append({"resize": size, "top": crop["top"], "left": crop["left"], "flip": flip, "coefficients": None})
        if corners:
            side = self.spec.image_size
            for row, coefficients in zip(out, perspective_coefficients(torch.tensor(corners), side, side).tolist()):
                row["coefficients"] = coefficients
        return out


def perspective_corners(height: int, width: int, distortion_scale: float) -> List[List[int]]:
    """v2.RandomPerspective.make_params' random corner draws, in its order (its coefficients are solved
    separately, for a whole batch: perspective_coefficients)."""
    bound_h, bound_w = int(distortion_scale * (height // 2)) + 1, int(distortion_scale * (width // 2)) + 1

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, size=(1,)))
    top_left = [draw(0, bound_w), draw(0, bound_h)]
    top_right = [draw(width - bound_w, width), draw(0, bound_h)]
    bottom_right = [draw(width - bound_w, width), draw(height - bound_h, height)]
    bottom_left = [draw(0, bound_w), draw(height - bound_h, height)]
    return [top_left, top_right, bottom_right, bottom_left]


def perspective_coefficients(corners: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's perspective coefficients (N, 8) float32 for corners (N, 4, 2) that the image's corners
    move to: its 8x8 systems, built and solved by the same float64 least squares, all N at once (bit-identical)."""
    n = corners.shape[0]
    start = torch.tensor([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=torch.float64)
    end = corners.to(torch.float64)
    x, y, start_x, start_y = end[..., 0], end[..., 1], start[:, 0], start[:, 1]
    a = torch.zeros(n, 8, 8, dtype=torch.float64)
    a[:, 0::2, 0], a[:, 0::2, 1], a[:, 0::2, 2] = x, y, 1
    a[:, 0::2, 6], a[:, 0::2, 7] = -start_x * x, -start_x * y
    a[:, 1::2, 3], a[:, 1::2, 4], a[:, 1::2, 5] = x, y, 1
    a[:, 1::2, 6], a[:, 1::2, 7] = -start_y * x, -start_y * y
    b = start.reshape(8).expand(n, 8).unsqueeze(-1)
    return torch.linalg.lstsq(a, b, driver="gels").solution.squeeze(-1).to(torch.float32)


def pack_jpegs(jpegs: Sequence[bytes]) -> dict:
    """A batch's JPEGs as one uint8 tensor and their lengths. A DataLoader worker hands each tensor over
    in shared memory of its own, which the training process maps one by one: 256 tensors cost its main
    thread ~80 ms a batch, one tensor ~1.5 ms (and one pinned copy, not 256)."""
    return {"data": torch.frombuffer(bytearray().join(jpegs), dtype=torch.uint8) if jpegs
            else torch.zeros(0, dtype=torch.uint8), "lengths": [len(j) for j in jpegs]}


def unpack_jpegs(packed: dict) -> List[torch.Tensor]:
    """pack_jpegs' JPEGs as 1-D uint8 views of its one tensor (no copy)."""
    return list(torch.split(packed["data"], packed["lengths"])) if packed["lengths"] else []


class RawDoubletStream(DoubletStream):
    """The torch loader's doublet stream with undecoded images (`jpegs`, packed) and their drawn augmentation."""

    def _load(self, jpeg: bytes) -> dict:
        return {"bytes": jpeg, "size": check_jpeg_header(jpeg, self.spec.max_pixels)}

    def __iter__(self) -> Iterator[dict]:
        corrupt = CorruptCounter()
        draws = AugmentationDraws(self.spec)
        for pairs, tasks in self._paired(corrupt):
            rows = [a for a, _ in pairs] + [p for _, p in pairs]
            batch = collate_doublets(pairs, tasks, self.columns)
            batch["jpegs"] = pack_jpegs([r["decoded"]["bytes"] for r in rows])
            batch["augment"] = draws.batch([(r["aug_seed"], *r["decoded"]["size"]) for r in rows])
            batch["skipped"] = corrupt.drain()
            yield batch


class RawEvalStream(EvalStream):
    def _load(self, jpeg: bytes, transform) -> bytes:
        check_jpeg_header(jpeg, self.spec.max_pixels)   # what plainly is not a JPEG, or too large, is skipped here
        return jpeg

    def _collate(self, rows: List[dict]) -> dict:
        batch = collate_eval([{**r, "image": torch.zeros(0)} for r in rows])
        batch["images"] = pack_jpegs([r["image"] for r in rows])   # undecoded, of different lengths
        return batch


def decode_batch(jpegs: Sequence[torch.Tensor], keys: Sequence[str], device) -> tuple:
    """(decoded images on `device`, keys that failed). One batched call; one at a time only on failure."""
    device = torch.device(device)
    if device.type == "cuda":
        # torchvision's nvJPEG decode writes, on a stream of its own, into memory taken from the current
        # stream's pool without waiting for that stream (pytorch/vision#9606): blocks freed while kernels
        # queued here still read them would be overwritten. Let this stream's queued work finish first.
        torch.cuda.current_stream(device).synchronize()
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
    theta1 = coefficients[:, :6].reshape(n, 2, 3)
    denominator = torch.cat([coefficients[:, 6:8], torch.ones(n, 1, device=device, dtype=dtype)], 1)
    theta2 = denominator[:, None, :].expand(n, 2, 3)
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


# elements per batched resize: a chunk of same-size images is resized in one call, and on CUDA
# torchvision resizes uint8 through float32, so this bounds that copy (2**26 floats: 256 MiB)
RESIZE_CHUNK_ELEMENTS = 2 ** 26


def same_size_chunks(images: Sequence[torch.Tensor]) -> Iterator[List[int]]:
    """Indices of images that share a size, in chunks of at most RESIZE_CHUNK_ELEMENTS elements: each chunk
    can be stacked and transformed in one call (catalogue photos mostly share a size)."""
    groups: dict = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    for shape, members in groups.items():
        chunk = max(1, RESIZE_CHUNK_ELEMENTS // max(1, shape[0] * shape[1] * shape[2]))
        for start in range(0, len(members), chunk):
            yield members[start:start + chunk]


def cropped_views(images: List[torch.Tensor], params: Sequence[dict], side: int) -> torch.Tensor:
    """Resized, cropped and flipped uint8 views (N, C, side, side), each image with its own draws. Images of
    one size have one resize size, so they are resized together: a handful of kernels per batch instead of
    several per image. Bit-identical to resizing one at a time."""
    crops: List[Optional[torch.Tensor]] = [None] * len(images)
    for members in same_size_chunks(images):
        size = list(params[members[0]]["resize"])
        resized = v2.functional.resize(torch.stack([images[i] for i in members]), size, antialias=True)
        for row, i in zip(resized, members):
            top, left = params[i]["top"], params[i]["left"]
            crops[i] = row[..., top:top + side, left:left + side]
    batch = torch.stack(crops)
    flipped = [bool(p["flip"]) for p in params]
    if any(flipped):   # one flip of the batch and one select, not a flip per image
        mask = torch.tensor(flipped).view(-1, 1, 1, 1).to(batch.device, non_blocking=True)
        batch = torch.where(mask, batch.flip(-1), batch)
    return batch


def transformed_together(images: List[torch.Tensor], transform) -> torch.Tensor:
    """`transform` (resize, centre crop, normalise: shape-only, no random draws) of each image, applied
    to same-size chunks at once; bit-identical to one image at a time."""
    out: List[Optional[torch.Tensor]] = [None] * len(images)
    for members in same_size_chunks(images):
        for row, i in zip(transform(torch.stack([images[i] for i in members])), members):
            out[i] = row
    return torch.stack(out)


def apply_augmentation(images: List[torch.Tensor], params: Sequence[dict], spec: TransformSpec,
                       normalise) -> tuple:
    """(views, teacher views): normalised (N, 3, S, S) float batches from decoded uint8 images and their draws."""
    batch = cropped_views(images, params, spec.image_size)
    normalised = normalise(batch)
    if params[0]["coefficients"] is None:
        return normalised, normalised
    warped = batched_perspective(batch, torch.tensor([p["coefficients"] for p in params], dtype=torch.float32))
    return normalised, normalise(warped)


class DeviceDoubletBatches:
    """Doublet batches decoded and augmented on `device`, from RawDoubletStream workers. On CUDA a
    background thread prepares the next batches on its own stream while the current step runs."""

    def __init__(self, stream: RawDoubletStream, num_workers: int, device, start_batch: int = 0,
                 prefetch: Optional[int] = None):
        self.stream, self.num_workers, self.start_batch = stream, num_workers, start_batch
        self.device = torch.device(device)
        # batches prepared ahead in a thread: 2 on CUDA (overlaps the step), none on CPU unless asked
        self.prefetch = (2 if self.device.type == "cuda" else 0) if prefetch is None else prefetch
        self.skipped_total = 0

    def _batches(self) -> Iterator[dict]:
        normalise = train_transforms(self.stream.spec)[1]
        pending_skipped: List[str] = []
        produced = 0
        for raw in make_loader(self.stream, self.num_workers, self.device):
            jpegs, params = unpack_jpegs(raw.pop("jpegs")), raw.pop("augment")
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
            raw["images"], raw["teacher_images"] = apply_augmentation(images, params, self.stream.spec, normalise)
            raw["skipped"], pending_skipped = pending_skipped, []
            yield raw

    def __iter__(self) -> Iterator[dict]:
        if self.prefetch <= 0:
            yield from self._batches()
            return
        yield from _prefetched(self._batches(), self.device, self.prefetch)


def _prefetched(batches: Iterator[dict], device: torch.device, depth: int) -> Iterator[dict]:
    """Run `batches` in a thread, `depth` ahead. On CUDA the thread works on a side stream; the consumer's
    stream waits for each batch's event, and its tensors are marked as used there so that their memory
    is not reused early. An error in the thread is raised in the consumer; closing the consumer stops it."""
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    out: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for batch in batches:
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(side)
                    if not put((batch, event)):
                        return
            put((done, None))
        except BaseException as e:   # handed to the consumer, raised there
            put((e, None))
        finally:
            batches.close()   # stops the DataLoader's workers from this thread

    thread = threading.Thread(target=produce, name="mclfir-device-decode", daemon=True)
    thread.start()
    try:
        while True:
            batch, event = out.get()
            if batch is done:
                return
            if isinstance(batch, BaseException):
                raise batch
            if cuda:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for key in ("images", "teacher_images"):
                    if key in batch and batch[key].is_cuda:   # an empty eval batch's images stay on the CPU
                        batch[key].record_stream(current)
            yield batch
    finally:
        stop.set()
        thread.join(timeout=30)


def device_train_batches(cfg, manifest, columns, rank: int, world: int, seed: int, device=None,
                         start_batch: int = 0) -> DeviceDoubletBatches:
    stream = RawDoubletStream(manifest.shard_files("train"), columns, cfg.batch_doublets, transform_spec(cfg),
                              rank, world, seed, cfg.shuffle_buffer, rotate=cfg.task_sampling == "rotate",
                              noise=label_noise(cfg, manifest, columns))
    return DeviceDoubletBatches(stream, cfg.num_workers, device or "cpu", start_batch)


def device_eval_batches(cfg, manifest, split: str, rank: int, world: int, device=None,
                        keys: Optional[set] = None, prefetch: Optional[int] = None) -> Iterator[dict]:
    """The torch loader's eval batches (resize, centre crop, normalise), decoded on `device`. On CUDA they
    are prepared `prefetch` (default 2) ahead in a thread on a side stream, as in training: the decode's
    wait for its stream then stalls that thread, not the embedding of the previous batch."""
    device = torch.device(device or "cpu")
    spec = transform_spec(cfg)
    stream = RawEvalStream(manifest.shard_files(split), spec, cfg.eval_batch_size, rank, world, keys)
    batches = _decoded_eval_batches(stream, cfg.num_workers, eval_transform(spec), device)
    depth = (2 if device.type == "cuda" else 0) if prefetch is None else prefetch
    return _prefetched(batches, device, depth) if depth > 0 else batches


def _decoded_eval_batches(stream: RawEvalStream, num_workers: int, transform, device) -> Iterator[dict]:
    for raw in make_loader(stream, num_workers):
        jpegs = unpack_jpegs(raw["images"])
        skipped = list(raw["skipped"])
        images, bad = decode_batch(jpegs, raw["keys"], device) if jpegs else ([], [])
        if images is None:   # keep the good ones: evaluation has no pairs to complete
            good = [i for i, k in enumerate(raw["keys"]) if k not in bad]
            skipped += bad
            raw["labels"], raw["keys"] = raw["labels"][good], [raw["keys"][i] for i in good]
            images = decode_batch([jpegs[i] for i in good], raw["keys"], device)[0] if good else []
        raw["images"] = transformed_together(images, transform) if images else torch.zeros(0)
        raw["skipped"] = skipped
        yield raw


def available():
    if torch.cuda.is_available():
        return True, f"batched torchvision.io.decode_jpeg and augmentation on {torch.cuda.get_device_name()}"
    return True, "no CUDA here: decodes and augments CPU tensors in the main process (meant for tests)"

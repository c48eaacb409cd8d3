"""The torch_gpu loader (decode and augment on the device) run on CPU tensors: it must give the
torch loader's batches, resume exactly, and drop what does not decode with the key named."""
import itertools
import logging
import math
import shutil

import pytest
import torch
import webdataset as wds

from mclfir_dist.config import DataConfig
from mclfir_dist.data import choose_loader
from mclfir_dist.data import loader_device
from mclfir_dist.data.loader_device import (AugmentationDraws, RawDoubletStream, DeviceDoubletBatches,
                                            batched_perspective, cropped_views, device_eval_batches,
                                            transformed_together)
from mclfir_dist.data.loader_torch import DoubletStream, EvalStream, TransformSpec, eval_transform
from mclfir_dist.data.manifest import Manifest
from mclfir_dist.data.shards import write_index
from mclfir_dist.data.streams import iter_shard

SPEC = TransformSpec(32)
# one uint8 level after normalisation is 1/255/0.225 = 0.0174
ONE_LEVEL = 1 / 255 / 0.224 + 1e-4


def _streams(m, cls, start_batch=0, seed=3):
    columns = [m.attribute_index("colour"), m.attribute_index("garment_length")]
    return cls(m.shard_files("train"), columns, 8, SPEC, 0, 1, seed, 64, start_batch)


def _cpu_batches(m, n, start_batch=0):
    return list(itertools.islice(iter(_streams(m, DoubletStream, start_batch)), n))


def _device_batches(m, n, start_batch=0):
    loader = DeviceDoubletBatches(_streams(m, RawDoubletStream), 0, "cpu", start_batch)
    return list(itertools.islice(iter(loader), n))


def test_device_path_gives_the_torch_loaders_batches(tiny_shards):
    m = Manifest.load(tiny_shards)
    cpu, dev = _cpu_batches(m, 12), _device_batches(m, 12)   # 12 batches of 16 doublets: past one epoch
    for a, b in zip(cpu, dev):
        assert a["keys"] == b["keys"]
        for k in ("labels", "task", "value"):
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(a["images"], b["images"])        # the same transforms and draws: bit-identical
        diff = (a["teacher_images"] - b["teacher_images"]).abs()
        assert diff.max().item() <= ONE_LEVEL             # batched grid_sample: at most one level of rounding
        assert (diff > 0).float().mean().item() < 0.01
        assert not torch.equal(a["images"], a["teacher_images"])


def test_batched_perspective_is_torchvisions_per_image():
    from torchvision.transforms import v2
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    t = v2.RandomPerspective(distortion_scale=0.3, p=1.0)
    placeholder = torch.zeros((), dtype=torch.uint8).expand(3, 40, 40)
    coefficients = [t.make_params([placeholder])["coefficients"] for _ in images]
    ours = batched_perspective(images, torch.tensor(coefficients))
    for img, c, out in zip(images, coefficients, ours):
        ref = v2.functional.perspective(img, None, None, fill=0, coefficients=c)
        assert (ref.int() - out.int()).abs().max().item() <= 1
    assert not torch.equal(ours, images)


def _views_one_at_a_time(images, params, side):
    """The reference: torchvision's resize, crop and flip applied to each image on its own."""
    from torchvision.transforms import v2
    out = []
    for img, p in zip(images, params):
        img = v2.functional.resize(img, list(p["resize"]), antialias=True)
        img = img[..., p["top"]:p["top"] + side, p["left"]:p["left"] + side]
        out.append(img.flip(-1) if p["flip"] else img)
    return torch.stack(out)


def _mixed_size_batch(n, seed=0):
    torch.manual_seed(seed)
    sizes = [(60, 40), (48, 48), (40, 70)]
    images = [torch.randint(0, 256, (3, *sizes[i % 3 if i % 4 else 0]), dtype=torch.uint8) for i in range(n)]
    draws = AugmentationDraws(SPEC)
    return images, [draws(seed * 1000 + i, *img.shape[1:]) for i, img in enumerate(images)]


def test_draws_for_a_batch_are_torchvisions_own_bit_for_bit():
    """The workers draw each sample's corners and solve the whole batch's perspective systems at once:
    the same crops, flips and coefficients as torchvision's transforms drawing from the same seeds."""
    from torchvision.transforms import v2
    from mclfir_dist.data.loader_device import resized_size
    from mclfir_dist.data.loader_torch import seed_augmentation, train_transforms
    spec = TransformSpec(224)
    geometry, _, teacher = train_transforms(spec)
    crop = next(t for t in geometry.transforms if isinstance(t, v2.RandomCrop))
    shape = lambda h, w: torch.zeros((), dtype=torch.uint8).expand(3, h, w)
    samples = [(1000 + i, 224 + 37 * (i % 5), 300 - 11 * (i % 7)) for i in range(300)]
    expected = []
    for seed, height, width in samples:
        seed_augmentation(seed)
        size = resized_size(height, width, spec.resize)
        box = crop.make_params([shape(*size)])
        flip = bool(torch.rand(1) < 0.5)
        torch.rand(1)
        coefficients = teacher.make_params([shape(224, 224)])["coefficients"]
        expected.append({"resize": size, "top": box["top"], "left": box["left"], "flip": flip,
                         "coefficients": coefficients})
    assert AugmentationDraws(spec).batch(samples) == expected
    assert AugmentationDraws(spec)(*samples[3]) == expected[3]


def test_views_resized_together_equal_one_at_a_time(monkeypatch):
    """Same-size images share one resize call (in chunks that bound its memory): the views are the
    per-image pipeline's, bit for bit, over several sizes, chunk limits and flips."""
    images, params = _mixed_size_batch(22)
    assert 0 < sum(p["flip"] for p in params) < len(params)
    expected = _views_one_at_a_time(images, params, SPEC.image_size)
    assert torch.equal(cropped_views(images, params, SPEC.image_size), expected)
    monkeypatch.setattr(loader_device, "RESIZE_CHUNK_ELEMENTS", 3 * 60 * 40 * 3)   # 3 images per call
    assert torch.equal(cropped_views(images, params, SPEC.image_size), expected)
    noflip = [{**p, "flip": False} for p in params]
    assert torch.equal(cropped_views(images, noflip, SPEC.image_size),
                       _views_one_at_a_time(images, noflip, SPEC.image_size))
    transform = eval_transform(SPEC)   # evaluation: resize, centre crop, normalise
    assert torch.equal(transformed_together(images, transform), torch.stack([transform(img) for img in images]))


def _kernels(fn, *args) -> int:
    """Ops dispatched by fn that compute (views, which launch nothing on a GPU, left out)."""
    from mclfir_dist.utils.ops import OpCounter
    with OpCounter() as ops:
        fn(*args)
    return ops.total


def test_augmenting_a_batch_launches_a_fixed_number_of_kernels():
    """On a GPU the side thread pays a launch (and Python dispatch, under the GIL the step also needs)
    per op: images of one size cost the same ops for 8 images as for 64; one at a time grows with N."""
    def same_size(n):
        torch.manual_seed(0)
        images = [torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8) for _ in range(n)]
        draws = AugmentationDraws(SPEC)
        return images, [{**draws(i, 48, 40), "flip": i % 2 == 0} for i in range(n)]
    small, large = same_size(8), same_size(64)
    grouped = [_kernels(cropped_views, *b, SPEC.image_size) for b in (small, large)]
    one_by_one = [_kernels(_views_one_at_a_time, *b, SPEC.image_size) for b in (small, large)]
    assert grouped[0] == grouped[1] <= 12
    assert one_by_one[1] > 8 * grouped[1]


def test_device_path_resumes_exactly(tiny_shards):
    m = Manifest.load(tiny_shards)
    whole = _device_batches(m, 9)
    resumed = _device_batches(m, 4, start_batch=5)
    for a, b in zip(whole[5:], resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
        assert torch.equal(a["teacher_images"], b["teacher_images"])


def _header_only(jpeg: bytes) -> bytes:
    """A JPEG whose headers (and so its size) read fine but that holds no image data."""
    i = 2
    while True:
        length = int.from_bytes(jpeg[i + 2:i + 4], "big")
        if jpeg[i + 1] == 0xDA:   # start of scan: cut here
            return jpeg[:i] + b"\xff\xd9"
        i += 2 + length


def _break_train_jpeg(src, dst, how, split="train"):
    shutil.copytree(src, dst)
    m = Manifest.load(dst)
    tar = m.shard_files(split)[0]
    samples = list(iter_shard(tar))
    bad_key = samples[3]["__key__"]
    with open(tar, "wb") as f:
        w = wds.TarWriter(f, encoder=False, mtime=0)
        for s in samples:
            jpg = s["jpg"]
            if s["__key__"] == bad_key:
                jpg = jpg[:2] + b"\x00garbage" * 10 if how == "header" else _header_only(jpg)
            w.write({"__key__": s["__key__"], "jpg": jpg, "lbl": s["lbl"], "sid": s["sid"]})
        w.close()
    write_index(tar, tar.with_suffix(".idx"))
    return Manifest.load(dst), bad_key


def test_a_corrupt_header_is_skipped_in_the_worker_like_the_torch_loader(tiny_shards, tmp_path):
    m, bad_key = _break_train_jpeg(tiny_shards, tmp_path / "bad", "header")
    cpu, dev = _cpu_batches(m, 14), _device_batches(m, 14)
    assert [b["keys"] for b in cpu] == [b["keys"] for b in dev]
    assert [b["skipped"] for b in cpu] == [b["skipped"] for b in dev]
    assert bad_key in [k for b in dev for k in b["skipped"]] and bad_key not in [k for b in dev for k in b["keys"]]


def test_a_jpeg_that_does_not_decode_drops_its_batch_and_is_named(tiny_shards, tmp_path, caplog):
    m, bad_key = _break_train_jpeg(tiny_shards, tmp_path / "bad", "no image data")
    caplog.set_level(logging.WARNING)
    loader = DeviceDoubletBatches(_streams(m, RawDoubletStream), 0, "cpu")
    batches = list(itertools.islice(iter(loader), 14))
    assert all(bad_key not in b["keys"] for b in batches)
    assert bad_key in [k for b in batches for k in b["skipped"]]
    assert loader.skipped_total == 1 and bad_key in caplog.text and "dropped a batch" in caplog.text
    # resume replays the drop: batches 6.. are the same
    resumed = list(itertools.islice(iter(DeviceDoubletBatches(_streams(m, RawDoubletStream), 0, "cpu", 6)), 3))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in batches[6:9]]


def test_eval_keeps_the_good_images_of_a_batch_with_one_that_does_not_decode(tiny_shards, tmp_path):
    m, bad_key = _break_train_jpeg(tiny_shards, tmp_path / "bad", "no image data", split="test")
    cfg = DataConfig(image_size=32, eval_batch_size=16, num_workers=0)
    ours = list(device_eval_batches(cfg, m, "test", 0, 1, "cpu"))
    ref = {k: img for b in EvalStream(m.shard_files("test"), SPEC, 16) for k, img in zip(b["keys"], b["images"])}
    assert bad_key in [k for b in ours for k in b["skipped"]] and bad_key not in ref
    assert sorted(k for b in ours for k in b["keys"]) == sorted(ref)
    for b in ours:
        assert b["images"].shape[0] == len(b["keys"]) == b["labels"].shape[0]
        assert all(torch.equal(img, ref[k]) for k, img in zip(b["keys"], b["images"]))


@pytest.mark.parametrize("prefetch", [0, 2])   # 2: in a thread, as on CUDA
def test_device_eval_equals_torch_eval(tiny_shards, prefetch):
    m = Manifest.load(tiny_shards)
    cfg = DataConfig(image_size=32, eval_batch_size=16, num_workers=0)
    ref = list(EvalStream(m.shard_files("test"), SPEC, 16))
    ours = list(device_eval_batches(cfg, m, "test", 0, 1, "cpu", prefetch=prefetch))
    assert [b["keys"] for b in ref] == [b["keys"] for b in ours]
    for a, b in zip(ref, ours):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def test_auto_picks_dali_then_gpu_decode_then_cpu(monkeypatch):
    from mclfir_dist.data import LOADERS
    import dataclasses
    cfg = DataConfig(loader="auto")
    dali = LOADERS.get("dali")
    monkeypatch.setitem(LOADERS._entries, "dali", dataclasses.replace(dali, available=lambda: (False, "not here")))
    name, why = choose_loader(cfg, cuda=True)
    assert name == "torch_gpu" and "not here" in why and "GPU" in why
    name, why = choose_loader(cfg, cuda=False)
    assert name == "torch" and "no CUDA" in why
    monkeypatch.setitem(LOADERS._entries, "dali", dataclasses.replace(dali, available=lambda: (True, "DALI x")))
    assert choose_loader(cfg, cuda=True) == ("dali", "auto: DALI x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA half of the parity check needs a GPU")
def test_cuda_decode_and_augment_match_the_cpu_path(tiny_shards):
    """On a GPU: nvJPEG and the CUDA kernels against the CPU path; decoders differ by a few levels."""
    m = Manifest.load(tiny_shards)
    cpu = list(itertools.islice(iter(DeviceDoubletBatches(_streams(m, RawDoubletStream), 0, "cpu")), 3))
    gpu = list(itertools.islice(iter(DeviceDoubletBatches(_streams(m, RawDoubletStream), 0, "cuda")), 3))
    for a, b in zip(cpu, gpu):
        assert a["keys"] == b["keys"] and b["images"].is_cuda
        for k in ("images", "teacher_images"):
            diff = (a[k] - b[k].cpu()).abs()
            assert diff.mean().item() < 0.06 and diff.max().item() < 1.0, k
    cfg = DataConfig(image_size=32, eval_batch_size=16, num_workers=0)   # evaluation, prefetched on a side stream
    on_cpu, on_cuda = (device_eval_batches(cfg, m, "test", 0, 1, d) for d in ("cpu", "cuda"))
    for a, b in zip(on_cpu, on_cuda):
        assert a["keys"] == b["keys"] and b["images"].is_cuda
        diff = (a["images"] - b["images"].cpu()).abs()
        assert diff.mean().item() < 0.06 and diff.max().item() < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG's stream ordering exists only on a GPU")
def test_cuda_decode_does_not_overwrite_memory_a_queued_kernel_still_reads(tiny_shards):
    """pytorch/vision#9606: the CUDA decoder writes into blocks freed on the current stream without waiting
    for it. Tensors the size of the decoded images are freed while a stalled stream still has to sum them;
    decode_batch must not let nvJPEG overwrite them first."""
    from mclfir_dist.data.loader_device import decode_batch
    samples = list(iter_shard(Manifest.load(tiny_shards).shard_files("train")[0]))[:8]
    jpegs = [torch.frombuffer(bytearray(s["jpg"]), dtype=torch.uint8) for s in samples]
    keys = [s["__key__"] for s in samples]
    shapes = [tuple(img.shape) for img in decode_batch(jpegs, keys, "cpu")[0]]
    corrupted = 0
    for _ in range(20):
        victims = [torch.full(shape, 7, dtype=torch.uint8, device="cuda") for shape in shapes]
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)   # the stream stalls; the sums below wait behind it
        sums = [v.sum(dtype=torch.int64) for v in victims]
        del victims                      # freed while the sums are still queued
        decode_batch(jpegs, keys, "cuda")
        torch.cuda.synchronize()
        corrupted += sum(int(total) != 7 * math.prod(shape) for total, shape in zip(sums, shapes))
    assert corrupted == 0


def test_jpeg_size_from_the_header_matches_the_decoded_image(tiny_shards):
    from mclfir_dist.data.images import ImageRejected, decode, jpeg_size
    import io
    from PIL import Image
    samples = list(iter_shard(Manifest.load(tiny_shards).shard_files("train")[0]))[:20]
    jpegs = [s["jpg"] for s in samples]
    for mode, size, progressive in (("L", (37, 91), False), ("RGB", (300, 17), True), ("CMYK", (64, 48), False)):
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format="JPEG", progressive=progressive)
        jpegs.append(buf.getvalue())
    for data in jpegs:
        assert jpeg_size(data) == tuple(decode(data).shape[1:])
    for bad in (b"", b"\xff\xd8", b"GIF89a" + bytes(20), jpegs[0][:20]):
        with pytest.raises(ImageRejected):
            jpeg_size(bad)


def test_the_prefetch_thread_keeps_order_and_hands_over_errors(tiny_shards, tmp_path):
    m = Manifest.load(tiny_shards)
    plain = _device_batches(m, 5)
    threaded = list(itertools.islice(iter(DeviceDoubletBatches(_streams(m, RawDoubletStream), 0, "cpu",
                                                               prefetch=2)), 5))
    for a, b in zip(plain, threaded):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
    broken = DeviceDoubletBatches(_streams(m, RawDoubletStream), 0, "cpu", prefetch=2)
    broken.stream.shards = [tmp_path / "missing.tar"]
    with pytest.raises(Exception, match="missing.tar"):
        next(iter(broken))


def test_augmentation_seeding_draws_what_torch_manual_seed_draws():
    """seed_augmentation seeds only the CPU generator (no queued CUDA seeding in the workers): the
    transforms must draw exactly what they drew under torch.manual_seed."""
    from mclfir_dist.data.loader_torch import seed_augmentation
    torch.manual_seed(1234)
    expected = (torch.rand(5), torch.randint(0, 100, (3,)))
    torch.manual_seed(99)
    seed_augmentation(1234)
    drawn = (torch.rand(5), torch.randint(0, 100, (3,)))
    assert all(torch.equal(a, b) for a, b in zip(expected, drawn))


def test_workers_hand_over_a_batchs_jpegs_in_one_tensor(tiny_shards):
    """Each tensor a DataLoader worker returns is a shared-memory segment the training process maps on its
    main thread: the JPEGs of a batch travel packed in one, and unpack to the shard's exact bytes."""
    from mclfir_dist.data.loader_device import unpack_jpegs
    from mclfir_dist.data.loader_torch import make_loader
    m = Manifest.load(tiny_shards)
    stored = {s["__key__"]: s["jpg"] for path in m.shard_files("train") for s in iter_shard(path)}
    for batch in itertools.islice(iter(make_loader(_streams(m, RawDoubletStream), 2)), 3):
        assert isinstance(batch["jpegs"]["data"], torch.Tensor) and len(batch["jpegs"]["lengths"]) == 16
        jpegs = unpack_jpegs(batch["jpegs"])
        assert all(j.data_ptr() >= batch["jpegs"]["data"].data_ptr() for j in jpegs)   # views, not copies
        assert [bytes(j.numpy()) for j in jpegs] == [stored[k] for k in batch["keys"]]

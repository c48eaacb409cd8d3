"""Loader benchmark: images/s of four loaders on the same shards and the same cores.

    python -m mclfir_dist.bench.loader --shards shards/synthetic [--make-large 2000] [--device cuda]

- torch: our loader (webdataset + torchvision.io.decode_jpeg + v2 transforms, DataLoader workers);
- pil:   the common practice (webdataset + PIL + torchvision.transforms, DataLoader workers);
- torch_gpu: workers read and pair, the main process decodes the batch with one decode_jpeg call and
  augments on the device (--device cuda; on CPU it runs on CPU tensors, for comparison only);
- gpu_feed: torch_gpu's CPU side alone (workers read, pair, parse JPEG headers, draw augmentations; no
  decode): the ceiling these workers put on what a GPU can be fed;
- dali:  our DALI loader (fn.readers.webdataset; CPU decode, or nvJPEG `mixed` with --device cuda).
All do decode -> resize -> random crop -> flip -> normalise into batches of --batch images; the
torch and DALI rows include our doublet pairing. `--teacher-view perspective` (the paper configs' view)
adds the teacher's warped view to torch, torch_gpu, gpu_feed and DALI, not to pil, which has none: compare
pil only at the default `same`. Each is timed after max(3, workers x 4 + 3) batches (past the first wave,
when every worker hands over its first batch at once). Prints numbers and ratios; asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T

from ..config import DataConfig, ShardBuildConfig
from ..data import LOADERS, batches_held_ahead, build_train_loader, synthetic
from ..data.loader_torch import PREFETCH_FACTOR, make_loader
from ..data.manifest import Manifest, ShardError
from ..data.shards import RawSample, build_shards
from ..data.streams import decode_labels, iter_shard
from ..model.preprocess import IMAGENET_MEAN, IMAGENET_STD


class PilStream(IterableDataset):
    """Baseline: what most training scripts do."""

    def __init__(self, shards, size: int):
        self.shards, self.size = list(shards), size

    def __iter__(self):
        from PIL import Image
        tf = T.Compose([T.Resize(int(round(self.size * 1.14))), T.RandomCrop(self.size), T.RandomHorizontalFlip(),
                        T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for epoch in itertools.count():
            for p in self.shards[wid::nw] if len(self.shards) >= nw else self.shards:
                for s in iter_shard(p):
                    img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
                    yield tf(img), torch.as_tensor(decode_labels(s["lbl"]))


def _time(batches, n_batches: int, images_per_batch, warmup: int = 3) -> float:
    it = iter(batches)
    for _ in range(warmup):  # workers start; past the first wave (every worker's first batch at once)
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(n_batches):
        b = next(it)
        n += images_per_batch(b)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def bench_one(manifest: Manifest, size: int, batch: int, workers: int, n_batches: int, device: str,
              teacher_view: str = "same") -> dict:
    cfg = DataConfig(image_size=size, batch_doublets=batch // 2, num_workers=workers, teacher_view=teacher_view,
                     dali_threads=workers, shuffle_buffer=256)
    out = {}
    warmup = max(3, batches_held_ahead(cfg))
    if device == "cpu":
        torch_loader = build_train_loader(cfg, manifest, [manifest.attributes[0]], 0, 1, seed=0, loader="torch")
        out["torch"] = _time(torch_loader, n_batches, lambda b: b["images"].shape[0], warmup)
        pil = DataLoader(PilStream(manifest.shard_files("train"), size), batch_size=batch, num_workers=workers,
                         prefetch_factor=PREFETCH_FACTOR)   # the warm-up assumes it
        out["pil"] = _time(pil, n_batches, lambda b: b[0].shape[0], warmup)
    dev = torch.device("cuda", 0) if device == "cuda" else None
    gpu = build_train_loader(cfg, manifest, [manifest.attributes[0]], 0, 1, seed=0, loader="torch_gpu",
                             device=dev or "cpu")
    out["torch_gpu"] = _time(gpu, n_batches, lambda b: b["images"].shape[0], warmup)
    # its CPU side alone (read, shuffle, pair, JPEG header sizes, augmentation draws; no decode): the most
    # images/s these workers can hand a GPU, whatever nvJPEG does
    out["gpu_feed"] = _time(make_loader(gpu.stream, gpu.num_workers), n_batches, lambda b: len(b["keys"]), warmup)
    ok, why = LOADERS.get("dali").available()
    if ok:
        dali = build_train_loader(cfg, manifest, [manifest.attributes[0]], 0, 1, seed=0, loader="dali", device=dev)
        out["dali"] = _time(dali, n_batches, lambda b: b["images"].shape[0], warmup)
    else:
        print(f"  dali: not measured ({why})")
    return out


def make_large_shards(n: int, out: Path) -> Manifest:
    """N synthetic garments re-rendered as 600x800 JPEGs (a typical catalogue photo size)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    samples = []
    for i, (key, _, labels) in enumerate(synthetic.generate(n, 16, seed=1)):
        img = synthetic.render_garment(labels, 600, rng).resize((600, 800), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        samples.append(RawSample(key, buf.getvalue(), labels))
    cfg = ShardBuildConfig(min_value_count=1, samples_per_shard=250, val_fraction=0.05, test_fraction=0.05)
    return build_shards(samples, list(synthetic.ATTRIBUTES), out, cfg, source={"type": "synthetic-large", "n": n})


def bench_sources(local: str, urls, size: int, batch: int, workers: int, n_batches: int) -> list:
    """The same shard set read from its folder and from each URL (http(s), s3, ...), in one run: the first
    read (the manifest and every train shard into a fresh cache, MB/s) and the torch loader's images/s after
    it (every loader reads the verified cache, so this is the local figure again, measured)."""
    from ..data import remote
    rows = []
    for source in [local, *urls]:
        with tempfile.TemporaryDirectory(prefix="mclfir-bench-cache-") as cache:
            remote.configure(cache, 8, 0.0)
            t0 = time.perf_counter()
            m = Manifest.load(source)
            m.fetch("train")
            fetch = time.perf_counter() - t0
            size_mb = sum(p.stat().st_size for p in m.shard_files("train")) / 1e6
            cfg = DataConfig(image_size=size, batch_doublets=batch // 2, num_workers=workers, shuffle_buffer=256)
            loader = build_train_loader(cfg, m, [m.attributes[0]], 0, 1, seed=0, loader="torch")
            ips = _time(loader, n_batches, lambda b: b["images"].shape[0], max(3, batches_held_ahead(cfg)))
            rows.append({"source": remote.redact(source) if remote.is_url(source) else f"{source} (local)",
                         "train_mb": size_mb, "first_read_s": fetch,
                         "mb_per_s": size_mb / fetch if remote.is_url(source) else None, "images_per_s": ips})
            del loader
    return rows


def report_sources(rows: list) -> None:
    print("\n| source | train split MB | first read s | MB/s fetched | torch loader images/s | vs local |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mbs = f"{r['mb_per_s']:.1f}" if r["mb_per_s"] is not None else "- (no fetch)"
        print(f"| {r['source']} | {r['train_mb']:.1f} | {r['first_read_s']:.2f} | {mbs} | "
              f"{r['images_per_s']:.1f} | {r['images_per_s'] / rows[0]['images_per_s']:.2f} |")


def report(name: str, r: dict) -> None:
    print(f"\n[{name}]")
    for k, v in r.items():
        print(f"  {k:9s} {v:8.1f} images/s")
    for a, b in (("dali", "torch"), ("dali", "pil"), ("torch_gpu", "torch"), ("torch_gpu", "pil"),
                 ("gpu_feed", "torch")):
        if a in r and b in r:
            print(f"  {a}/{b} ratio: {r[a] / r[b]:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard directory to read (its train split)")
    p.add_argument("--make-large", type=int, default=0, metavar="N",
                   help="also build N 600x800 JPEGs and compare on them")
    p.add_argument("--size", type=int, default=224, help="output crop size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads")
    p.add_argument("--batches", type=int, default=30, help="timed batches per loader")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: DALI nvJPEG mixed decode, images/s per GPU")
    p.add_argument("--teacher-view", choices=["same", "perspective"], default="same",
                   help="perspective: also the teacher's warped view (not in the pil row)")
    p.add_argument("--remote", nargs="+", metavar="URL", default=[],
                   help="the same shard set at these URLs (http(s)://, s3://): first read and torch loader "
                        "images/s against the local folder, in one run (the only comparison made then)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"cores: {os.cpu_count()}  workers/threads: {args.workers}  batch: {args.batch}  crop: {args.size}  "
          f"device: {args.device}  teacher view: {args.teacher_view}")
    if args.remote:
        report_sources(bench_sources(args.shards, args.remote, args.size, args.batch, args.workers, args.batches))
        return 0
    try:
        m = Manifest.load(args.shards)
    except ShardError as e:
        print(f"error: {e}", file=__import__("sys").stderr)
        return 2
    report(f"{args.shards} ({m.data['source'].get('type')})",
           bench_one(m, args.size, args.batch, args.workers, args.batches, args.device, args.teacher_view))
    if args.make_large:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            large = make_large_shards(args.make_large, Path(tmp) / "large")
            print(f"\nbuilt {args.make_large} 600x800 JPEGs in {time.time() - t0:.0f}s")
            report("600x800 JPEGs", bench_one(large, args.size, args.batch, args.workers, args.batches, args.device,
                                              args.teacher_view))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`mclfir embed`: a run's model over a catalogue -> one embedding matrix per attribute, keys beside it.

Output folder:
  keys.txt            one image key per line (row i of every matrix)
  locations.txt       where row i's image is (file path, or `shard.tar` for shard sets)
  <attribute>.npy     float32 N x D, L2-normalised
  labels.json         {attribute: [value or null per row]} where the catalogue has labels
  embed.json          what produced it: run, checkpoint, trunk, image size, normalisation, counts,
                      and every image that could not be read (counted and listed, never fatal)
"""
from __future__ import annotations

import csv
import logging
import re
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from ..data.manifest import Manifest
from ..data.streams import decode_labels, iter_shard
from ..data.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_any
from ..errors import BadInputError, ConfigError
from ..model.preprocess import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ..model.saved import load_run_model, model_identity
from .embeddings import IMAGE_SUFFIXES, load_embeddings, read_keys, write_embeddings   # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def decode_file_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                      limit: str = "data.max_image_pixels") -> torch.Tensor:
    return decode_any(data, max_pixels, limit)


def _line_safe(key: str) -> Optional[str]:
    """Why a key cannot be one line of keys.txt ('' if it can)."""
    return "the key holds a line break or control character" if re.search(r"[\x00-\x1f\x7f]", key) else ""


class _Items(Dataset):
    """(key, location, labels) rows read from files; a row that cannot be read yields an error instead."""

    def __init__(self, rows: List[dict], transform):
        self.rows, self.transform = rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        if "error" in row:
            return row
        try:
            decoded = decode_file_bytes(Path(row["location"]).read_bytes())
        except (OSError, ImageRejected) as e:   # the file's fault only; a failing transform stops the run
            return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        return {**row, "image": self.transform(decoded)}


class _ShardItems(IterableDataset):
    """Every sample of a shard set's splits; each DataLoader worker reads its own shards."""

    def __init__(self, manifest, splits: Sequence[str], transform):
        self.manifest, self.splits, self.transform = manifest, list(splits), transform

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        names = [[a["name"], a["values"]] for a in self.manifest.data["attributes"]]
        shards = [p for split in self.splits for p in self.manifest.shard_files(split)]
        for path in shards[worker::workers]:
            for s in iter_shard(path):
                labels = decode_labels(s["lbl"])
                row = {"key": s["__key__"], "location": path.name,
                       "labels": {a: (vals[v] if v >= 0 else None) for (a, vals), v in zip(names, labels)}}
                try:
                    decoded = decode_file_bytes(s["jpg"])
                except ImageRejected as e:
                    yield {**row, "error": f"ImageRejected: {e}"}
                    continue
                yield {**row, "image": self.transform(decoded)}


def rows_from_images(folder: str | Path) -> List[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: not a folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    rows = [{"key": p.relative_to(folder).with_suffix("").as_posix(), "location": str(p.resolve()), "labels": {}}
            for p in files]   # absolute: a search from another folder still finds the images
    return [{**r, "error": f"BadInputError: {_line_safe(r['key'])}"} if _line_safe(r["key"]) else r for r in rows]


def label_columns(path: Path, header: Sequence[str], attributes: Sequence[str],
                  label_map: Optional[Dict[str, str]], extra: Sequence[str] = ()) -> Dict[str, str]:
    """head -> the CSV column holding its labels: the head's own name, or `--label-map COLUMN=HEAD`. A head
    with neither is named in the log (its hits show no value), never dropped in silence."""
    columns = {a: a for a in attributes if a in header}
    for column, head in (label_map or {}).items():
        if column not in header:
            raise BadInputError(f"--label-map {column}={head}: {path} has no column '{column}' "
                                f"(columns: {', '.join(header)})")
        if head not in attributes:
            raise ConfigError(f"--label-map {column}={head}: no head '{head}' is embedded ({', '.join(attributes)})")
        columns[head] = column
    for column in extra:   # --label-columns: kept to filter on and to show, with or without a head
        if column not in header:
            raise BadInputError(f"--label-columns {column}: {path} has no such column (columns: {', '.join(header)})")
        columns.setdefault(column, column)
    unlabelled = [a for a in attributes if a not in columns]
    if unlabelled:
        log.warning("%s: no label column for %s: their hits show no value (map one with --label-map COLUMN=HEAD)",
                    path, ", ".join(unlabelled))
    return columns


def rows_from_csv(path: str | Path, image_column: str, key_column: str, image_root: Optional[str],
                  attributes: Sequence[str], label_map: Optional[Dict[str, str]] = None,
                  label_extra: Sequence[str] = ()) -> List[dict]:
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if image_column not in header or (key_column and key_column not in header):
            missing = image_column if image_column not in header else key_column
            raise BadInputError(f"{path}: unknown column '{missing}' (columns: {', '.join(header)})")
        columns = label_columns(path, header, attributes, label_map, label_extra)
        rows = []
        for row in reader:
            rel = (row.get(image_column) or "").strip()
            key = row[key_column].strip() if key_column else Path(rel).with_suffix("").as_posix()
            rows.append({"key": key, "location": str((root / rel).resolve()),
                         "labels": {a: (row.get(c) or "").strip() or None for a, c in columns.items()}})
            if _line_safe(key) or not key:
                rows[-1]["error"] = f"BadInputError: {_line_safe(key) or 'empty key'}"
    return rows


def _collate(items: List[dict]) -> dict:
    good = [x for x in items if "image" in x]
    return {"images": torch.stack([x["image"] for x in good]) if good else None, "good": good,
            "bad": [x for x in items if "error" in x]}


def embed_catalogue(run: str, out: str, images: Optional[str] = None, csv_path: Optional[str] = None,
                    shards: Optional[str] = None, attributes: Sequence[str] = (), batch: int = 64, workers: int = 2,
                    splits: Sequence[str] = ("train", "val", "test"), image_column: str = "filename",
                    key_column: str = "", image_root: Optional[str] = None, progress: bool = True,
                    dry_run: bool = False, label_map: Optional[Dict[str, str]] = None,
                    label_extra: Sequence[str] = ()) -> dict:
    model, cfg, ckpt = load_run_model(run)
    attrs = list(attributes) or model.attributes
    unknown = [a for a in attrs if a not in model.heads]
    if unknown:
        raise ConfigError(f"--attributes: the run has no head for {unknown} (it has {', '.join(model.attributes)})")
    if sum(x is not None for x in (images, csv_path, shards)) != 1:
        raise ConfigError("give exactly one of --images DIR, --csv FILE, --shards DIR")
    resize = int(round(cfg.data.image_size * cfg.data.resize_ratio))
    transform = eval_transform(cfg.data.image_size, resize)
    if shards:
        manifest = Manifest.load(shards)
        dataset = _ShardItems(manifest, splits, transform)
        total = sum(manifest.count(s) for s in splits)
        source = {"shards": str(Path(shards).resolve()), "splits": list(splits)}
        label_names = [a["name"] for a in manifest.data["attributes"]]   # every one, headed or not: filters
    else:
        rows = rows_from_images(images) if images else rows_from_csv(csv_path, image_column, key_column, image_root,
                                                                       attrs, label_map, label_extra)
        dataset, total = _Items(rows, transform), len(rows)
        label_names = list(dict.fromkeys(k for r in rows[:1] for k in r["labels"])) or list(attrs)
        source = {"images": str(Path(images).resolve())} if images else {"csv": str(Path(csv_path).resolve())}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    if dry_run:
        return _estimate(model, loader, attrs, device, total, batch, source)
    started = time.time()
    result = _embed(model, loader, attrs, label_names, device,
                    tqdm(total=total, unit="img", desc="embedding", disable=not progress))
    seconds = time.time() - started
    keys, bad = result["keys"], result["bad"]
    if not keys:   # an empty embedding set would become an index that no search can use
        first = f"; first: {bad[0]['location']}: {bad[0]['error']}" if bad else ""
        raise BadInputError(f"no image could be embedded from {next(iter(source.values()))}: {total} found, "
                            f"{len(bad)} unreadable{first}"
                            f" ({out} left as it was)")
    meta = {"format": "mclfir-embeddings/1", "run": str(run), "checkpoint": str(ckpt), "trunk": cfg.model.trunk,
            "image_size": cfg.data.image_size, "resize": resize, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "attributes": attrs,
            "model_hash": {a: model_identity(model, a) for a in attrs}, "embed_dim": cfg.model.embed_dim, "count": len(keys),
            "source": source, "device": str(device), "seconds": round(seconds, 3),
            "images_per_second": round(len(keys) / max(seconds, 1e-9), 1),
            "unreadable": {"count": len(bad), "items": bad}}
    write_embeddings(Path(out), result, meta, cfg.model.embed_dim)
    log.info("embedded %d images (%d unreadable) under %s in %.1f s (%.1f images/s) -> %s", len(keys), len(bad),
             ", ".join(attrs), seconds, meta["images_per_second"], out)
    return meta


def _estimate(model, loader, attrs: Sequence[str], device: torch.device, total: int, batch: int, source: dict) -> dict:
    """--dry-run: embed a sample (at most 4 batches; the first is a warm-up, not timed), write nothing, and
    say what the whole catalogue would cost at the measured rate."""
    import itertools
    batches = iter(loader)
    with torch.no_grad():
        first = next(batches, None)
        if first is not None and first["images"] is not None:
            model.embed_all(first["images"].to(device), attrs)
        started, n = time.time(), 0
        for b in itertools.islice(batches, 3):
            if b["images"] is not None:
                model.embed_all(b["images"].to(device), attrs)
                n += len(b["good"])
    seconds = time.time() - started
    if n == 0:   # a catalogue of one batch: time that one
        n, seconds = (len(first["good"]) if first else 0), seconds
    rate = n / max(seconds, 1e-9) if n else 0.0
    plan = {"dry_run": True, "images": total, "attributes": list(attrs), "measured_images": n,
            "images_per_second": round(rate, 1), "device": str(device),
            "estimated_seconds": round(total / rate, 1) if rate else None, "source": source}
    log.info("dry run: %d images under %s; measured %.1f images/s on %d images (%s): about %s s for all; "
             "nothing written", total, ", ".join(attrs), rate, n, device,
             plan["estimated_seconds"] if rate else "?")
    return plan


@torch.no_grad()
def _embed(model, loader, attrs: Sequence[str], label_names: Sequence[str], device: torch.device, bar) -> dict:
    """Every readable image's embedding under each head, with its key, location and labels (every label column
    of the source, headed or not); unreadable images are listed, never fatal."""
    keys, locations, bad = [], [], []
    labels: Dict[str, List[Optional[str]]] = {a: [] for a in label_names}
    chunks: Dict[str, List[np.ndarray]] = {a: [] for a in attrs}
    for b in loader:
        bad += [{"key": x["key"], "location": x["location"], "error": x["error"]} for x in b["bad"]]
        for x in b["bad"]:
            log.warning("unreadable image '%s' (%s): %s", x["key"], x["location"], x["error"])
        if b["images"] is not None:
            emb, _ = model.embed_all(b["images"].to(device, non_blocking=True), attrs)
            for h, a in enumerate(attrs):
                chunks[a].append(emb[:, h].float().cpu().numpy())
            for x in b["good"]:
                keys.append(x["key"])
                locations.append(x["location"])
                for a in label_names:
                    labels[a].append(x["labels"].get(a))
        bar.update(len(b["good"]) + len(b["bad"]))
    bar.close()
    return {"keys": keys, "locations": locations, "bad": bad, "labels": labels, "chunks": chunks}

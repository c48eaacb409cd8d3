"""Shard builder: synthetic generator or CSV -> WebDataset tars + DALI index files + manifest.

Each sample is `<key>.jpg` (JPEG bytes), `<key>.lbl` (int32 label vector over the dataset's
attributes, -1 = unlabelled) and `<key>.sid` (int64 position in its split, so DALI, which does not
hand over keys, can name samples), so both loaders get dense tensors without parsing anything.
Output is deterministic: same input and settings, byte-identical tars.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from ..config import ShardBuildConfig
from ..errors import BadInputError
from ..utils.io import atomic_write, atomic_write_json, atomic_write_text, ensure_writable_dir
from . import synthetic
from ..utils.names import check_key
from .manifest import FORMAT, IMAGE_EXT, LABEL_EXT, MANIFEST_NAME, SID_EXT, SPLITS, Manifest, ShardError

log = logging.getLogger(__name__)

SHARD_FILE = re.compile(r"(train|val|test)-\d{5}\.(tar|idx)")   # the names _write_split gives
TEMP_SHARD_FILE = re.compile(r"\.(train|val|test)-\d{5}\.(tar|idx)(\.\w+)?\.tmp")   # atomic_write's temp files



@dataclass
class RawSample:
    key: str
    jpeg: bytes
    values: Dict[str, str]   # attribute -> value name ('' = unlabelled)


def _check_jpeg(data: bytes, where: str, max_pixels: int = 0) -> Tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size   # from the header: nothing decoded yet
            if max_pixels and w * h > max_pixels:
                raise BadInputError(f"{where}: image is {w}x{h} = {w * h:,} pixels, over the limit "
                                    f"data.build.max_image_pixels={max_pixels:,}")
            im.load()  # full decode: truncated files fail here, not in training
            return im.size
    except Image.DecompressionBombError as e:   # PIL's own limit, before ours could read the size
        raise BadInputError(f"{where}: image is over the pixel limit ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(f"{where}: image cannot be decoded ({e})") from None


EXIF_ORIENTATION = 0x0112


def _to_jpeg(data: bytes, resize_to: int) -> bytes:
    from PIL import ImageOps
    with Image.open(io.BytesIO(data)) as im:
        upright = im.getexif().get(EXIF_ORIENTATION, 1) in (0, 1)
        if im.format == "JPEG" and resize_to <= 0 and im.mode == "RGB" and upright:
            return data
        # a phone photo stored sideways with an Orientation tag: turned upright here, so every loader (torch,
        # DALI) trains on what a viewer shows; queries and catalogue images are turned the same way (decode_any)
        im = ImageOps.exif_transpose(im).convert("RGB")
        if resize_to > 0 and min(im.size) != resize_to:
            w, h = im.size
            r = resize_to / min(w, h)
            im = im.resize((max(1, round(w * r)), max(1, round(h * r))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=92)
        return buf.getvalue()


def read_csv_samples(csv_path: str | Path, image_root: str | Path, attributes: Sequence[str],
                     image_column: str = "filename", key_column: str = "", skip_bad_rows: bool = False,
                     resize_to: int = 0, max_pixels: int = 0) -> Tuple[List[RawSample], List[dict]]:
    """Read and validate every row. Returns (samples, skipped) where skipped lists {row, file, reason}."""
    csv_path, image_root = Path(csv_path), Path(image_root)
    if not attributes:
        raise BadInputError("no attribute columns named (pass --attributes col1,col2,...)")
    used = [image_column, *attributes] + ([key_column] if key_column else [])
    rows = _read_rows(csv_path, used)
    samples: List[RawSample] = []
    skipped: List[dict] = []
    seen: Dict[str, int] = {}
    for i, (n, row) in enumerate(rows, start=1):
        try:
            sample = _row_sample(row, f"{csv_path}:{n}", used, image_root, image_column, key_column, attributes,
                                 resize_to, seen, max_pixels)
        except BadInputError as e:
            if not skip_bad_rows:
                raise
            skipped.append({"row": n, "file": _printable(row.get(image_column)), "reason": str(e)})
            continue
        seen[sample.key] = n
        samples.append(sample)
        if i % 1000 == 0:
            log.info("read %d/%d rows of %s (%d skipped)", i, len(rows), csv_path.name, len(skipped))
    return samples, skipped


def _read_rows(csv_path: Path, used: Sequence[str]) -> List[Tuple[int, dict]]:
    """(line number, row) of every row, after checking the file, its encoding and the columns used."""
    if not csv_path.is_file():
        raise BadInputError(f"CSV not found: {csv_path}")
    # UTF-8 explicitly; undecodable bytes become lone surrogates so the row (not the file) is blamed
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise BadInputError(f"{csv_path}:{reader.line_num}: not valid CSV ({e})") from None
    if any(_undecodable(h) for h in header):
        raise BadInputError(f"{csv_path}:1: the header is not valid UTF-8")
    for col in used:
        if col not in header:
            raise BadInputError(f"{csv_path}: unknown column '{col}' (columns: {', '.join(header)})")
    unused_bad = [n for n, row in rows if any(_undecodable(v) for c, v in row.items() if c not in used)]
    if unused_bad:
        log.warning("%s: %d rows have bytes that are not UTF-8 in columns that are not used (kept), first at line %d",
                    csv_path, len(unused_bad), unused_bad[0])
    return rows


def _row_sample(row: dict, where: str, used: Sequence[str], image_root: Path, image_column: str, key_column: str,
                attributes: Sequence[str], resize_to: int, seen: Dict[str, int], max_pixels: int = 0) -> RawSample:
    """One CSV row as a sample; a BadInputError names the row and what is wrong with it."""
    bad = [c for c in used if _undecodable(row.get(c))]
    if bad:
        raise BadInputError(f"{where}: column '{bad[0]}' is not valid UTF-8")
    rel = (row.get(image_column) or "").strip()
    if not rel:
        raise BadInputError(f"{where}: empty '{image_column}'")
    path = image_root / rel
    key = (row[key_column].strip() if key_column else Path(rel).with_suffix("").as_posix())
    key = re.sub(r"[\s/\\.\x00-\x1f\x7f]", "_", key)   # a key is a tar member's stem and one line of an index
    if not key:
        raise BadInputError(f"{where}: empty key")
    check_key(key, where, BadInputError)
    if key in seen:
        raise BadInputError(f"{where}: duplicate key '{key}' (first at row {seen[key]})")
    empty = [a for a in attributes if not (row.get(a) or "").strip()]
    if empty:
        raise BadInputError(f"{where}: empty value for attribute '{empty[0]}'")
    if not path.is_file():
        raise BadInputError(f"{where}: image file not found: {path}")
    data = path.read_bytes()
    _check_jpeg(data, f"{where} ({path})", max_pixels)
    return RawSample(key, _to_jpeg(data, resize_to), {a: row[a].strip() for a in attributes})


def _undecodable(text) -> bool:
    return isinstance(text, str) and any("\udc80" <= ch <= "\udcff" for ch in text)


def _printable(text) -> str:
    return (text or "").encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def synthetic_samples(num_images: int, image_size: int, seed: int) -> List[RawSample]:
    return [RawSample(k, b, v) for k, b, v in synthetic.generate(num_images, image_size, seed)]


def _vocabularies(samples: Sequence[RawSample], attributes: Sequence[str], min_count: int):
    vocab, dropped = {}, {}
    for a in attributes:
        counts = Counter(s.values.get(a, "") for s in samples)
        counts.pop("", None)
        vocab[a] = sorted(v for v, c in counts.items() if c >= min_count)
        dropped[a] = {v: c for v, c in sorted(counts.items()) if c < min_count}
        if not vocab[a]:
            raise BadInputError(f"attribute '{a}': no value has at least {min_count} images "
                                f"(counts: {dict(counts)}); lower min_value_count or drop the attribute")
    return vocab, dropped


def duplicate_groups(keys: Sequence[str], content: Dict[str, bytes]) -> List[List[str]]:
    """Keys grouped by byte-identical image content, in order of first appearance."""
    groups: Dict[str, List[str]] = {}
    for k in keys:
        groups.setdefault(hashlib.sha1(content[k]).hexdigest(), []).append(k)
    return list(groups.values())


def deduplicate(groups: Sequence[Sequence[str]], labels: Dict[str, np.ndarray]
                ) -> Tuple[List[List[str]], Dict[str, list]]:
    """Byte-identical copies: keep the first of a group whose labels agree, drop a group whose labels
    conflict (one photo cannot be both White and Blue). Returns (groups left, what was removed)."""
    kept: List[List[str]] = []
    removed: Dict[str, list] = {"copies_removed": [], "conflicting_labels": []}
    for group in groups:
        if len(group) == 1:
            kept.append(list(group))
        elif all(np.array_equal(labels[k], labels[group[0]]) for k in group[1:]):
            kept.append([group[0]])
            removed["copies_removed"].append({"kept": group[0], "removed": list(group[1:])})
        else:
            removed["conflicting_labels"].append(list(group))
    if removed["copies_removed"] or removed["conflicting_labels"]:
        log.info("deduplicated: %d identical copies removed, %d groups with conflicting labels dropped (%d images; "
                 "listed in the manifest)", sum(len(r["removed"]) for r in removed["copies_removed"]),
                 len(removed["conflicting_labels"]), sum(len(g) for g in removed["conflicting_labels"]))
    return kept, removed


def _split_keys(groups: Sequence[Sequence[str]], val_fraction: float, test_fraction: float, seed: int
                ) -> Dict[str, List[str]]:
    """Whole groups of byte-identical images go to one split, so no photo is in two splits
    (a copy in train and another in test would leak; two copies as query and candidate would be trivial).
    With no duplicates this is a plain seeded permutation of the keys."""
    n = sum(len(g) for g in groups)
    order = np.random.default_rng(seed).permutation(len(groups))
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    out: Dict[str, List[str]] = {"test": [], "val": [], "train": []}
    for i in order:
        split = "test" if len(out["test"]) < n_test else "val" if len(out["val"]) < n_val else "train"
        out[split] += list(groups[i])
    return out


def check_splits(splits: Dict[str, Sequence[str]], eval_sets: Dict[str, Dict[str, Dict[str, List[str]]]],
                 content: Dict[str, bytes], strict: bool = True) -> List[List[str]]:
    """No key in two splits, query and candidate sets disjoint, and no byte-identical image in two splits
    (an error when `strict`; a published split is kept as it is and its cross-split copies are returned)."""
    owner: Dict[str, str] = {}
    for split, keys in splits.items():
        for k in keys:
            if k in owner and owner[k] != split:
                raise BadInputError(f"sample '{k}' is in both the {owner[k]} and the {split} split")
            owner[k] = split
    crossing = []
    for group in duplicate_groups([k for k in owner if k in content], content):
        where = {owner[k] for k in group}
        if len(where) > 1 and not strict:
            crossing.append(group)
        elif len(where) > 1:
            raise BadInputError(f"byte-identical images {', '.join(group[:4])} are in different splits "
                                f"({', '.join(sorted(where))}): the same photo would be trained on and evaluated")
    for split, per_attribute in eval_sets.items():
        for attribute, sets in per_attribute.items():
            both = set(sets["query"]) & set(sets["candidate"])
            if both:
                raise BadInputError(f"{split} split, attribute '{attribute}': {len(both)} images are both query and "
                                    f"candidate, e.g. '{sorted(both)[0]}'")
    return crossing


def _query_candidate(keys: Sequence[str], labels: Dict[str, np.ndarray], a_idx: int, query_fraction: float,
                     rng: np.random.Generator) -> Dict[str, List[str]]:
    """Per value, a stratified disjoint query/candidate split (every value with >= 2 images gets both)."""
    by_value: Dict[int, List[str]] = {}
    for k in keys:
        v = int(labels[k][a_idx])
        if v >= 0:
            by_value.setdefault(v, []).append(k)
    query, cand = [], []
    for v in sorted(by_value):
        ks = by_value[v]
        perm = rng.permutation(len(ks))
        n_q = 0 if len(ks) < 2 else min(len(ks) - 1, max(1, int(round(len(ks) * query_fraction))))
        query += [ks[i] for i in perm[:n_q]]
        cand += [ks[i] for i in perm[n_q:]]
    return {"query": sorted(query), "candidate": sorted(cand)}


def write_index(tar_path: Path, idx_path: Path) -> int:
    """DALI wds2idx v1.2 index: one line per sample, `ext offset size name` per component."""
    groups: List[List[tuple]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf.getmembers():
            if not m.isreg():
                continue
            if "." not in m.name:
                raise ShardError(f"{tar_path}: member {m.name!r} has no extension (not a webdataset sample file)")
            base, ext = m.name.split(".", 1)
            check_key(base, f"{tar_path}: member {m.name!r}", ShardError)   # one line of the index per sample
            if any(c.isspace() for c in ext):
                raise ShardError(f"{tar_path}: member {m.name!r}: whitespace in the extension")
            if base != last:
                groups.append([])
                last = base
            groups[-1].append((ext, m.offset_data, m.size, m.name))
    lines = [f"v1.2 {len(groups)}"] + [" ".join(" ".join(map(str, c)) for c in g) for g in groups]
    atomic_write_text(idx_path, "\n".join(lines) + "\n")
    return len(groups)


def _write_split(out: Path, split: str, keys: Sequence[str], by_key: Dict[str, RawSample],
                 labels: Dict[str, np.ndarray], per_shard: int) -> List[dict]:
    shards = []
    for s, start in enumerate(range(0, len(keys), per_shard)):
        chunk = keys[start:start + per_shard]
        name = f"{split}-{s:05d}"

        def write(f, chunk=chunk, start=start):
            writer = wds.TarWriter(f, encoder=False, mtime=0, user="mclfir", group="mclfir")
            try:
                for i, k in enumerate(chunk, start=start):
                    writer.write({"__key__": k, IMAGE_EXT: by_key[k].jpeg, LABEL_EXT: labels[k].astype("<i4").tobytes(),
                                  SID_EXT: np.int64(i).astype("<i8").tobytes()})
                writer.close()
            except BaseException:
                with contextlib.suppress(Exception):   # mark the tar stream closed, or its __del__ writes again
                    writer.tarstream.close()
                raise
        atomic_write(out / f"{name}.tar", write)   # a full disk: OutputError, and no temp file left
        write_index(out / f"{name}.tar", out / f"{name}.idx")
        shards.append({"file": f"{name}.tar", "index": f"{name}.idx", "count": len(chunk),
                       "bytes": (out / f"{name}.tar").stat().st_size})
    return shards


def build_shards(samples: Sequence[RawSample], attributes: Sequence[str], out: str | Path, cfg: ShardBuildConfig,
                 source: dict, skipped: Sequence[dict] = (), splits: Optional[Dict[str, List[str]]] = None,
                 eval_sets: Optional[Dict[str, Dict[str, Dict[str, List[str]]]]] = None,
                 vocab: Optional[Dict[str, List[str]]] = None) -> Manifest:
    """Split, label and write `samples`; returns the manifest. Overwrites an existing shard set.

    `splits`, `eval_sets` and `vocab` let a converter keep a published protocol (e.g. ASEN's
    query/candidate files) instead of drawing its own."""
    out = Path(out)
    if not samples:
        raise BadInputError("no usable samples to write")
    if vocab is None:
        vocab, dropped = _vocabularies(samples, attributes, cfg.min_value_count)
    else:
        dropped = {a: {} for a in attributes}
    labels = _label_vectors(samples, attributes, vocab)
    keys = sorted(k for k, v in labels.items() if (v >= 0).any())
    content = {s.key: s.jpeg for s in samples}
    groups = duplicate_groups(keys, content)
    published = splits is not None
    dedup = {"copies_removed": [], "conflicting_labels": []}
    if splits is None:
        if cfg.deduplicate:
            groups, dedup = deduplicate(groups, labels)
        splits = _split_keys(groups, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    if eval_sets is None:
        rng = np.random.default_rng(cfg.seed + 1)
        eval_sets = {sp: {a: _query_candidate(splits[sp], labels, i, cfg.query_fraction, rng)
                          for i, a in enumerate(attributes)} for sp in ("val", "test")}
    crossing = check_splits(splits, eval_sets, content, strict=not published)
    if crossing:
        log.warning("the published split puts %d groups of byte-identical images in more than one split "
                    "(kept as published; counted in the manifest), e.g. %s", len(crossing), crossing[0][:3])
    split_info = _write_splits(out, samples, attributes, vocab, labels, splits, cfg.samples_per_shard)
    manifest = {
        "format": FORMAT, "source": source,
        "attributes": [{"name": a, "values": vocab[a], "dropped_values": dropped[a]} for a in attributes],
        "label_dtype": "int32", "image_ext": IMAGE_EXT, "label_ext": LABEL_EXT,
        "splits": split_info, "eval_sets": eval_sets,
        "build": {"min_value_count": cfg.min_value_count, "val_fraction": cfg.val_fraction,
                  "test_fraction": cfg.test_fraction, "query_fraction": cfg.query_fraction,
                  "samples_per_shard": cfg.samples_per_shard, "seed": cfg.seed},
        "skipped_rows": list(skipped),
        "unlabelled_images_dropped": len(labels) - len(keys),
        "duplicate_groups": {"groups": sum(len(g) > 1 for g in groups),
                             "images": sum(len(g) for g in groups if len(g) > 1),
                             "across_splits": len(crossing)},
        "deduplicated": {"copies_removed": sum(len(r["removed"]) for r in dedup["copies_removed"]),
                         "kept_and_removed": dedup["copies_removed"],
                         "conflicting_groups_dropped": dedup["conflicting_labels"]},
    }
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return Manifest(out, manifest)


def _label_vectors(samples: Sequence[RawSample], attributes: Sequence[str], vocab: Dict[str, List[str]]
                   ) -> Dict[str, np.ndarray]:
    """key -> the value index of each attribute (-1: not labelled, or a dropped value)."""
    labels: Dict[str, np.ndarray] = {}
    for s in samples:
        vec = np.full(len(attributes), -1, dtype=np.int32)
        for i, a in enumerate(attributes):
            v = s.values.get(a, "")
            if v in vocab[a]:
                vec[i] = vocab[a].index(v)
        labels[s.key] = vec
    return labels


def _write_splits(out: Path, samples: Sequence[RawSample], attributes: Sequence[str], vocab: Dict[str, List[str]],
                  labels: Dict[str, np.ndarray], splits: Dict[str, List[str]], per_shard: int) -> Dict[str, dict]:
    """Every split's shards and index files; the manifest's `splits` entry. The old manifest goes first: the
    set is incomplete until the new one lands."""
    if out.exists():
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for p in out.iterdir():   # this tool's shards only (an interrupted build's too); other files stay
            if SHARD_FILE.fullmatch(p.name) or TEMP_SHARD_FILE.fullmatch(p.name):
                p.unlink()
    ensure_writable_dir(out)
    by_key = {s.key: s for s in samples}
    split_info = {}
    for sp in SPLITS:
        log.info("writing %s split: %d samples", sp, len(splits[sp]))
        shards = _write_split(out, sp, splits[sp], by_key, labels, per_shard)
        counts = {a: {vocab[a][v]: int(c) for v, c in sorted(Counter(int(labels[k][i]) for k in splits[sp]).items())
                      if v >= 0}
                  for i, a in enumerate(attributes)}
        split_info[sp] = {"count": len(splits[sp]), "shards": shards, "value_counts": counts, "keys": list(splits[sp])}
    return split_info


def build_from_config(cfg: ShardBuildConfig, out: str | Path) -> Manifest:
    """Build a shard set as `cfg` says (synthetic generator or CSV)."""
    if cfg.source == "synthetic":
        sc = cfg.synthetic
        log.info("rendering %d synthetic garments at %dpx (seed %d)", sc.num_images, sc.image_size, sc.seed)
        samples = synthetic_samples(sc.num_images, sc.image_size, sc.seed)
        return build_shards(samples, list(synthetic.ATTRIBUTES), out, cfg,
                            source={"type": "synthetic", "num_images": sc.num_images, "image_size": sc.image_size,
                                    "seed": sc.seed})
    c = cfg.csv
    log.info("reading %s", c.csv)
    samples, skipped = read_csv_samples(c.csv, c.image_root, c.attributes, c.image_column, c.key_column,
                                        c.skip_bad_rows, cfg.resize_to, cfg.max_image_pixels)
    if skipped:
        log.warning("skipped %d bad rows (listed in the manifest), first: %s", len(skipped), skipped[0]["reason"])
    return build_shards(samples, list(c.attributes), out, cfg, skipped=skipped,
                        source={"type": "csv", "csv": str(c.csv), "image_root": str(c.image_root),
                                "attributes": list(c.attributes), "skipped": len(skipped)})


def ensure_shards(shards_dir: str | Path, cfg: ShardBuildConfig) -> Manifest:
    """Load the manifest, building the shard set first if it does not exist yet."""
    from . import remote
    if remote.is_url(shards_dir):   # never built here: a URL is not a folder (it once became ./http:/host/...)
        return Manifest.load(shards_dir)
    shards_dir = Path(shards_dir)
    if (shards_dir / MANIFEST_NAME).is_file():
        return Manifest.load(shards_dir)
    if cfg.source == "none":
        raise ShardError(f"no shards in {shards_dir} (data.build.source=none): build or convert them first, "
                         f"e.g. `mclfir shards convert fashionai --root ... --out {shards_dir}`")
    log.info("no shards in %s: building them", shards_dir)
    return build_from_config(cfg, shards_dir)


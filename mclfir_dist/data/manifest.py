"""The shard set's manifest: attributes, vocabularies, splits, eval query/candidate sets, files.

The manifest is written last and atomically, so its presence means the shard set is complete.
"""
from __future__ import annotations

import functools
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from ..errors import ShardError
from ..utils.jsonfile import expect
from ..utils.names import check_attribute, check_file_name, check_key

FORMAT = "mclfir-shards/2"
MANIFEST_NAME = "manifest.json"
LABEL_EXT = "lbl"      # raw little-endian int32 vector, one entry per attribute, -1 = unlabelled
IMAGE_EXT = "jpg"
SID_EXT = "sid"        # raw little-endian int64: the sample's position in its split (manifest keys list)
SPLITS = ("train", "val", "test")



def shard_problem(path: Path, entry: dict) -> str:
    """Why a shard does not match its manifest entry ('' if it does): missing, size, sample count."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        return f"{size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
    try:
        with tarfile.open(path, "r:") as tf:
            names = {m.name.split(".", 1)[0] for m in tf.getmembers() if m.isreg()}
    except (tarfile.TarError, EOFError, OSError) as e:
        return f"not a readable tar ({type(e).__name__}: {e})"
    if len(names) != int(entry["count"]):
        return f"{len(names)} samples, the manifest says {entry['count']}"
    return ""


@functools.lru_cache(maxsize=256)
def _manifest_info(root: str, mtime_ns: int) -> Tuple[Dict[str, dict], Dict[str, int]]:
    data = Manifest.load(root).data
    files = {s["file"]: s for split in data["splits"].values() for s in split["shards"]}
    return files, {a["name"]: len(a["values"]) for a in data["attributes"]}


def _beside_manifest(shard: Path) -> Optional[Tuple[Dict[str, dict], Dict[str, int]]]:
    try:
        return _manifest_info(str(shard.parent), (shard.parent / MANIFEST_NAME).stat().st_mtime_ns)
    except OSError:
        return None


def manifest_entry(shard: Path) -> Optional[dict]:
    """The manifest's record of a shard file (count, bytes), if the shard sits beside a manifest."""
    info = _beside_manifest(shard)
    return None if info is None else info[0].get(shard.name)


def label_problem(raw: bytes, shard: Path) -> str:
    """Why a sample's .lbl cannot be used ('' if it can): its length, or a value outside the vocabulary of
    the manifest beside the shard (-1 = unlabelled is the only value below 0)."""
    if len(raw) % 4:
        return f".{LABEL_EXT} is {len(raw)} bytes, not a whole number of int32 labels"
    labels = np.frombuffer(raw, dtype="<i4")
    info = _beside_manifest(shard)
    if info is None:
        return "" if (labels >= -1).all() else f"label value {int(labels.min())} (only -1 = unlabelled is below 0)"
    sizes = list(info[1].items())
    if len(labels) != len(sizes):
        return f".{LABEL_EXT} holds {len(labels)} labels, the manifest has {len(sizes)} attributes"
    for (name, size), value in zip(sizes, labels.tolist()):
        if not -1 <= value < size:
            return (f"label value {value} for attribute '{name}' is outside its vocabulary (0..{size - 1}, "
                    f"or -1 = unlabelled)")
    return ""


def _expect(value, kind, what: str, path: Path):
    return expect(value, kind, what, path, ShardError)


def check_structure(data: dict, path: Path) -> None:
    """Every field a reader uses, with its type; every name from the file checked (names.py), so a crafted
    manifest can neither crash a reader nor point it outside the shard folder."""
    attributes = _expect(data.get("attributes"), list, "attributes", path)
    for i, a in enumerate(attributes):
        _expect(a, dict, f"attributes[{i}]", path)
        check_attribute(a.get("name"), f"{path}: attributes[{i}].name", ShardError)
        for v in _expect(a.get("values"), list, f"attributes[{i}].values", path):
            _expect(v, str, f"attributes[{i}].values[]", path)
    names = [a["name"] for a in attributes]
    if len(set(names)) != len(names):
        raise ShardError(f"{path}: an attribute is listed twice ({', '.join(names)})")
    splits = _expect(data.get("splits"), dict, "splits", path)
    for split, body in splits.items():
        if split not in SPLITS:
            raise ShardError(f"{path}: unknown split {split!r} (splits are {', '.join(SPLITS)})")
        _expect(body, dict, f"splits.{split}", path)
        _expect(body.get("count"), int, f"splits.{split}.count", path)
        for j, shard in enumerate(_expect(body.get("shards"), list, f"splits.{split}.shards", path)):
            where = f"splits.{split}.shards[{j}]"
            _expect(shard, dict, where, path)
            for field_name in ("file", "index"):
                check_file_name(shard.get(field_name), f"{path}: {where}.{field_name}", ShardError)
            count = _expect(shard.get("count"), int, f"{where}.count", path)
            if count < 0 or "bytes" in shard and _expect(shard["bytes"], int, f"{where}.bytes", path) < 0:
                raise ShardError(f"{path}: {where}: a negative count or size")
        for key in _expect(body.get("keys"), list, f"splits.{split}.keys", path):
            check_key(key, f"{path}: splits.{split}.keys", ShardError)
    for split, per_attribute in _expect(data.get("eval_sets"), dict, "eval_sets", path).items():
        for attribute, sets in _expect(per_attribute, dict, f"eval_sets.{split}", path).items():
            _expect(sets, dict, f"eval_sets.{split}.{attribute}", path)
            for role in ("query", "candidate"):
                _expect(sets.get(role), list, f"eval_sets.{split}.{attribute}.{role}", path)


@dataclass
class Manifest:
    root: Path
    data: dict
    excluded: Set[str] = field(default_factory=set)
    query_draw: int = 0   # eval.query_draw: 0 = the draw stored in eval_sets; N > 0 = redrawn with seed N
    remote: str = ""      # the URL of a remote set (data/remote.py): root is then its verified local cache
    fetched: Set[str] = field(default_factory=set)

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        from . import remote
        if remote.is_url(root):   # the manifest from the URL; shards are fetched into the cache as they are needed
            manifest = cls.load(remote.fetch_manifest(str(root)))
            manifest.remote = remote.check_url(str(root))
            return manifest
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise ShardError(f"no {MANIFEST_NAME} in {root}: build shards with `mclfir shards build --out {root}`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            fmt = data.get("format") if isinstance(data, dict) else f"none (a JSON {type(data).__name__})"
            raise ShardError(f"{path}: shard format {fmt!r}, this version reads {FORMAT!r}: "
                             f"rebuild with `mclfir shards build --out {root} ...` (or delete {root} and let "
                             "`mclfir train` build it)")
        check_structure(data, path)
        return cls(root, data)

    @property
    def attributes(self) -> List[str]:
        return [a["name"] for a in self.data["attributes"]]

    def values(self, attribute: str) -> List[str]:
        return self.data["attributes"][self.attribute_index(attribute)]["values"]

    def attribute_index(self, attribute: str) -> int:
        names = self.attributes
        if attribute not in names:
            raise ShardError(f"attribute '{attribute}' is not in {self.root / MANIFEST_NAME} (has: {', '.join(names)})")
        return names.index(attribute)

    def _shards(self, split: str) -> List[dict]:
        return [s for s in self.data["splits"][split]["shards"] if s["file"] not in self.excluded]

    def fetch(self, split: str) -> None:
        """A remote set: every shard and index file of `split` in the local cache (kept ones are not fetched)."""
        if not self.remote or split in self.fetched:
            return
        from . import remote
        for s in self.data["splits"][split]["shards"]:
            remote.fetch_file(self.remote, s["file"], s.get("bytes"))
            if s.get("index"):
                remote.fetch_file(self.remote, s["index"], None)
        self.fetched.add(split)

    def shard_files(self, split: str) -> List[Path]:
        self.fetch(split)
        return [self.root / s["file"] for s in self._shards(split)]

    def index_files(self, split: str) -> List[Path]:
        self.fetch(split)
        return [self.root / s["index"] for s in self._shards(split)]

    def shard_counts(self, split: str) -> List[int]:
        return [int(s["count"]) for s in self._shards(split)]

    def verify(self, split: str) -> List[Tuple[str, str]]:
        """(shard file, problem) for every shard of `split` whose size or sample count is not the manifest's.
        Reads tar headers only (no image data)."""
        self.fetch(split)
        problems = []
        for s in self.data["splits"][split]["shards"]:
            path = self.root / s["file"]
            problem = shard_problem(path, s)
            if problem:
                problems.append((s["file"], problem))
        return problems

    def exclude(self, files: List[str]) -> None:
        """Leave these shard files out of every reader (data.skip_bad_shards)."""
        self.excluded = set(self.excluded) | set(files)

    def keys(self, split: str) -> List[str]:
        """Keys of a split in shard order; `keys(split)[sid]` names the sample with that sid."""
        return self.data["splits"][split]["keys"]

    def count(self, split: str) -> int:
        return int(self.data["splits"][split]["count"])

    def eval_set(self, split: str, attribute: str) -> Dict[str, List[str]]:
        """{'query': [keys], 'candidate': [keys]} for one attribute of val or test."""
        try:
            return self.data["eval_sets"][split][attribute]
        except KeyError:
            raise ShardError(f"no {split} query/candidate set for attribute '{attribute}' in {self.root}") from None

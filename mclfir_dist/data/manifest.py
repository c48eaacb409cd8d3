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

from ..errors import ShardError

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
def _manifest_entries(root: str, mtime_ns: int) -> Dict[str, dict]:
    data = json.loads((Path(root) / MANIFEST_NAME).read_text())
    return {s["file"]: s for split in data["splits"].values() for s in split["shards"]}


def manifest_entry(shard: Path) -> Optional[dict]:
    """The manifest's record of a shard file (count, bytes), if the shard sits beside a manifest."""
    path = shard.parent / MANIFEST_NAME
    try:
        return _manifest_entries(str(shard.parent), path.stat().st_mtime_ns).get(shard.name)
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class Manifest:
    root: Path
    data: dict
    excluded: Set[str] = field(default_factory=set)

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise ShardError(f"no {MANIFEST_NAME} in {root}: build shards with `mclfir shards build --out {root}`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{path} is not valid JSON: {e}") from None
        if data.get("format") != FORMAT:
            raise ShardError(f"{path}: shard format {data.get('format')!r}, this version reads {FORMAT!r}: "
                             f"rebuild with `mclfir shards build --out {root} ...` (or delete {root} and let "
                             "`mclfir train` build it)")
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

    def shard_files(self, split: str) -> List[Path]:
        return [self.root / s["file"] for s in self._shards(split)]

    def index_files(self, split: str) -> List[Path]:
        return [self.root / s["index"] for s in self._shards(split)]

    def shard_counts(self, split: str) -> List[int]:
        return [int(s["count"]) for s in self._shards(split)]

    def verify(self, split: str) -> List[Tuple[str, str]]:
        """(shard file, problem) for every shard of `split` whose size or sample count is not the manifest's.
        Reads tar headers only (no image data)."""
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

"""The shard set's manifest: attributes, vocabularies, splits, eval query/candidate sets, files.

The manifest is written last and atomically, so its presence means the shard set is complete.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

FORMAT = "mclfir-shards/2"
MANIFEST_NAME = "manifest.json"
LABEL_EXT = "lbl"      # raw little-endian int32 vector, one entry per attribute, -1 = unlabelled
IMAGE_EXT = "jpg"
SID_EXT = "sid"        # raw little-endian int64: the sample's position in its split (manifest keys list)
SPLITS = ("train", "val", "test")


class ShardError(RuntimeError):
    """A shard set is missing, incomplete or corrupt; the message names the file."""


@dataclass
class Manifest:
    root: Path
    data: dict

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
                             f"rebuild with `mclfir shards build --out {root} ...` (or delete {root} and let `mclfir train` build it)")
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

    def shard_files(self, split: str) -> List[Path]:
        return [self.root / s["file"] for s in self.data["splits"][split]["shards"]]

    def index_files(self, split: str) -> List[Path]:
        return [self.root / s["index"] for s in self.data["splits"][split]["shards"]]

    def shard_counts(self, split: str) -> List[int]:
        return [int(s["count"]) for s in self.data["splits"][split]["shards"]]

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

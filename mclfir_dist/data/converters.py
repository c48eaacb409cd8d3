"""Converters from the paper datasets' published split formats into our shards.

ASEN family (FashionAI, DARN, DeepFashion), as released with ASEN / MCL-FIR:
  meta.json                              attribute names (and optionally value names)
  filenames_{train,valid,test}.txt       relative image paths; line i is image i of that split
  label_train.txt                        `img_idx attr value attr value ...` per training image
  query_{valid,test}.txt                 `img_idx attr value` (img_idx into filenames_{valid,test})
  candidate_{valid,test}.txt             `img_idx attr value`
Attributes and values are integer indices. The query/candidate sets are kept exactly as published.

Zappos50k with the split of Conditional Similarity Networks (CSN):
  filenames.json                         list of image paths (index = image id)
  {cond}_tripletlist_{train,val,test}.txt  `a b c`: a is more similar to c than to b under cond
CSN gives triplets, not values: for each condition, images joined by "similar" pairs (a, c)
form the value classes (connected components); components too small are dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

from ..config import ShardBuildConfig
from ..registry import Registry
from .manifest import Manifest
from .shards import BadInputError, RawSample, _check_jpeg, _to_jpeg, build_shards

# attribute names and value counts of the paper's datasets (index order of the published files)
ASEN_DATASETS: Dict[str, List[Tuple[str, int]]] = {
    "fashionai": [("skirt_length", 6), ("sleeve_length", 9), ("coat_length", 8), ("pant_length", 6),
                  ("collar_design", 5), ("lapel_design", 5), ("neckline_design", 10), ("neck_design", 5)],
    "darn": [("category", 20), ("button", 13), ("color", 55), ("length", 7), ("pattern", 28),
             ("shape", 11), ("collar_shape", 26), ("sleeve_length", 8), ("sleeve_shape", 17)],
    "deepfashion": [("texture", 156), ("fabric", 218), ("shape", 180), ("part", 216), ("style", 230)],
}
ZAPPOS_CONDITIONS = ["class", "closure", "gender", "heel"]
_SPLIT_NAMES = {"train": "train", "val": "valid", "test": "test"}


def _read_lines(path: Path) -> List[str]:
    if not path.is_file():
        raise BadInputError(f"missing file: {path}")
    return [l.strip() for l in path.read_text().splitlines() if l.strip()]


def _ints(line: str, path: Path, n: int) -> List[int]:
    try:
        vals = [int(x) for x in line.split()]
    except ValueError:
        raise BadInputError(f"{path}: not integers: {line!r}") from None
    return vals


def _check_files_across_splits(files_by_split: Dict[str, List[str]], root: Path) -> None:
    """A published split must not list one image file in two splits (train/test leakage)."""
    owner: Dict[str, str] = {}
    for split, files in files_by_split.items():
        for f in files:
            if owner.setdefault(f, split) != split:
                raise BadInputError(f"{root}: image file '{f}' is listed in both the {owner[f]} and the {split} split")


def _attribute_spec(root: Path, dataset: str) -> Tuple[List[str], List[List[str]]]:
    if dataset not in ASEN_DATASETS:
        raise BadInputError(f"unknown dataset '{dataset}' (known: {', '.join(ASEN_DATASETS)})")
    names = [a for a, _ in ASEN_DATASETS[dataset]]
    values = [[str(v) for v in range(n)] for _, n in ASEN_DATASETS[dataset]]
    meta = root / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        meta_names = m.get("ATTRIBUTES") or m.get("attributes")
        if meta_names:
            if len(meta_names) != len(names):
                raise BadInputError(f"{meta}: {len(meta_names)} attributes, {dataset} has {len(names)}")
            names = [str(a).lower().replace(" ", "_").replace("-", "_") for a in meta_names]
        meta_values = m.get("ATTRIBUTES_VALUES") or m.get("values")
        if meta_values:
            if isinstance(meta_values, dict):
                meta_values = [meta_values[k] for k in (meta_names or names)]
            for i, vs in enumerate(meta_values):
                if len(vs) != len(values[i]):
                    raise BadInputError(f"{meta}: attribute {names[i]} has {len(vs)} values, expected {len(values[i])}")
            values = [[str(v) for v in vs] for vs in meta_values]
    else:
        raise BadInputError(f"missing file: {meta}")
    return names, values


class _AsenLabels:
    """Label vectors of an ASEN-format dataset, checked as they are read (every error names file and line)."""

    def __init__(self, names: List[str], values: List[List[str]]):
        self.names, self.values = names, values
        self.vectors: Dict[str, np.ndarray] = {}

    def set(self, key: str, attr: int, value: int, where: str) -> None:
        n_attr = len(self.names)
        if not 0 <= attr < n_attr:
            raise BadInputError(f"{where}: attribute index {attr} out of range 0..{n_attr - 1}")
        if not 0 <= value < len(self.values[attr]):
            raise BadInputError(f"{where}: value {value} out of range for {self.names[attr]} "
                                f"(0..{len(self.values[attr]) - 1})")
        vec = self.vectors.setdefault(key, np.full(n_attr, -1, dtype=np.int32))
        if vec[attr] >= 0 and vec[attr] != value:
            raise BadInputError(f"{where}: image has two values for {self.names[attr]} ({vec[attr]} and {value})")
        vec[attr] = value

    def value_names(self, key: str) -> Dict[str, str]:
        vec = self.vectors[key]
        return {a: self.values[i][vec[i]] if vec[i] >= 0 else "" for i, a in enumerate(self.names)}


def _asen_key(split: str, idx: int) -> str:
    return f"{split}{idx:07d}"


def _read_asen_train(root: Path, files: List[str], labels: _AsenLabels) -> None:
    lpath = root / "label_train.txt"
    for n, line in enumerate(_read_lines(lpath), start=1):
        v = _ints(line, lpath, 0)
        if len(v) < 3 or len(v) % 2 == 0:
            raise BadInputError(f"{lpath}:{n}: expected `img_idx attr value [attr value ...]`")
        if not 0 <= v[0] < len(files):
            raise BadInputError(f"{lpath}:{n}: image index {v[0]} not in filenames_train.txt")
        for a, val in zip(v[1::2], v[2::2]):
            labels.set(_asen_key("train", v[0]), a, val, f"{lpath}:{n}")


def _read_asen_eval(root: Path, split: str, tag: str, files: List[str], labels: _AsenLabels
                    ) -> Dict[str, Dict[str, List[str]]]:
    """The published query and candidate sets of one evaluation split, per attribute."""
    sets: Dict[str, Dict[str, List[str]]] = {a: {"query": [], "candidate": []} for a in labels.names}
    for role in ("query", "candidate"):
        qpath = root / f"{role}_{tag}.txt"
        for n, line in enumerate(_read_lines(qpath), start=1):
            v = _ints(line, qpath, 3)
            if len(v) != 3:
                raise BadInputError(f"{qpath}:{n}: expected `img_idx attr value`")
            if not 0 <= v[0] < len(files):
                raise BadInputError(f"{qpath}:{n}: image index {v[0]} not in filenames_{tag}.txt")
            k = _asen_key(split, v[0])
            labels.set(k, v[1], v[2], f"{qpath}:{n}")
            sets[labels.names[v[1]]][role].append(k)
    return {a: {role: sorted(set(keys)) for role, keys in roles.items()} for a, roles in sets.items()}


def convert_asen(root: str | Path, dataset: str, out: str | Path, image_root: str | Path | None = None,
                 cfg: ShardBuildConfig | None = None, attribute_prefix: str = "") -> Manifest:
    """`attribute_prefix` (e.g. 'darn_') keeps names unique in a run that spans datasets."""
    root = Path(root)
    image_root = Path(image_root) if image_root else root
    cfg = cfg or ShardBuildConfig(min_value_count=1)
    names, values = _attribute_spec(root, dataset)
    names = [attribute_prefix + n for n in names]
    labels = _AsenLabels(names, values)
    paths: Dict[str, Path] = {}
    splits: Dict[str, List[str]] = {}
    eval_sets: Dict[str, Dict[str, Dict[str, List[str]]]] = {}
    files_by_split: Dict[str, List[str]] = {}
    for split, tag in _SPLIT_NAMES.items():
        files = files_by_split[split] = _read_lines(root / f"filenames_{tag}.txt")
        keys = [_asen_key(split, i) for i in range(len(files))]
        paths.update({k: image_root / rel for k, rel in zip(keys, files)})
        if split == "train":
            _read_asen_train(root, files, labels)
        else:
            eval_sets[split] = _read_asen_eval(root, split, tag, files, labels)
        splits[split] = [k for k in keys if k in labels.vectors]
    _check_files_across_splits(files_by_split, root)
    samples = []
    for k in sorted(labels.vectors):
        p = paths[k]
        if not p.is_file():
            raise BadInputError(f"image file not found: {p} (sample {k})")
        data = p.read_bytes()
        _check_jpeg(data, str(p))
        samples.append(RawSample(k, _to_jpeg(data, cfg.resize_to), labels.value_names(k)))
    return build_shards(samples, names, out, cfg, source={"type": f"asen-{dataset}", "root": str(root)},
                        splits=splits, eval_sets=eval_sets, vocab=dict(zip(names, values)))


class _UnionFind:
    def __init__(self):
        self.parent: Dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def convert_zappos_csn(root: str | Path, out: str | Path, image_root: str | Path | None = None,
                       cfg: ShardBuildConfig | None = None) -> Manifest:
    """Zappos50k, CSN split: value classes per condition from the triplets' similar pairs."""
    root = Path(root)
    image_root = Path(image_root) if image_root else root
    cfg = cfg or ShardBuildConfig(min_value_count=2)
    fpath = root / "filenames.json"
    if not fpath.is_file():
        raise BadInputError(f"missing file: {fpath}")
    files = json.loads(fpath.read_text())
    split_of: Dict[int, str] = {}
    classes: Dict[str, Dict[int, str]] = {}
    for cond in ZAPPOS_CONDITIONS:
        uf = _UnionFind()
        for split in ("train", "val", "test"):
            tpath = root / f"{cond}_tripletlist_{split}.txt"
            for n, line in enumerate(_read_lines(tpath), start=1):
                v = _ints(line, tpath, 3)
                if len(v) != 3 or not all(0 <= i < len(files) for i in v):
                    raise BadInputError(f"{tpath}:{n}: expected three image indices into {fpath.name}")
                a, b, c = v
                uf.union(a, c)
                uf.find(b)
                for i in v:
                    if split_of.setdefault(i, split) != split:
                        raise BadInputError(f"{tpath}:{n}: image {i} also appears in the {split_of[i]} split")
        comps: Dict[int, List[int]] = {}
        for i in list(uf.parent):
            comps.setdefault(uf.find(i), []).append(i)
        # value names: components numbered by their smallest image id (stable across runs)
        classes[cond] = {i: f"{cond}_{root_id}" for root_id, members in comps.items() if len(members) > 1
                         for i in members}
    files_by_split = {sp: [files[i] for i in split_of if split_of[i] == sp] for sp in ("train", "val", "test")}
    _check_files_across_splits(files_by_split, root)
    samples = []
    for i in sorted(split_of):
        p = image_root / files[i]
        if not p.is_file():
            raise BadInputError(f"image file not found: {p} (index {i} of {fpath.name})")
        data = p.read_bytes()
        _check_jpeg(data, str(p))
        samples.append(RawSample(f"zap{i:06d}", _to_jpeg(data, cfg.resize_to),
                                 {c: classes[c].get(i, "") for c in ZAPPOS_CONDITIONS}))
    splits = {sp: [f"zap{i:06d}" for i in sorted(split_of) if split_of[i] == sp] for sp in ("train", "val", "test")}
    return build_shards(samples, ZAPPOS_CONDITIONS, out, cfg, source={"type": "zappos-csn", "root": str(root)},
                        splits=splits)


# ---------------------------------------------------------------- registry: `mclfir shards convert NAME`

@dataclass(frozen=True)
class Converter:
    """`convert(root, out, image_root, cfg, attribute_prefix) -> Manifest`; `about` is its CLI help."""
    convert: Callable[..., Manifest]
    about: str
    default_min_value_count: int = 1


CONVERTERS: Registry[Converter] = Registry("converter", where="mclfir shards convert NAME")


def _asen(dataset: str) -> Converter:
    def convert(root, out, image_root=None, cfg=None, attribute_prefix=""):
        return convert_asen(root, dataset, out, image_root, cfg, attribute_prefix)
    return Converter(convert, f"{dataset} in ASEN's split format (meta.json, filenames_*.txt, label_train.txt, "
                              "query_/candidate_*.txt); keeps the published query/candidate sets")


for _dataset in ASEN_DATASETS:
    CONVERTERS.register(_dataset)(_asen(_dataset))


def _zappos(root, out, image_root=None, cfg=None, attribute_prefix=""):
    if attribute_prefix:
        raise BadInputError("the zappos converter takes no --attribute-prefix")
    return convert_zappos_csn(root, out, image_root, cfg)


CONVERTERS.register("zappos")(Converter(_zappos, "Zappos50k with the Conditional Similarity Networks split "
                                                 "(filenames.json, {cond}_tripletlist_*.txt)", 2))

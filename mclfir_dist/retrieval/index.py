"""`mclfir index`: one FAISS index per attribute over an `mclfir embed` folder.

Kinds (`--kind`): `flat` (exact inner product, the default: embeddings are L2-normalised, so this is
cosine), `ivf` (IndexIVFFlat, `--nlist` lists, `--nprobe` probed per query) and `hnsw`
(IndexHNSWFlat, `--hnsw-m` links, `--ef-search`): approximate, for catalogues above ~1M images.
Every index can give back its vectors (`reconstruct`), so `mclfir search --key` needs nothing else.

Output folder: `<attribute>.faiss`, plus `keys.txt`, `locations.txt`, `labels.json` copied from the
embeddings and `index.json` (kind, parameters, build seconds, the weights hash of each attribute, the
embeddings' provenance, every update). A vector's FAISS id is its row in keys.txt, so `mclfir index update`
adds, replaces (`--embeddings`) and removes (`--remove`) items by key in place; HNSW can only add.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..config import ConfigError
from ..errors import BadInputError
from ..utils.io import atomic_write, atomic_write_json, atomic_write_text
from ..utils.names import check_attribute
from ..utils.jsonfile import read_json
from .embeddings import load_embeddings, read_keys

log = logging.getLogger(__name__)
KINDS = ("flat", "ivf", "hnsw")
INDEX_FORMAT = "mclfir-index/2"   # /2: ids are catalogue rows (IDMap2 / IVF direct map), so items can be updated


def build_index(vectors: np.ndarray, kind: str = "flat", nlist: int = 0, nprobe: int = 16, hnsw_m: int = 32,
                ef_search: int = 64, seed: int = 0, ids: Optional[np.ndarray] = None):
    """An index whose ids are catalogue rows (`ids`, default 0..N-1): items can later be added, replaced and
    removed by key (`update_index`), and `reconstruct(row)` gives a vector back."""
    import faiss
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "ivf":
        nlist = nlist or max(1, min(65536, int(4 * np.sqrt(max(n, 1)))))
        nlist = min(nlist, max(1, n // 39))        # FAISS wants ~39 training points per list
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors if n <= 256 * nlist else vectors[np.random.default_rng(seed).choice(n, 256 * nlist, False)]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)   # reconstruct and remove by id
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efSearch = ef_search
        index = faiss.IndexIDMap2(base)
    else:
        raise ValueError(f"--kind {kind!r}: one of {', '.join(KINDS)}")
    index.add_with_ids(vectors, ids)
    return index


def _write_faiss(index, path: Path) -> None:
    """Serialised in memory, then written like every output: a fresh temp file renamed over `path` (a link
    planted at `path` or at a fixed temp name is replaced, never written through)."""
    import faiss
    data = faiss.serialize_index(index)
    atomic_write(path, lambda f: f.write(data.tobytes()))


def _chosen(emb: dict, attributes: Optional[Sequence[str]], where: str) -> List[str]:
    chosen = list(attributes) if attributes else list(emb["matrices"])
    unknown = [a for a in chosen if a not in emb["matrices"]]
    if unknown:
        raise ConfigError(f"--attributes: {where} has no embeddings for {unknown} (it has {', '.join(emb['matrices'])})")
    return chosen


def index_catalogue(embeddings: str | Path, out: str | Path, kind: str = "flat", nlist: int = 0, nprobe: int = 16,
                    hnsw_m: int = 32, ef_search: int = 64, attributes: Optional[Sequence[str]] = None) -> dict:
    """One index per attribute. With `attributes` and an existing index of the same items in `out`, only
    those indexes are rebuilt and the others kept."""
    emb = load_embeddings(embeddings)
    if not emb["keys"]:
        raise BadInputError(f"{embeddings}: the embedding set is empty: there is nothing to index")
    chosen = _chosen(emb, attributes, str(embeddings))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keep: Dict[str, dict] = {}
    hashes = dict(emb["meta"].get("model_hash", {}))
    if attributes and (out / "index.json").is_file():
        old = CatalogueIndex(out)
        if old.keys != emb["keys"]:
            raise ConfigError(f"--attributes: {out} holds other items than {embeddings}; rebuild every attribute "
                              f"(omit --attributes) or add and replace items with `mclfir index update`")
        keep = {a: v for a, v in old.meta["attributes"].items() if a not in chosen}
        hashes = {**old.model_hashes, **{a: hashes.get(a) for a in chosen}}
        kind, params = old.meta["kind"], old.meta["params"]
        nlist, nprobe, hnsw_m, ef_search = params["nlist"], params["nprobe"], params["hnsw_m"], params["ef_search"]
    built: Dict[str, dict] = {}
    for attribute in chosen:
        started = time.time()
        index = build_index(emb["matrices"][attribute], kind, nlist, nprobe, hnsw_m, ef_search)
        seconds = time.time() - started
        _write_faiss(index, out / f"{attribute}.faiss")
        built[attribute] = {"vectors": int(index.ntotal), "build_seconds": round(seconds, 4),
                            "vectors_per_second": round(index.ntotal / max(seconds, 1e-9), 1)}
        log.debug("%s: %s index of %d vectors in %.2f s", attribute, kind, index.ntotal, seconds)   # cli prints it
    for name in ("keys.txt", "locations.txt", "labels.json"):
        if (Path(embeddings) / name).is_file() and not keep:
            data = (Path(embeddings) / name).read_bytes()
            atomic_write(out / name, lambda f, d=data: f.write(d))   # replaces a link at the destination
    meta = {"format": INDEX_FORMAT, "kind": kind, "params": {"nlist": nlist, "nprobe": nprobe, "hnsw_m": hnsw_m,
            "ef_search": ef_search}, "attributes": {**keep, **built}, "model_hash": hashes,
            "items": len(emb["keys"]), "embeddings": str(embeddings), "embed": emb["meta"]}
    atomic_write_json(out / "index.json", meta)
    return meta


def _parse_keys(remove: Sequence[str]) -> List[str]:
    """--remove K1,K2 or @FILE (one key per line)."""
    keys: List[str] = []
    for item in remove:
        if item.startswith("@"):
            keys += [k for k in Path(item[1:]).read_text().splitlines() if k.strip()]
        else:
            keys += [k for k in item.split(",") if k]
    return keys


def update_index(index_dir: str | Path, embeddings: Optional[str | Path] = None, remove: Sequence[str] = (),
                 attributes: Optional[Sequence[str]] = None, dry_run: bool = False) -> dict:
    """Add or replace items by key from an `mclfir embed` folder, and/or remove keys, in place.

    Per attribute: a new one gets an index over the embeddings' items; one embedded by the same weights gets
    its items added or replaced; one embedded by other weights (a re-embedding after an extension) is
    rebuilt, and only when the embeddings cover every item it holds, so one index never mixes two models.
    Rows keep their ids; a removed key leaves an empty line in keys.txt. Files are written atomically,
    index.json last."""
    cat = CatalogueIndex(index_dir)
    removing = _parse_keys(remove)
    emb = load_embeddings(embeddings) if embeddings is not None else None
    _check_update(cat, removing, emb, embeddings)
    table = {"keys": list(cat.keys), "locations": list(cat.locations),
             "labels": {a: list(v) for a, v in cat.labels.items()}, "hashes": cat.model_hashes}
    plan = {"added": 0, "replaced": 0, "removed": len(removing), "rebuilt": [], "new_attributes": [],
            "updated": [], "seconds": 0.0}
    chosen = _chosen(emb, attributes, str(embeddings)) if emb is not None else []
    started = time.time()
    indexes = {a: cat.index(a) for a in cat.meta["attributes"]}
    if emb is not None:
        ids = _merge_rows(cat, emb, table, plan)
        live = {k for k in cat._row if k not in set(removing)}
        for a in chosen:
            indexes[a] = _update_attribute(cat, a, emb, ids, live, indexes.get(a), table["hashes"], plan,
                                           str(embeddings))
    if removing:
        gone = np.array([cat._row[k] for k in removing], dtype=np.int64)
        for index in indexes.values():
            index.remove_ids(gone)
        for k in removing:
            table["keys"][cat._row[k]] = ""
    plan["seconds"] = round(time.time() - started, 4)
    plan["items"] = sum(1 for k in table["keys"] if k)
    if not dry_run:
        _write_update(cat, indexes, [a for a in indexes if a in chosen or removing], table, plan, embeddings)
    return plan


def _check_update(cat: "CatalogueIndex", removing: List[str], emb: Optional[dict], embeddings) -> None:
    folder = cat.folder
    if cat.meta.get("format") != INDEX_FORMAT:
        raise ConfigError(f"{folder} was built by an older version without item ids: rebuild it with "
                          f"`mclfir index --embeddings ... --out {folder}`")
    unknown = [k for k in removing if k not in cat._row] or \
        (["(a key named twice)"] if len(set(removing)) != len(removing) else [])
    if unknown:
        raise ConfigError(f"--remove: {len(unknown)} key(s) not in {folder}, e.g. {unknown[0]!r}")
    if emb is None and not removing:
        raise ConfigError("index update: give --embeddings EMB, --remove KEYS, or both")
    if removing and cat.meta["kind"] == "hnsw":
        raise ConfigError(f"{folder}: an HNSW index cannot remove items; rebuild it with `mclfir index`")
    both = set(removing) & set(emb["keys"]) if emb is not None else set()
    if both:
        raise ConfigError(f"--remove names {len(both)} key(s) that {embeddings} adds or replaces, e.g. {sorted(both)[0]!r}")


def _merge_rows(cat: "CatalogueIndex", emb: dict, table: dict, plan: dict) -> np.ndarray:
    """New keys get new rows (ids); known keys keep theirs. Locations and labels follow. Returns E's ids."""
    keys, locations, labels = table["keys"], table["locations"], table["labels"]
    rows = dict(cat._row)
    fresh = [k for k in emb["keys"] if k not in rows]
    plan["added"], plan["replaced"] = len(fresh), len(emb["keys"]) - len(fresh)
    for k in fresh:
        rows[k] = len(keys)
        keys.append(k)
        locations.append("")
        for values in labels.values():
            values.append(None)
    for i, k in enumerate(emb["keys"]):
        locations[rows[k]] = emb["locations"][i]
    for a, values in emb["labels"].items():
        column = labels.setdefault(a, [None] * len(keys))
        for i, k in enumerate(emb["keys"]):
            column[rows[k]] = values[i]
    return np.array([rows[k] for k in emb["keys"]], dtype=np.int64)


def _update_attribute(cat: "CatalogueIndex", a: str, emb: dict, ids: np.ndarray, live: set, index, hashes: dict,
                      plan: dict, embeddings: str):
    """One attribute's index after the update: new, rebuilt (other weights covering every item) or updated."""
    params, vectors = cat.meta["params"], emb["matrices"][a]
    new_hash = emb["meta"].get("model_hash", {}).get(a)
    fresh = lambda: build_index(vectors, cat.meta["kind"], params["nlist"], params["nprobe"], params["hnsw_m"],
                                params["ef_search"], ids=ids)
    if index is None:
        plan["new_attributes"].append(a)
        index = fresh()
    elif hashes.get(a) != new_hash:
        missing = live - set(emb["keys"])
        if missing:
            raise ConfigError(f"'{a}': {embeddings} was embedded by other weights than {cat.folder} ({new_hash} vs "
                              f"{hashes.get(a)}) and lacks {len(missing)} of its items (e.g. {sorted(missing)[0]!r}): "
                              f"one index cannot mix two models; re-embed the whole catalogue for '{a}'")
        plan["rebuilt"].append(a)
        index = fresh()
    else:
        replaced = ids[np.isin(ids, list(cat._row.values()))]
        if len(replaced) and cat.meta["kind"] == "hnsw":
            raise ConfigError(f"{cat.folder}: an HNSW index cannot replace items; rebuild it with `mclfir index`")
        if len(replaced):
            index.remove_ids(replaced)
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        plan["updated"].append(a)
    hashes[a] = new_hash
    return index


def _write_update(cat: "CatalogueIndex", indexes: dict, changed: List[str], table: dict, plan: dict,
                  embeddings) -> None:
    folder = cat.folder
    for a in changed:
        _write_faiss(indexes[a], folder / f"{a}.faiss")
    atomic_write_text(folder / "keys.txt", "".join(k + "\n" for k in table["keys"]))
    atomic_write_text(folder / "locations.txt", "".join(p + "\n" for p in table["locations"]))
    if table["labels"]:
        atomic_write_json(folder / "labels.json", table["labels"])
    meta = dict(cat.meta)
    meta["attributes"] = {a: {"vectors": int(index.ntotal)} for a, index in indexes.items()}
    meta["model_hash"], meta["items"] = table["hashes"], plan["items"]
    meta.setdefault("updates", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "embeddings": str(embeddings),
                                           **{k: v for k, v in plan.items() if k != "items"}})
    atomic_write_json(folder / "index.json", meta)


class CatalogueIndex:
    """An `mclfir index` folder: search(attribute, query vectors, k) -> (scores, row indices)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "index.json").is_file():
            raise FileNotFoundError(f"no index.json in {self.folder}: build it with `mclfir index --out {self.folder}`")
        self.meta = read_json(self.folder / "index.json", dict, BadInputError)
        attributes = self.meta.get("attributes")
        if not isinstance(attributes, dict):
            raise BadInputError(f"{self.folder / 'index.json'}: 'attributes' must be a mapping")
        for a in attributes:
            check_attribute(a, f"{self.folder / 'index.json'}: attributes", BadInputError)
        self.keys = read_keys(self.folder / "keys.txt")
        self.locations = (self.folder / "locations.txt").read_text().splitlines() \
            if (self.folder / "locations.txt").is_file() else [""] * len(self.keys)
        self.labels = json.loads((self.folder / "labels.json").read_text()) \
            if (self.folder / "labels.json").is_file() else {}
        self._row = {k: i for i, k in enumerate(self.keys) if k}   # '' = a removed item
        self._indexes: Dict[str, object] = {}
        self._matrices: Dict[str, np.ndarray] = {}
        self._live = np.array([bool(k) for k in self.keys], dtype=bool)
        self._label_arrays: Dict[str, np.ndarray] = {}

    def index(self, attribute: str):
        import faiss
        if attribute not in self.meta["attributes"]:
            raise ConfigError(f"--attribute {attribute!r}: the index has {', '.join(self.meta['attributes'])}")
        if attribute not in self._indexes:
            path = self.folder / f"{attribute}.faiss"
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as e:   # FAISS reports a damaged or missing file this way
                raise BadInputError(f"{path}: not a readable FAISS index ({str(e).splitlines()[0][:200]})") from None
            if index.ntotal > len(self.keys):
                raise BadInputError(f"{path}: {index.ntotal} vectors for {len(self.keys)} keys in keys.txt")
            self._indexes[attribute] = index
        return self._indexes[attribute]

    @property
    def model_hashes(self) -> Dict[str, str]:
        """The weights hash of each attribute's index (per attribute: an update may re-embed some only)."""
        return dict(self.meta.get("model_hash") or self.meta.get("embed", {}).get("model_hash", {}))

    def row(self, key: str) -> int:
        if key not in self._row:
            raise ConfigError(f"--key {key!r} is not in the catalogue ({len(self.keys)} keys in {self.folder})")
        return self._row[key]

    def vector(self, attribute: str, key: str) -> np.ndarray:
        return self.index(attribute).reconstruct(self.row(key))

    def search(self, attribute: str, queries: np.ndarray, k: int):
        if k < 1:
            raise ConfigError(f"--k must be at least 1, got {k}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        return self.index(attribute).search(queries, min(k, len(self._row)))

    def matrix(self, attribute: str) -> np.ndarray:
        """rows x D: every item's vector at its row (zeros for removed rows), read once from the index."""
        if attribute not in self._matrices:
            index = self.index(attribute)
            out = np.zeros((len(self.keys), index.d), dtype=np.float32)
            rows = np.array(sorted(self._row.values()), dtype=np.int64)
            for start in range(0, len(rows), 4096):
                chunk = rows[start:start + 4096]
                out[chunk] = index.reconstruct_batch(chunk)
            self._matrices[attribute] = out
        return self._matrices[attribute]

    def live_rows(self) -> np.ndarray:
        """A boolean mask: rows that hold an item (a removed item leaves an empty key)."""
        return self._live

    def label_array(self, column: str) -> np.ndarray:
        """A label column as strings, one per row ('' where unknown), for vectorised filters."""
        if column not in self._label_arrays:
            values = self.labels.get(column) or []
            self._label_arrays[column] = np.array(
                [str(values[i]) if i < len(values) and values[i] is not None else "" for i in range(len(self.keys))],
                dtype=object)
        return self._label_arrays[column]

    def label(self, attribute: str, row: int) -> Optional[str]:
        values = self.labels.get(attribute)
        return values[row] if isinstance(values, list) and 0 <= row < len(values) else None

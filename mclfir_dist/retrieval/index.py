"""`mclfir index`: one FAISS index per attribute over an `mclfir embed` folder.

Kinds (`--kind`): `flat` (exact inner product, the default: embeddings are L2-normalised, so this is
cosine), `ivf` (IndexIVFFlat, `--nlist` lists, `--nprobe` probed per query) and `hnsw`
(IndexHNSWFlat, `--hnsw-m` links, `--ef-search`): approximate, for catalogues above ~1M images.
Every index can give back its vectors (`reconstruct`), so `mclfir search --key` needs nothing else.

Output folder: `<attribute>.faiss`, plus `keys.txt`, `locations.txt`, `labels.json` copied from the
embeddings and `index.json` (kind, parameters, build seconds, the embeddings' provenance).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..config import ConfigError
from ..errors import BadInputError
from ..utils.io import atomic_write_json
from ..utils.names import check_attribute
from .embed import _read_json, load_embeddings

log = logging.getLogger(__name__)
KINDS = ("flat", "ivf", "hnsw")


def build_index(vectors: np.ndarray, kind: str = "flat", nlist: int = 0, nprobe: int = 16, hnsw_m: int = 32,
                ef_search: int = 64, seed: int = 0):
    import faiss
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = nlist or max(1, min(65536, int(4 * np.sqrt(max(n, 1)))))
        nlist = min(nlist, max(1, n // 39))        # FAISS wants ~39 training points per list
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors if n <= 256 * nlist else vectors[np.random.default_rng(seed).choice(n, 256 * nlist, False)]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"--kind {kind!r}: one of {', '.join(KINDS)}")
    index.add(vectors)
    if kind == "ivf":
        index.make_direct_map()   # reconstruct(i) for `search --key`
    return index


def index_catalogue(embeddings: str | Path, out: str | Path, kind: str = "flat", nlist: int = 0, nprobe: int = 16,
                    hnsw_m: int = 32, ef_search: int = 64) -> dict:
    import faiss
    emb = load_embeddings(embeddings)
    if not emb["keys"]:
        raise BadInputError(f"{embeddings}: the embedding set is empty: there is nothing to index")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    built: Dict[str, dict] = {}
    for attribute, matrix in emb["matrices"].items():
        started = time.time()
        index = build_index(matrix, kind, nlist, nprobe, hnsw_m, ef_search)
        seconds = time.time() - started
        tmp = out / f".{attribute}.faiss.tmp"
        faiss.write_index(index, str(tmp))
        tmp.replace(out / f"{attribute}.faiss")
        built[attribute] = {"vectors": int(index.ntotal), "build_seconds": round(seconds, 4)}
        log.info("%s: %s index of %d vectors in %.2f s", attribute, kind, index.ntotal, seconds)
    for name in ("keys.txt", "locations.txt", "labels.json"):
        if (Path(embeddings) / name).is_file():
            shutil.copyfile(Path(embeddings) / name, out / name)
    meta = {"format": "mclfir-index/1", "kind": kind, "params": {"nlist": nlist, "nprobe": nprobe, "hnsw_m": hnsw_m,
            "ef_search": ef_search}, "attributes": built, "embeddings": str(embeddings), "embed": emb["meta"]}
    atomic_write_json(out / "index.json", meta)
    return meta


class CatalogueIndex:
    """An `mclfir index` folder: search(attribute, query vectors, k) -> (scores, row indices)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "index.json").is_file():
            raise FileNotFoundError(f"no index.json in {self.folder}: build it with `mclfir index --out {self.folder}`")
        self.meta = _read_json(self.folder / "index.json", dict)
        attributes = self.meta.get("attributes")
        if not isinstance(attributes, dict):
            raise BadInputError(f"{self.folder / 'index.json'}: 'attributes' must be a mapping")
        for a in attributes:
            check_attribute(a, f"{self.folder / 'index.json'}: attributes", BadInputError)
        self.keys = (self.folder / "keys.txt").read_text().splitlines()
        self.locations = (self.folder / "locations.txt").read_text().splitlines() \
            if (self.folder / "locations.txt").is_file() else [""] * len(self.keys)
        self.labels = json.loads((self.folder / "labels.json").read_text()) \
            if (self.folder / "labels.json").is_file() else {}
        self._row = {k: i for i, k in enumerate(self.keys)}
        self._indexes: Dict[str, object] = {}

    def index(self, attribute: str):
        import faiss
        if attribute not in self.meta["attributes"]:
            raise ConfigError(f"--attribute {attribute!r}: the index has {', '.join(self.meta['attributes'])}")
        if attribute not in self._indexes:
            self._indexes[attribute] = faiss.read_index(str(self.folder / f"{attribute}.faiss"))
        return self._indexes[attribute]

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
        return self.index(attribute).search(queries, min(k, len(self.keys)))

    def label(self, attribute: str, row: int) -> Optional[str]:
        values = self.labels.get(attribute)
        return values[row] if values else None

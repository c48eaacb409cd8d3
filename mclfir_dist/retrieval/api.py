"""The Python API: load a model (and a catalogue index) once, embed images, search by attribute.

    from mclfir_dist import Retriever
    r = Retriever.from_run("runs/debug", index="runs/debug_index")
    hits = r.search("shirt.jpg", "colour", k=5)                  # an image file
    hits = r.search("test_000123", {"colour": 1, "pattern": 0.5}, k=5, where={"colour": "red"})
    table = r.search("test_000123", "colour", as_dataframe=True)   # pandas

Nothing is printed. Errors are the typed exceptions of `mclfir_dist.errors`: ConfigError (a wrong argument:
unknown attribute, key or label column, k < 1), BadInputError (an image or file that cannot be used),
CheckpointError (no usable checkpoint), FileNotFoundError. docs/api.md documents it; its examples run as tests.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..data.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_any
from ..errors import BadInputError, ConfigError, OtherModelWarning
from .images import check_image_file
from .index import CatalogueIndex

if TYPE_CHECKING:   # torch loads with a model (from_run, from_export): key and vector searches never import it
    import torch

Query = Union[str, Path, bytes, np.ndarray, "torch.Tensor", Mapping[str, np.ndarray]]
Attributes = Union[str, Sequence[str], Mapping[str, float]]
FIRST_FETCH = 64   # a filtered single-attribute search fetches max(4k, this) and doubles until k hits pass


@dataclass(frozen=True)
class Hit:
    """One result: its rank (1 = best), catalogue key, score (the weighted sum of cosine similarities), the
    catalogue's label values for that item, where its image is, and each attribute's cosine similarity
    (`scores`: why a hit of a combined query ranks where it does)."""
    rank: int
    key: str
    score: float
    values: Dict[str, Optional[str]] = field(default_factory=dict)
    location: str = ""
    scores: Dict[str, float] = field(default_factory=dict)


class Retriever:
    """Build with `from_run` or `from_export`; `embed` needs only the model, `search` also an index."""

    def __init__(self, embed_fn, attributes: List[str], transform, max_pixels: int, index: Optional[CatalogueIndex],
                 identity=None, source: str = "", allow_other_model: bool = False):
        self._embed_fn, self._transform, self._identity = embed_fn, transform, identity
        self.attributes, self.max_pixels, self.index, self.source = attributes, max_pixels, index, source
        self.allow_other_model = allow_other_model
        self.max_pixels_name = "Retriever.max_pixels"   # what an over-size message names: the service says its flag
        self._checked: Dict[str, bool] = {}

    @classmethod
    def from_run(cls, run: str | Path, index: str | Path | None = None, allow_other_model: bool = False,
                 device: str | torch.device = "cpu") -> "Retriever":
        """The run's newest good checkpoint; `index` is an `mclfir index` folder (optional)."""
        import torch
        from ..model.preprocess import eval_transform
        from ..model.saved import load_run_model, model_identity
        model, cfg, _ = load_run_model(run)
        model.to(device)
        transform = eval_transform(cfg.data.image_size, int(round(cfg.data.image_size * cfg.data.resize_ratio)))

        @torch.no_grad()
        def embed_fn(x: torch.Tensor, attributes: Sequence[str]) -> Dict[str, np.ndarray]:
            emb, _ = model.embed_all(x.to(device), list(attributes))
            return {a: emb[:, i].float().cpu().numpy() for i, a in enumerate(attributes)}

        return cls(embed_fn, list(model.attributes), transform, cfg.data.max_image_pixels, _open(index),
                   lambda a: model_identity(model, a), str(run), allow_other_model)

    @classmethod
    def from_export(cls, directory: str | Path, index: str | Path | None = None,
                    device: str | torch.device = "cpu") -> "Retriever":
        """An `mclfir export` folder (torch + torchvision + safetensors only). Its weights carry no identity an
        index can check, so image queries against an index are searched as given (a warning says so)."""
        from ..model.preprocess import preprocess
        from .portable import load_exported
        try:
            model = load_exported(directory, device)
        except (OSError, ValueError) as e:
            raise BadInputError(f"{directory}: not a usable export ({e})") from None

        def embed_fn(x: torch.Tensor, attributes: Sequence[str]) -> Dict[str, np.ndarray]:
            out = model(x.to(device), list(attributes))
            return {a: v.float().cpu().numpy() for a, v in out.items()}

        return cls(embed_fn, model.attributes, lambda img: preprocess(img, model.config), DEFAULT_MAX_PIXELS,
                   _open(index), None, str(directory), allow_other_model=True)

    @classmethod
    def from_index(cls, index: str | Path) -> "Retriever":
        """Key and vector queries only, on the index's own vectors: no model is loaded."""
        return cls(None, [], None, DEFAULT_MAX_PIXELS, _open(index), None, str(index))

    # ---------------------------------------------------------------- embedding

    def embed(self, images: Sequence[Union[str, Path, bytes, torch.Tensor]], attributes: Attributes | None = None,
              batch_size: int = 64) -> Dict[str, np.ndarray]:
        """{attribute: N x D float32, L2-normalised} for image paths, encoded bytes or decoded uint8 tensors."""
        if self._embed_fn is None:
            raise ConfigError(f"{self.source}: no model to embed images with: use Retriever.from_run or from_export")
        names = list(_weights(attributes, self.attributes, "the model")) if attributes else list(self.attributes)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        chunks: Dict[str, List[np.ndarray]] = {a: [] for a in names}
        for start in range(0, len(images), batch_size):
            import torch
            x = torch.stack([self.prepare(img) for img in images[start:start + batch_size]])
            for a, v in self.embed_tensors(x, names).items():
                chunks[a].append(v)
        return {a: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for a, v in chunks.items()}

    def prepare(self, image) -> torch.Tensor:
        """One image (path, bytes or uint8 tensor) -> the model's input tensor (decoded, checked, resized)."""
        if self._embed_fn is None:
            raise ConfigError(f"{self.source}: no model to embed images with: use Retriever.from_run or from_export")
        return self._transform(self._decode(image))

    def embed_tensors(self, x: torch.Tensor, attributes: Sequence[str]) -> Dict[str, np.ndarray]:
        """A batch of `prepare`d images (B x C x H x W) -> {attribute: B x D}; the service batches requests here."""
        return self._embed_fn(x, list(attributes))

    def _decode(self, image) -> torch.Tensor:
        if _is_tensor(image):
            if str(image.dtype) != "torch.uint8" or image.dim() != 3:
                raise BadInputError(f"an image tensor must be uint8 C x H x W, got {image.dtype} {tuple(image.shape)}")
            return image
        if isinstance(image, (str, Path)):
            path = check_image_file(Path(image), "image")
            data, name = path.read_bytes(), str(path)
        elif isinstance(image, (bytes, bytearray)):
            data, name = bytes(image), "the image bytes"
        else:
            raise ConfigError(f"an image is a path, bytes or a uint8 tensor, not {type(image).__name__}")
        try:
            return decode_any(data, self.max_pixels, self.max_pixels_name)
        except ImageRejected as e:
            raise BadInputError(f"{name}: {e}") from None

    # ---------------------------------------------------------------- search

    def search(self, query: Query, attributes: Attributes, k: int = 10, where: Mapping[str, object] | None = None,
               as_dataframe: bool = False):
        """The top-k catalogue items for `query` (an image path, bytes or uint8 tensor; a catalogue key; a
        vector, or {attribute: vector}) ranked by the weighted sum of per-attribute cosine similarities.
        `where` keeps items whose catalogue labels match ({column: value or [values]}). A key query never
        returns itself. Returns a list of Hit, or a pandas DataFrame with `as_dataframe=True`."""
        cat = self.catalogue
        weights = _weights(attributes, list(cat.meta["attributes"]), f"the index {cat.folder}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k must be an integer of at least 1, got {k!r}")
        keep = _row_filter(cat, where)
        vectors, exclude = self._query_vectors(cat, query, list(weights))
        ranked = _rank(cat, vectors, weights, k, keep, exclude)
        parts = _breakdown(cat, vectors, [row for row, _ in ranked])
        hits = [Hit(i + 1, cat.keys[row], score, {c: cat.label(c, row) for c in cat.labels}, cat.locations[row],
                    {a: float(v[i]) for a, v in parts.items()})
                for i, (row, score) in enumerate(ranked)]
        return _frame(hits) if as_dataframe else hits

    @property
    def catalogue(self) -> CatalogueIndex:
        """The index searched (ConfigError when the Retriever was built without one)."""
        if self.index is None:
            raise ConfigError("search needs a catalogue index: Retriever.from_run(RUN, index=DIR) (built with "
                              "`mclfir embed` then `mclfir index`)")
        return self.index

    def _query_vectors(self, cat: CatalogueIndex, query, names: List[str]) -> Tuple[Dict[str, np.ndarray], int]:
        """({attribute: query vector}, the catalogue row to leave out or -1)."""
        if isinstance(query, Mapping):
            missing = [a for a in names if a not in query]
            if missing:
                raise ConfigError(f"the query gives vectors for {sorted(query)}, not for {missing}")
            return {a: _vector(query[a], cat, a) for a in names}, -1
        if isinstance(query, np.ndarray) or _is_tensor(query) and query.is_floating_point():
            if len(names) != 1:
                raise ConfigError("a vector lives in one attribute's space: pass {attribute: vector} to combine")
            return {names[0]: _vector(query, cat, names[0])}, -1
        if isinstance(query, str) and query in cat._row:
            row = cat.row(query)
            return {a: cat.vector(a, query) for a in names}, row
        if isinstance(query, str) and not Path(query).is_file():
            raise ConfigError(f"query {query!r} is neither a catalogue key ({len(cat._row)} keys in {cat.folder}) "
                              "nor an image file")
        for a in names:
            self.check_model(a)
        embedded = self.embed([query], names)
        return {a: embedded[a][0] for a in names}, -1

    def check_model(self, attribute: str) -> None:
        """Image queries are embedded here; the index must hold the same model's vectors for `attribute`
        (ConfigError otherwise, or a warning with allow_other_model)."""
        cat = self.catalogue
        if attribute in self._checked:
            return
        if self._embed_fn is None:
            raise ConfigError(f"image queries need a model: Retriever.from_run(RUN, index={str(cat.folder)!r})")
        if attribute not in self.attributes:
            raise ConfigError(f"attribute {attribute!r}: the model has {', '.join(self.attributes)}")
        indexed = cat.model_hashes.get(attribute)
        current = self._identity(attribute) if self._identity else None
        if current is None or indexed != current:
            if not self.allow_other_model:
                raise ConfigError(f"the index {cat.folder} was embedded by another model than {self.source}'s for "
                                  f"'{attribute}' (weights {indexed or 'unrecorded'} vs {current}): re-embed and "
                                  "re-index, or search it anyway (allow_other_model=True, --allow-other-model)")
            warnings.warn(f"'{attribute}': the index's vectors may come from another model than {self.source}'s",
                          OtherModelWarning, stacklevel=3)
        self._checked[attribute] = True


def _is_tensor(x) -> bool:
    """A torch tensor, without importing torch: if torch was never imported, nothing can be one."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _open(index) -> Optional[CatalogueIndex]:
    return CatalogueIndex(index) if index is not None else None


def _weights(attributes: Attributes, known: List[str], where: str) -> Dict[str, float]:
    if isinstance(attributes, str):
        weights = {attributes: 1.0}
    elif isinstance(attributes, Mapping):
        weights = {a: float(w) for a, w in attributes.items()}
    else:
        weights = {a: 1.0 for a in attributes}
    if not weights:
        raise ConfigError("give at least one attribute")
    unknown = [a for a in weights if a not in known]
    if unknown:
        raise ConfigError(f"unknown attribute {unknown[0]!r}: {where} has {', '.join(known)}")
    return check_weights(weights)


def check_weights(weights: Dict[str, float]) -> Dict[str, float]:
    """Finite weights, at least one above 0: a ranking by only zero or negative weights would return the
    least similar items (or ties at 0). Zero and negative weights beside a positive one are scored exactly."""
    if any(not np.isfinite(w) for w in weights.values()):
        raise ConfigError(f"attribute weights must be finite numbers, got {weights}")
    if not any(w > 0 for w in weights.values()):
        raise ConfigError(f"at least one attribute weight must be above 0, got {weights} (a weight of 0 or below "
                          "only lowers the score of items similar in that attribute)")
    return weights


def _vector(v, cat: CatalogueIndex, attribute: str) -> np.ndarray:
    v = np.asarray(v.detach().cpu() if _is_tensor(v) else v, dtype=np.float32).reshape(-1)
    dim = cat.index(attribute).d
    if v.shape[0] != dim or not np.isfinite(v).all():
        raise BadInputError(f"a query vector for '{attribute}' must hold {dim} finite numbers, got {v.shape[0]}")
    return v


def _row_filter(cat: CatalogueIndex, where: Mapping[str, object] | None) -> Optional[np.ndarray]:
    """A boolean mask over catalogue rows from {label column: value or values} (None: every row)."""
    if not where:
        return None
    keep = np.ones(len(cat.keys), dtype=bool)
    for column, wanted in where.items():
        if column not in cat.labels:
            have = ", ".join(cat.labels) or "none"
            raise ConfigError(f"where: unknown label column {column!r} (the catalogue has: {have})")
        values = [str(w) for w in (wanted if isinstance(wanted, (list, tuple, set)) else [wanted])]
        labels = cat.label_array(column)
        unknown = [v for v in values if not (labels == v).any()]
        if unknown:   # a typo would otherwise return nothing, silently
            have = sorted({str(v) for v in labels if v})
            raise ConfigError(f"where: no item has {column}={unknown[0]!r} (values: {', '.join(have[:20])}"
                              f"{', ...' if len(have) > 20 else ''})")
        keep &= np.isin(labels, values)
    return keep


def _rank(cat: CatalogueIndex, vectors: Dict[str, np.ndarray], weights: Dict[str, float], k: int,
          keep: Optional[np.ndarray], exclude: int) -> List[Tuple[int, float]]:
    """One attribute: the index's search, post-filtered with over-fetch (max(4k, 64), doubled until k rows pass
    the filter or the catalogue is exhausted). Combined: every item scored exactly from the index's vectors."""
    if len(weights) > 1:   # a weight <= 0 is only ever one of several (check_weights): scored exactly here
        return _rank_all(cat, vectors, weights, k, keep, exclude)
    (a, w), = weights.items()
    total = len(cat._row)
    fetch = min(total, max(4 * k, FIRST_FETCH) + 1) if keep is not None else min(total, k + 1)
    while True:
        s, r = cat.search(a, vectors[a], fetch)
        ranked = [(row, w * score) for score, row in zip(s[0].tolist(), r[0].tolist())
                  if 0 <= row < len(cat.keys) and cat.keys[row] and row != exclude and (keep is None or keep[row])]
        ranked.sort(key=lambda t: (-t[1], t[0]))
        if len(ranked) >= k or fetch >= total:
            return ranked[:k]
        fetch = min(total, fetch * 2)


def _rank_all(cat: CatalogueIndex, vectors: Dict[str, np.ndarray], weights: Dict[str, float], k: int,
              keep: Optional[np.ndarray], exclude: int) -> List[Tuple[int, float]]:
    scores = np.zeros(len(cat.keys), dtype=np.float64)
    for a, w in weights.items():
        scores += w * (cat.matrix(a) @ vectors[a].astype(np.float32))
    allowed = cat.live_rows() if keep is None else cat.live_rows() & keep
    if 0 <= exclude < len(allowed):
        allowed = allowed.copy()
        allowed[exclude] = False
    rows = np.flatnonzero(allowed)
    if len(rows) > k:
        rows = rows[np.argpartition(-scores[rows], k - 1)[:k]]
    return sorted(((int(r), float(scores[r])) for r in rows), key=lambda t: (-t[1], t[0]))


def _breakdown(cat: CatalogueIndex, vectors: Dict[str, np.ndarray], rows: List[int]) -> Dict[str, np.ndarray]:
    """Each attribute's cosine similarity of the query to the ranked rows (from the index's own vectors)."""
    return {a: cat.matrix(a)[rows] @ v.astype(np.float32) for a, v in vectors.items()}


def _frame(hits: List[Hit]):
    try:
        import pandas as pd
    except ImportError:
        raise ConfigError("as_dataframe=True needs pandas (pip install pandas)") from None
    rows = [{**{c: v for c, v in asdict(h).items() if c not in ("values", "scores")}, **h.values} for h in hits]
    return pd.DataFrame(rows, columns=["rank", "key", "score", "location"] + (list(hits[0].values) if hits else []))

"""The `mclfir embed` output folder (EMB), read and written: keys.txt, locations.txt, <attribute>.npy,
labels.json, embed.json. Only numpy and json: `mclfir index` and key searches read it without torch."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from ..errors import BadInputError
from ..utils.io import atomic_write, atomic_write_json, atomic_write_text
from ..utils.jsonfile import expect, read_json
from ..utils.names import check_attribute

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def write_embeddings(out_dir: Path, result: dict, meta: dict, embed_dim: int) -> None:
    """One .npy per attribute, keys, locations, labels and embed.json (written last: it marks the set done)."""
    for a, chunks in result["chunks"].items():
        matrix = np.concatenate(chunks) if chunks else np.zeros((0, embed_dim), np.float32)
        atomic_write(out_dir / f"{a}.npy", lambda f, m=matrix: np.save(f, m))
    atomic_write_text(out_dir / "keys.txt", "".join(k + "\n" for k in result["keys"]))
    atomic_write_text(out_dir / "locations.txt", "".join(str(p) + "\n" for p in result["locations"]))
    labelled = {a: v for a, v in result["labels"].items() if any(x is not None for x in v)}
    if labelled:
        atomic_write_json(out_dir / "labels.json", labelled)
    atomic_write_json(out_dir / "embed.json", meta)


def load_embeddings(folder: str | Path) -> dict:
    """{'meta', 'keys', 'locations', 'labels', 'matrices': {attribute: N x D}} of an `mclfir embed` folder."""
    folder = Path(folder)
    if not (folder / "embed.json").is_file():
        raise FileNotFoundError(f"no embed.json in {folder}: make it with `mclfir embed --out {folder}`")
    meta = read_json(folder / "embed.json", dict, BadInputError)
    for a in expect(meta.get("attributes"), list, "attributes", folder / "embed.json", BadInputError):
        check_attribute(a, f"{folder / 'embed.json'}: attributes", BadInputError)
    labels = read_json(folder / "labels.json", dict, BadInputError) if (folder / "labels.json").is_file() else {}
    keys = read_keys(folder / "keys.txt")
    locations = (folder / "locations.txt").read_text().splitlines() if (folder / "locations.txt").is_file() else []
    matrices = {a: _matrix(folder / f"{a}.npy", len(keys)) for a in meta["attributes"]}
    if locations and len(locations) != len(keys):
        raise BadInputError(f"{folder / 'locations.txt'}: {len(locations)} lines for {len(keys)} keys")
    for a, values in labels.items():
        if not isinstance(values, list) or len(values) != len(keys):
            raise BadInputError(f"{folder / 'labels.json'}: '{a}' must list one value per key ({len(keys)})")
    return {"meta": meta, "keys": keys, "locations": locations or [""] * len(keys), "labels": labels,
            "matrices": matrices}


def read_keys(path: Path) -> List[str]:
    """keys.txt's lines; a key listed twice is refused (search would return its item twice). Empty lines are
    removed items of an index and may repeat."""
    keys = path.read_text().splitlines()
    seen: Dict[str, int] = {}
    for row, key in enumerate(keys, 1):
        if key and key in seen:
            raise BadInputError(f"{path}: key {key!r} on line {row} is already on line {seen[key]} (keys must be "
                                "unique)")
        seen.setdefault(key, row)
    return keys


def _matrix(path: Path, rows: int) -> np.ndarray:
    """One attribute's N x D float matrix, N = the number of keys, finite; never a pickled object."""
    try:
        m = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: not a numeric .npy matrix ({str(e).splitlines()[0]})") from None
    if m.ndim != 2 or m.shape[0] != rows or not np.issubdtype(m.dtype, np.floating):
        raise BadInputError(f"{path}: a {m.dtype} array of shape {m.shape}, expected float rows x dim with "
                            f"{rows} rows (one per key in keys.txt)")
    if not np.isfinite(m).all():
        raise BadInputError(f"{path}: holds NaN or inf")
    return m



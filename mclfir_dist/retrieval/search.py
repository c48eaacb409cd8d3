"""`mclfir search`: a query image (or a catalogue key) -> the top-k of the catalogue under one
attribute's head, printed as rank, key, score and value, and optionally drawn as a contact sheet."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..config import ConfigError
from ..data.images import ImageRejected
from ..data.streams import iter_shard
from ..errors import BadInputError
from ..utils.names import check_file_name
from ..model.preprocess import eval_transform
from ..training.checkpoint import load_run_model
from .embed import decode_file_bytes, model_identity
from .index import CatalogueIndex

log = logging.getLogger(__name__)
SHEET_MAX = 50   # tiles on one contact sheet: past that it is no longer an image anyone can look at


def check_same_model(catalogue: CatalogueIndex, model, run: str, attribute: str, allow_other: bool) -> None:
    """Queries and index must come from the same weights; another model is refused unless allowed, and then
    the run's measured compatibility (results.json) is shown."""
    indexed = catalogue.model_hashes.get(attribute)
    current = model_identity(model, attribute)
    if indexed == current:
        return
    if not allow_other:
        raise ConfigError(f"the index {catalogue.folder} was embedded by another model than {run}'s for "
                          f"'{attribute}' (weights {indexed or 'unrecorded'} vs {current}): re-embed and re-index, "
                          f"or pass --allow-other-model to search it anyway")
    print(f"warning: another model: {compatibility_note(run, attribute)}", file=sys.stderr)


def compatibility_note(run: str, attribute: str) -> str:
    path = Path(run) / "results.json"
    rows = json.loads(path.read_text()).get("compatibility", []) if path.is_file() else []
    found = [(e["increment"], e["attributes"][attribute]) for e in rows if attribute in e["attributes"]]
    if not found:
        return f"no compatibility figure for '{attribute}' in {path}"
    t, r = found[-1]
    return (f"after increment {t}, '{attribute}' scored mAP {100 * r['deployed_index']:.2f} with the previous "
            f"model's index vs {100 * r['reembedded']:.2f} re-embedded (measured on the eval split)")


def embed_query(run: str, image: str, attribute: str, catalogue: Optional[CatalogueIndex] = None,
                allow_other_model: bool = False) -> np.ndarray:
    model, cfg, _ = load_run_model(run)
    if attribute not in model.heads:
        raise ConfigError(f"--attribute {attribute!r}: the run has {', '.join(model.attributes)}")
    if catalogue is not None:
        check_same_model(catalogue, model, run, attribute, allow_other_model)
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"--image: no such file: {path}")
    transform = eval_transform(cfg.data.image_size, int(round(cfg.data.image_size * cfg.data.resize_ratio)))
    try:
        decoded = decode_file_bytes(path.read_bytes(), cfg.data.max_image_pixels)
    except ImageRejected as e:
        raise BadInputError(f"--image {path}: {e}") from None
    x = transform(decoded)[None]
    emb, _ = model.embed_all(x, [attribute])
    return emb[0, 0].numpy()


def search_catalogue(run: Optional[str], index_dir: str, attribute: str, image: Optional[str] = None,
                     key: Optional[str] = None, k: int = 10, sheet: Optional[str] = None,
                     allow_other_model: bool = False) -> List[dict]:
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    catalogue = CatalogueIndex(index_dir)
    if (image is None) == (key is None):
        raise ConfigError("give exactly one of --image Q.jpg or --key K")
    if image is not None:
        if run is None:
            raise ConfigError("--image needs --run RUN (the model that embeds the query)")
        query = embed_query(run, image, attribute, catalogue, allow_other_model)
        exclude = None
    else:
        query = catalogue.vector(attribute, key)
        exclude = catalogue.row(key)   # the query itself is not a result
    scores, rows = catalogue.search(attribute, query, k + (exclude is not None))
    hits = []
    for score, row in zip(scores[0].tolist(), rows[0].tolist()):
        if row < 0 or row == exclude or row >= len(catalogue.keys) or not catalogue.keys[row]:
            continue
        hits.append({"rank": len(hits) + 1, "key": catalogue.keys[row], "score": score, "row": row,
                     "value": catalogue.label(attribute, row), "location": catalogue.locations[row]})
    hits = hits[:k]
    query_value = catalogue.label(attribute, exclude) if exclude is not None else None
    print(f"query: {image or key}" + (f"  ({attribute} = {query_value})" if query_value else "")
          + f"  | {attribute}, top {len(hits)}")
    print(f"{'rank':>4}  {'score':>7}  {'key':30s}  value")
    for h in hits:
        print(f"{h['rank']:>4}  {h['score']:7.4f}  {h['key']:30s}  {h['value'] if h['value'] is not None else '-'}")
    if sheet:
        if len(hits) > SHEET_MAX:
            log.warning("the contact sheet shows the first %d of %d results", SHEET_MAX, len(hits))
        hits_drawn = hits[:SHEET_MAX]
        query_image = Path(image).read_bytes() if image else _image_bytes(catalogue, [exclude])[exclude]
        images = _image_bytes(catalogue, [h["row"] for h in hits_drawn])
        draw_sheet(sheet, query_image, f"query {Path(image).name if image else key}", query_value,
                   [(images.get(h["row"]), h) for h in hits_drawn], attribute)
    return hits


def _image_bytes(catalogue: CatalogueIndex, rows: List[int]) -> Dict[int, bytes]:
    """The images of catalogue rows: files read directly; samples in shards found by key."""
    out: Dict[int, bytes] = {}
    by_shard: Dict[str, Dict[str, int]] = {}
    source = catalogue.meta["embed"]["source"]
    for row in rows:
        location = catalogue.locations[row]
        if "shards" in source:
            by_shard.setdefault(location, {})[catalogue.keys[row]] = row
        elif Path(location).is_file():
            out[row] = Path(location).read_bytes()
    for shard, wanted in by_shard.items():
        check_file_name(shard, f"{catalogue.folder / 'locations.txt'}", BadInputError)
        for s in iter_shard(Path(source["shards"]) / shard):
            if s["__key__"] in wanted:
                out[wanted[s["__key__"]]] = s["jpg"]
    return out


def draw_sheet(path: str, query: bytes, query_title: str, query_value: Optional[str], results, attribute: str,
               tile: int = 160) -> None:
    """Query (blue frame) then its top-k, each captioned with key, score and value; green frame = same value."""
    from PIL import Image, ImageDraw
    caption = 34
    cols = 1 + len(results)
    sheet = Image.new("RGB", (cols * (tile + 8) + 8, tile + caption + 16), "white")
    draw = ImageDraw.Draw(sheet)

    def place(data: Optional[bytes], column: int, colour, lines: List[str]) -> None:
        x = 8 + column * (tile + 8)
        draw.rectangle([x - 4, 4, x + tile + 3, 12 + tile - 1], outline=colour, width=4)
        try:
            decoded = decode_file_bytes(data) if data is not None else None
        except ImageRejected as e:   # a catalogue image gone bad since it was embedded: a blank tile
            log.warning("contact sheet: %s", e)
            decoded = None
        if decoded is not None:
            img = Image.fromarray(decoded.permute(1, 2, 0).numpy())
            scale = tile / max(img.size)   # small catalogue images are enlarged, large ones shrunk
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
            sheet.paste(img, (x + (tile - img.width) // 2, 8 + (tile - img.height) // 2))
        for i, line in enumerate(lines):
            draw.text((x, tile + 14 + 11 * i), line[:26], fill="black")

    place(query, 0, (40, 90, 230), [query_title, f"{attribute}: {query_value or '?'}"])
    for column, (data, hit) in enumerate(results, start=1):
        same = query_value is not None and hit["value"] == query_value
        colour = (30, 180, 60) if same else (220, 40, 40) if query_value is not None else (150, 150, 150)
        place(data, column, colour, [f"{hit['rank']}. {hit['key']}", f"{hit['score']:.3f} {hit['value'] or ''}"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)

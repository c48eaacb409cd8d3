"""`mclfir search`: a query image (or a catalogue key) -> the top-k of the catalogue under one
attribute's head, printed as rank, key, score and value, and optionally drawn as a contact sheet."""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

from ..config import ConfigError
from ..errors import OtherModelWarning
from ..runfolder.layout import RunFolder
from .api import Retriever
from .images import CatalogueImages, check_image_file
from .index import CatalogueIndex

log = logging.getLogger(__name__)
SHEET_MAX = 50   # tiles on one contact sheet: past that it is no longer an image anyone can look at


def compatibility_note(run: str, attribute: str) -> str:
    path = RunFolder(run).results
    rows = RunFolder(run).read_results().get("compatibility", []) if path.is_file() else []
    found = [(e["increment"], e["attributes"][attribute]) for e in rows if attribute in e["attributes"]]
    if not found:
        return f"no compatibility figure for '{attribute}' in {path}"
    t, r = found[-1]
    return (f"after increment {t}, '{attribute}' scored mAP {100 * r['deployed_index']:.2f} with the previous "
            f"model's index vs {100 * r['reembedded']:.2f} re-embedded (measured on the eval split)")


def search_catalogue(run: Optional[str], index_dir: str, attribute: str, image: Optional[str] = None,
                     key: Optional[str] = None, k: int = 10, sheet: Optional[str] = None,
                     allow_other_model: bool = False) -> List[dict]:
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    if (image is None) == (key is None):
        raise ConfigError("give exactly one of --image Q.jpg or --key K")
    if image is not None and run is None:
        raise ConfigError("--image needs --run RUN (the model that embeds the query)")
    if image is not None:
        check_image_file(Path(image), "--image")
    retriever = Retriever.from_run(run, index_dir, allow_other_model) if run else Retriever.from_index(index_dir)
    catalogue = retriever.catalogue
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OtherModelWarning)
        found = retriever.search(Path(image) if image is not None else key, attribute, k)
    for w in caught:
        if not issubclass(w.category, OtherModelWarning):   # e.g. a library's DeprecationWarning: shown as such
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if any(issubclass(w.category, OtherModelWarning) for w in caught):
        print(f"warning: another model: {compatibility_note(run, attribute)}", file=sys.stderr)
    exclude = catalogue.row(key) if key is not None else None   # the query itself is not a result
    hits = [{"rank": h.rank, "key": h.key, "score": h.score, "row": catalogue.row(h.key),
             "value": h.values.get(attribute), "location": h.location} for h in found]
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
        query_image = Path(image).read_bytes() if image else _image_bytes(catalogue, [exclude]).get(exclude)
        images = _image_bytes(catalogue, [h["row"] for h in hits_drawn])
        draw_sheet(sheet, query_image, f"query {Path(image).name if image else key}", query_value,
                   [(images.get(h["row"]), h) for h in hits_drawn], attribute)
    return hits


def _image_bytes(catalogue: CatalogueIndex, rows: List[int]) -> Dict[int, bytes]:
    """The images of catalogue rows (a missing one is left out: its tile is drawn blank)."""
    images, out = CatalogueImages(catalogue), {}
    for row in rows:
        try:
            out[row] = images.read(catalogue.keys[row])
        except FileNotFoundError as e:
            log.warning("contact sheet: %s", e)
    return out


def draw_sheet(path: str, query: bytes, query_title: str, query_value: Optional[str], results, attribute: str,
               tile: int = 160) -> None:
    """Query (blue frame) then its top-k, each captioned with key, score and value; green frame = same value."""
    from PIL import Image, ImageDraw
    from ..data.images import ImageRejected, decode_any as decode_file_bytes
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

"""`mclfir search --queries DIR|CSV --out hits.jsonl|hits.csv`: many queries, the model loaded once, images
embedded in batches; `--where` filters and `--attributes a:w,b:w` combined rankings go through the same API
(retrieval/api.py)."""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import BadInputError, ConfigError
from ..utils.io import atomic_write_text
from .api import Hit, Retriever
from .embeddings import IMAGE_SUFFIXES
from .images import check_image_file

BATCH = 64   # image queries embedded at once


def parse_weights(spec: str) -> Dict[str, float]:
    """'colour:1,pattern:0.5' (a bare name weighs 1)."""
    weights: Dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition(":")
        if name in weights:   # 'colour:1,colour:2' kept the last one, silently
            raise ConfigError(f"--attributes {spec!r}: {name!r} is given twice")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"--attributes {spec!r}: weight {w!r} of {name!r} is not a number") from None
    if not weights:
        raise ConfigError("--attributes: give at least one attribute, e.g. colour:1,pattern:0.5")
    return weights


def parse_where(spec: Optional[str], flag: str = "--where") -> Dict[str, List[str]]:
    """'baseColour=Red,articleType=Shirts' (a column given twice keeps either value)."""
    where: Dict[str, List[str]] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        column, eq, value = part.partition("=")
        if not eq or not column:
            raise ConfigError(f"{flag} {spec!r}: {part!r} is not NAME=VALUE")
        where.setdefault(column, []).append(value)
    return where


def read_queries(source: str | Path) -> List[Tuple[str, object]]:
    """(name, query) pairs. A folder: every image in it (recursively). A CSV: a `query` column whose values are
    catalogue keys or image paths (relative to the CSV's folder)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise BadInputError(f"--queries {path}: no images in this folder")
        return [(p.relative_to(path).as_posix(), p) for p in files]
    if not path.is_file():
        raise FileNotFoundError(f"--queries: no such folder or CSV: {path}")
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
    except (UnicodeDecodeError, csv.Error) as e:
        raise BadInputError(f"--queries {path}: not a readable CSV ({e})") from None
    if not rows or "query" not in rows[0]:
        raise BadInputError(f"--queries {path}: needs a 'query' column (catalogue keys or image paths)")
    out = []
    for i, row in enumerate(rows, start=2):
        q = (row.get("query") or "").strip()
        if not q:
            raise BadInputError(f"--queries {path}, row {i}: empty query")
        image = path.parent / q
        out.append((q, image if image.is_file() else q))
    return out


def search_many(retriever: Retriever, queries: List[Tuple[str, object]], weights: Dict[str, float], k: int,
                where: Optional[dict], skip_bad: bool = False) -> Tuple[List[Tuple[str, List[Hit]]], List[dict]]:
    """(results, skipped). Image queries are embedded BATCH at a time with the model loaded once; keys use the
    index's vectors. A query that cannot be used (an unknown key, an image that does not decode) stops the
    batch before any search, naming it, or with `skip_bad` is left out and listed."""
    names = list(weights)
    cat = retriever.catalogue
    skipped = [{"query": n, "error": f"{n!r} is neither a catalogue key nor an image file"}
               for n, q in queries if not isinstance(q, Path) and q not in cat._row]
    images = [i for i, (_, q) in enumerate(queries) if isinstance(q, Path)]
    vectors: Dict[int, dict] = {}
    if images:
        for a in names:
            retriever.check_model(a)
    for start in range(0, len(images), BATCH):
        chunk = images[start:start + BATCH]
        for i, v in _embed_chunk(retriever, queries, chunk, names, skipped).items():
            vectors[i] = v
    if skipped and not skip_bad:
        raise BadInputError(f"--queries: {len(skipped)} unusable quer{'y' if len(skipped) == 1 else 'ies'}, first "
                            f"{skipped[0]['error']} (--skip-bad-queries searches the others and lists these)")
    bad = {s["query"] for s in skipped}
    results = [(name, retriever.search(vectors.get(i, q), weights, k, where)) for i, (name, q) in enumerate(queries)
               if name not in bad]
    return results, skipped


def _embed_chunk(retriever: Retriever, queries, chunk: List[int], names: List[str], skipped: List[dict]) -> dict:
    """{query position: {attribute: vector}}; an image that cannot be used goes to `skipped` (one at a time
    only when the whole chunk failed, so the common case stays one batch)."""
    try:
        embedded = retriever.embed([queries[i][1] for i in chunk], names, batch_size=BATCH)
        return {i: {a: embedded[a][j] for a in names} for j, i in enumerate(chunk)}
    except (BadInputError, FileNotFoundError):
        pass
    out = {}
    for i in chunk:
        try:
            one = retriever.embed([queries[i][1]], names)
            out[i] = {a: one[a][0] for a in names}
        except (BadInputError, FileNotFoundError) as e:
            skipped.append({"query": queries[i][0], "error": str(e)})
    return out


def write_hits(out: str | Path, results: Sequence[Tuple[str, List[Hit]]], skipped: Sequence[dict] = ()) -> None:
    """hits.jsonl: one line per query ({query, hits: [...]}, and {query, skipped: why} per skipped one);
    hits.csv: one row per hit."""
    out = Path(out)
    if out.suffix == ".jsonl":
        text = "".join(json.dumps({"query": q, "hits": [h.__dict__ for h in hits]}) + "\n" for q, hits in results)
        text += "".join(json.dumps({"query": s["query"], "skipped": s["error"]}) + "\n" for s in skipped)
    elif out.suffix == ".csv":
        columns = sorted({c for _, hits in results for h in hits for c in h.values})
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["query", "rank", "key", "score", "location", *columns])
        for q, hits in results:
            for h in hits:
                w.writerow([q, h.rank, h.key, f"{h.score:.6f}", h.location, *(h.values.get(c) for c in columns)])
        text = buf.getvalue()
    else:
        raise ConfigError(f"--out {out}: write .jsonl or .csv")
    atomic_write_text(out, text)


def batch_search(run: Optional[str], index: str, queries_from: str, out: str, weights: Dict[str, float], k: int,
                 where: Optional[dict], allow_other_model: bool, skip_bad: bool = False) -> Tuple[int, float]:
    if Path(out).suffix not in (".jsonl", ".csv"):
        raise ConfigError(f"--out {out}: write .jsonl or .csv")
    queries = read_queries(queries_from)
    if run is None and any(isinstance(q, Path) for _, q in queries):
        raise ConfigError("image queries need --run RUN (the model that embeds them)")
    retriever = Retriever.from_run(run, index, allow_other_model) if run else Retriever.from_index(index)
    t0 = time.time()
    results, skipped = search_many(retriever, queries, weights, k, where, skip_bad)
    seconds = time.time() - t0
    write_hits(out, results, skipped)
    for s in skipped:
        print(f"skipped {s['query']}: {s['error']}", file=sys.stderr)
    print(f"{len(results)} queries in {seconds:.2f} s ({len(results) / max(seconds, 1e-9):.1f} queries/s; model "
          f"loaded once, images embedded {BATCH} at a time) -> {out}"
          + (f"; {len(skipped)} skipped (listed above{' and in ' + out if out.endswith('.jsonl') else ''})"
             if skipped else ""), file=sys.stderr)
    return len(results), seconds


def print_hits(run: Optional[str], index: str, image: Optional[str], key: Optional[str], weights: Dict[str, float],
               k: int, where: dict, allow_other_model: bool) -> List[Hit]:
    """One query with --attributes or --where: the table `mclfir search` prints."""
    if image is not None and run is None:
        raise ConfigError("--image needs --run RUN (the model that embeds the query)")
    if image is not None:
        check_image_file(Path(image), "--image")
    retriever = Retriever.from_run(run, index, allow_other_model) if run else Retriever.from_index(index)
    hits = retriever.search(Path(image) if image is not None else key, weights, k, where)
    query = image if image is not None else key
    columns = list(weights)
    print(f"query: {query}  | " + " + ".join(f"{w:g} x {a}" for a, w in weights.items())
          + (f"  | where {where}" if where else "") + f", top {len(hits)}")
    print(f"{'rank':>4}  {'score':>7}  {'key':30s}  " + "  ".join(columns))
    for h in hits:
        print(f"{h.rank:>4}  {h.score:7.4f}  {h.key:30s}  " + "  ".join(str(h.values.get(c, "-")) for c in columns))
    return hits

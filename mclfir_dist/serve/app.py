"""The FastAPI app: routes, error replies and the page. Nothing is loaded per request: the model, the
indexes, their vectors and label columns are read at start-up."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BadInputError, ConfigError
from ..retrieval.api import Retriever
from ..version import __version__
from .batcher import EmbedBatcher
from ..retrieval.images import CatalogueImages, image_type
from .inputs import (LOOPBACK, BodyLimit, HostCheck, HTTPError, Limits, SearchRequest, allowed_hosts,
                     check_key, read_search)
from .metrics import RequestMetrics, ServiceMetrics, access_logger
from .schemas import ERRORS, AttributesReply, HealthReply, Item, Items, SearchReply, search_body

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("static") / "index.html"
MAX_LABEL_VALUES = 500   # per column in GET /attributes: enough for any filter menu


def build_app(retriever: Retriever, limits: Limits = Limits(), hosts: Optional[frozenset] = None,
              access_log: Optional[str] = None, images_root: Optional[str] = None) -> FastAPI:
    """The service over a Retriever that has an index (and a model, for uploads); with `hosts`, only requests
    whose Host header names one of them are answered."""
    cat = retriever.catalogue
    retriever.max_pixels = min(retriever.max_pixels or limits.max_pixels, limits.max_pixels)
    retriever.max_pixels_name = "mclfir serve --max-pixels"
    images = CatalogueImages(cat, images_root)
    metrics = ServiceMetrics()
    metrics.items.set(len(cat._row))
    batcher = EmbedBatcher(retriever.embed_tensors, retriever.attributes, report=metrics.batch) \
        if retriever.attributes else None
    _warm(retriever)

    async def lifespan(app):
        if batcher:
            batcher.start()
        yield
        if batcher:
            await batcher.stop()

    app = FastAPI(title="mclfir serve", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.started, app.state.searches = time.time(), 0
    _errors(app)
    _routes(app, retriever, images, batcher, limits, metrics)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, upload_limit=limits.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics, access=access_logger(access_log) if access_log else None)   # outside the limits: refusals are counted too
    if hosts is not None:
        app.add_middleware(HostCheck, hosts=hosts)   # added last: runs first (a foreign Host is not counted)
    return app


def _warm(retriever: Retriever) -> None:
    """Read every index, its vectors and label columns now, so requests only read shared state."""
    cat = retriever.catalogue
    for a in cat.meta["attributes"]:
        cat.index(a)
        cat.matrix(a)
        if a in retriever.attributes:
            retriever.check_model(a)
    for column in cat.labels:
        cat.label_array(column)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())[:500]}, status_code=status)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def http_error(request, e: HTTPError):
        return _error(e.status, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request, e):
        text = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed here"}
        return _error(e.status_code, text.get(e.status_code, e.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        first = e.errors()[0] if e.errors() else {}
        return _error(400, f"{'.'.join(str(x) for x in first.get('loc', []))}: {first.get('msg', 'invalid')}")

    @app.exception_handler(ConfigError)
    async def config_error(request, e):
        return _error(400, str(e))

    @app.exception_handler(BadInputError)
    async def bad_input(request, e):
        return _error(422, str(e))

    @app.exception_handler(Exception)
    async def internal(request, e):
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal error ({type(e).__name__}); the server log has the details")


def _routes(app: FastAPI, retriever: Retriever, images: CatalogueImages, batcher: Optional[EmbedBatcher],
            limits: Limits, metrics: ServiceMetrics) -> None:
    cat = retriever.catalogue

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/health", response_model=HealthReply)
    async def health():
        return {"status": "ok", "version": __version__, "items": len(cat._row), "source": retriever.source,
                "uptime_s": round(time.time() - app.state.started, 1), "searches": app.state.searches,
                "embedding": batcher.stats() if batcher else None}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics():
        """Prometheus exposition: requests by route and status, latency, embedding batches, queue depth."""
        body, kind = metrics.exposition()
        return Response(body, media_type=kind)

    labels = {c: sorted({str(v) for v in vals if v is not None})[:MAX_LABEL_VALUES] for c, vals in cat.labels.items()}

    @app.get("/attributes", response_model=AttributesReply, responses=ERRORS)
    async def attributes():
        return {"attributes": list(cat.meta["attributes"]), "uploads": batcher is not None, "labels": labels,
                "items": len(cat._row), "embed_dim": {a: cat.index(a).d for a in cat.meta["attributes"]},
                "limits": {"max_k": limits.max_k, "max_offset": limits.max_offset,
                           "max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels}}

    @app.get("/items", response_model=Items, responses=ERRORS)
    async def items(offset: int = 0, limit: int = 24, prefix: str = "", sample: int = 0, seed: int = 0):
        """Catalogue items in key order from `offset`, those whose key starts with `prefix` (autocomplete), or
        a seeded random `sample`."""
        if not (0 <= limit <= 500 and offset >= 0 and 0 <= sample <= 500):
            raise HTTPError(400, "limit and sample are 0-500, offset at least 0")
        keys = [k for k in cat.keys if k and k.startswith(prefix)]
        chosen = random.Random(seed).sample(keys, min(sample, len(keys))) if sample else keys[offset:offset + limit]
        return {"total": len(keys), "items": [_item(cat, k) for k in chosen]}

    @app.get("/items/{rest:path}", response_model=Item, responses={**ERRORS, 200: {
        "description": "the item, or its image bytes for /items/{key}/image",
        "content": {"image/jpeg": {}, "image/png": {}, "image/gif": {}, "image/webp": {}}}})
    async def item(rest: str):
        if rest.endswith("/image") and rest not in cat._row:
            key = check_key(cat, rest[:-len("/image")])
            data, kind = await run_in_threadpool(_image_or_none, images, key)
            if kind is None:   # only image bytes leave the service, and no path is named
                raise HTTPError(404, f"item {key!r} has no image to serve")
            return Response(data, media_type=kind,
                            headers={"cache-control": "max-age=3600", "x-content-type-options": "nosniff"})
        return _item(cat, check_key(cat, rest))
    _search_route(app, retriever, batcher, limits, metrics)


def _search_route(app: FastAPI, retriever: Retriever, batcher: Optional[EmbedBatcher], limits: Limits,
                  metrics: ServiceMetrics) -> None:
    cat = retriever.catalogue

    @app.post("/search", response_model=SearchReply, responses=ERRORS, openapi_extra=search_body())
    async def search(request: Request):
        """Rank the catalogue for a key, an uploaded image or a vector by the weighted sum of per-attribute
        cosine similarities; `where` filters by any label column; `offset` pages."""
        req = await read_search(request, limits, cat)
        started = time.perf_counter()
        hits, query = await _search(retriever, batcher, req, limits)
        app.state.searches += 1
        metrics.searches.labels("key" if req.key else "vector" if req.vector else "image").inc()
        hits = hits[req.offset:]
        # plain JSON types already: JSONResponse skips FastAPI's per-field encoder (0.5 ms a search)
        return JSONResponse({"query": query, "attributes": req.weights, "k": req.k, "offset": req.offset,
                             "where": req.where, "seconds": round(time.perf_counter() - started, 4),
                             "hits": [{"rank": h.rank, "key": h.key, "score": round(h.score, 6),
                                       "scores": {a: round(v, 6) for a, v in h.scores.items()},
                                       "values": h.values, "image": f"/items/{h.key}/image"} for h in hits]})


def _image_or_none(images: CatalogueImages, key: str) -> tuple:
    """(bytes, media type) of an item's image, or (b"", None) when it is missing or not an image (the server
    log names the path; the reply does not)."""
    try:
        data = images.read(key)
    except FileNotFoundError as e:
        log.warning("GET image of %r: %s", key, e)
        return b"", None
    kind = image_type(data)
    if kind is None:
        log.warning("GET image of %r: the file its location names is not an image; refused", key)
    return data, kind


def _item(cat, key: str) -> dict:
    row = cat.row(key)
    return {"key": key, "values": {c: cat.label(c, row) for c in cat.labels}, "image": f"/items/{key}/image"}


async def _search(retriever: Retriever, batcher: Optional[EmbedBatcher], req: SearchRequest, limits: Limits):
    """(hits of the first offset + k, the query's description). Key and vector queries use the index's vectors;
    uploads are embedded in batches."""
    n = req.offset + req.k
    if req.key is not None:
        hits = await run_in_threadpool(_one_thread_search, retriever, req.key, req.weights, n, req.where)
        return hits, _item(retriever.catalogue, req.key)
    if req.vector is not None:
        import numpy as np
        vectors = {a: np.asarray(v, dtype=np.float32) for a, v in req.vector.items()}
        hits = await run_in_threadpool(_one_thread_search, retriever, vectors, req.weights, n, req.where)
        return hits, {"key": None, "values": {}, "image": None, "vector": True}
    if batcher is None:
        raise HTTPError(400, "this service has no model (started from an index only): search by key or vector")
    missing = [a for a in req.weights if a not in retriever.attributes]
    if missing:
        raise HTTPError(400, f"the model has no head for {missing[0]!r}: uploads can use "
                             f"{', '.join(retriever.attributes)}")
    try:
        x = await run_in_threadpool(retriever.prepare, req.image)
    except BadInputError as e:
        raise HTTPError(422, f"image: {str(e).removeprefix('the image bytes: ')}") from None
    vectors = await batcher.embed(x)
    hits = await run_in_threadpool(_one_thread_search, retriever, {a: vectors[a] for a in req.weights},
                                   req.weights, n, req.where)
    return hits, {"key": None, "values": {}, "image": None, "upload_bytes": len(req.image)}


def _one_thread_search(retriever: Retriever, *args):
    """One FAISS (OpenMP) thread per search, set in the worker thread itself (the setting is per thread):
    concurrent requests run in parallel in the thread pool instead, and idle OpenMP threads no longer spin
    on the cores the requests need. Measured at 10k items: 1.26 -> 0.55 ms a key search through the pool."""
    import faiss
    faiss.omp_set_num_threads(1)
    return retriever.search(*args)


def serve(run: Optional[str], index: str, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          allow_other_model: bool = False, access_log: Optional[str] = None, extra_hosts=(),
          images_root: Optional[str] = None) -> None:
    """`mclfir serve`: load once, then answer until SIGINT/SIGTERM."""
    import socket
    import uvicorn
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:   # before minutes of loading
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn: a TIME_WAIT port is free
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server? try --port)") \
                from None
    retriever = Retriever.from_run(run, index, allow_other_model) if run else Retriever.from_index(index)
    hosts = allowed_hosts(host, extra_hosts)
    if images_root and not Path(images_root).is_dir():
        raise ConfigError(f"--images-root {images_root}: not a folder")
    app = build_app(retriever, limits, hosts, access_log, images_root)
    if host not in LOOPBACK:
        log.warning("listening on %s: reachable from other machines, and the service has no authentication", host)
    if hosts is None:
        log.warning("bound to every address with no --allowed-hosts: any Host header is answered")
    print(f"serving {len(retriever.catalogue._row)} items ({', '.join(retriever.catalogue.meta['attributes'])}) "
          f"from {index} on http://{'[' + host + ']' if ':' in host else host}:{port}/  (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)   # ours: RequestMetrics

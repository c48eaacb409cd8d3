"""Prometheus metrics for `mclfir serve` (prometheus_client), served at GET /metrics: requests by route and
status, latency by route, embedding batch sizes, seconds and queue depth, searches by kind. Each app has its
own registry, so several services in one process (the tests) count apart."""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mclfir_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=r)
        self.latency = Histogram("mclfir_request_seconds", "Time to answer a request", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.searches = Counter("mclfir_searches", "Searches answered", ["query"], registry=r)   # key/image/vector
        self.batch_size = Histogram("mclfir_embed_batch_size", "Uploaded images embedded in one model call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.embed_seconds = Histogram("mclfir_embed_seconds", "Seconds of one embedding batch (model call)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("mclfir_embed_queue_depth", "Uploads waiting to be embedded", registry=r)
        self.items = Gauge("mclfir_catalogue_items", "Items in the served catalogue", registry=r)

    def batch(self, size: int, seconds: float, waiting: int) -> None:
        """The batcher's report after each model call."""
        self.batch_size.observe(size)
        self.embed_seconds.observe(seconds)
        self.queue_depth.set(waiting)

    def exposition(self) -> tuple:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: counts every answered request by its route's template (not its path: keys would make
    one series each) and status, and times it. Requests refused before routing count as route "-". With an
    `access` logger, writes one access-log line per request (ACCESS_FORMAT, docs/serve.md)."""

    def __init__(self, app, metrics: ServiceMetrics, access=None):
        self.app, self.metrics, self.access = app, metrics, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        sent = [0]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "-")
            self.metrics.requests.labels(route, scope.get("method", ""), str(status[0])).inc()
            seconds = time.perf_counter() - started
            self.metrics.latency.labels(route).observe(seconds)
            if self.access is not None:
                self.access.info(access_line(scope, status[0], sent[0], seconds, route))


ACCESS_FORMAT = "TIME CLIENT \"METHOD PATH\" STATUS BYTES MS route=ROUTE"


def access_line(scope, status: int, size: int, seconds: float, route: str) -> str:
    """One request, ACCESS_FORMAT: the path without its query string (it may carry a key; it is short)."""
    client = (scope.get("client") or ("-", 0))[0]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = scope.get("path", "")[:200].replace('"', "%22")
    return f'{stamp} {client} "{scope.get("method", "")} {path}" {status} {size} {1000 * seconds:.1f} route={route}'


def access_logger(target: str):
    """'-' = stderr, else a file appended to: a logger of its own, so --log-level does not silence it."""
    import logging
    import sys
    logger = logging.getLogger("mclfir.access")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger

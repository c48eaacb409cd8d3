"""What a request may bring, checked before any work: the body size (checked as it streams in, so a huge
upload is never held), the image type by magic bytes, keys, attributes, k and filters. Every refusal is an
`HTTPError`: a status and one line, which app.py sends as {"error": "..."}."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from starlette.datastructures import UploadFile
from starlette.requests import Request

from ..errors import ConfigError
from ..retrieval.api import check_weights
from ..retrieval.batch import parse_weights, parse_where
from ..retrieval.index import CatalogueIndex
from ..retrieval.images import media_type

PATH_CHARACTERS = ("/", "\\", "..", "\x00")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, " ".join(str(message).split())[:500]


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_k: int = 100
    max_fields: int = 16
    max_offset: int = 1000   # paging: hits past offset + k are never ranked

    @property
    def max_body_bytes(self) -> int:   # the upload plus the form's other fields and boundaries
        return self.max_upload_bytes + 64 * 1024


@dataclass
class SearchRequest:
    weights: Dict[str, float]
    k: int
    where: Dict[str, List[str]] = field(default_factory=dict)
    key: Optional[str] = None
    image: Optional[bytes] = None
    vector: Optional[Dict[str, List[float]]] = None
    offset: int = 0


class BodyLimit:
    """ASGI middleware: a declared Content-Length over the limit is answered 413 at once; an undeclared
    (chunked) body is counted as it arrives and stopped at the limit."""

    def __init__(self, app, limit: int, upload_limit: int = 0):
        self.app, self.limit = app, limit
        # the message states the upload limit /attributes publishes (the body may hold 64 KiB of form more)
        self.message = (f"the upload is over the {upload_limit:,}-byte limit (mclfir serve --max-upload-mb)"
                        if upload_limit else f"the request body is over the {limit:,}-byte limit")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_error(send, 413, self.message if declared.isdigit() else "Content-Length is not a number")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPError(413, self.message)
            return message

        return await self.app(scope, counted, send)


LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")


def host_name(header: str) -> str:
    """The host of a Host header, without its port: 'a.b:80' -> 'a.b', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts(bound: str, extra=()) -> Optional[frozenset]:
    """The Host names a server bound to `bound` answers: the bound address (every loopback name when it is a
    loopback one) and `extra` (--allowed-hosts). None, for a server bound to every address with no list,
    answers any (it cannot know the names it is reached by)."""
    names = {host_name(h) for h in extra if h.strip()}
    if bound in ANY_ADDRESS and not names:
        return None
    if bound not in ANY_ADDRESS:
        names |= set(LOOPBACK) if bound in LOOPBACK else {host_name(bound)}
    return frozenset(names)


class HostCheck:
    """ASGI middleware: a request whose Host header is not one the server answers to is refused (421) before
    any route runs; a page elsewhere that rebinds its own name to 127.0.0.1 cannot read this service."""

    def __init__(self, app, hosts: frozenset):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_name(header) not in self.hosts:
            return await _send_error(send, 421, f"Host {header[:100]!r} is not served here (allowed: "
                                     f"{', '.join(sorted(self.hosts))}; mclfir serve --allowed-hosts adds names)")
        return await self.app(scope, receive, send)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def check_key(catalogue: CatalogueIndex, key) -> str:
    """A catalogue key, or 400 (path characters: nothing is ever read by a path from a request) or 404."""
    if not isinstance(key, str) or not key or len(key) > 255:
        raise HTTPError(400, "key: give a catalogue key (1-255 characters)")
    if key not in catalogue._row:
        if any(c in key for c in PATH_CHARACTERS) or key.startswith("."):
            raise HTTPError(400, f"key {key[:80]!r} is not a catalogue key: paths are not accepted, images are "
                                 "served by catalogue key only")
        raise HTTPError(404, f"no catalogue item with key {key[:80]!r}")
    return key


def check_image(data: bytes, limits: Limits) -> bytes:
    if len(data) > limits.max_upload_bytes:
        raise HTTPError(413, f"the upload is over the {limits.max_upload_bytes:,}-byte limit (mclfir serve "
                             "--max-upload-mb)")
    if not data:
        raise HTTPError(400, "image: the upload is empty")
    if media_type(data) is None:
        raise HTTPError(415, "image: not a JPEG, PNG, GIF or WebP file (checked by its first bytes)")
    return data


async def read_search(request: Request, limits: Limits, catalogue: CatalogueIndex) -> SearchRequest:
    """POST /search as multipart/form-data or url-encoded fields (key or image, attributes, k, where), or JSON
    ({"key", "attributes": "colour:1,pattern:0.5" or {name: weight}, "k", "where": "col=val" or {col: val}})."""
    fields = await _fields(request, limits)
    try:
        weights = _weights(fields.get("attributes"))
        where = _where(fields.get("where"))
    except ConfigError as e:
        raise HTTPError(400, str(e).replace("--", "")) from None
    unknown = [a for a in weights if a not in catalogue.meta["attributes"]]
    if unknown:
        raise HTTPError(400, f"unknown attribute {unknown[0]!r}: the catalogue has "
                             f"{', '.join(catalogue.meta['attributes'])}")
    bad = [c for c in where if c not in catalogue.labels]
    if bad:
        raise HTTPError(400, f"where: unknown label column {bad[0]!r} (the catalogue has: "
                             f"{', '.join(catalogue.labels) or 'none'})")
    k = _k(fields.get("k", 10), limits)
    offset = _offset(fields.get("offset", 0), limits)
    key, image, vector = fields.get("key") or None, fields.get("image"), fields.get("vector")
    if sum(x is not None for x in (key, image, vector)) != 1:
        raise HTTPError(400, "give exactly one of key (a catalogue item), image (an upload) or vector "
                             "({attribute: embedding}, JSON only)")
    if vector is not None:
        return SearchRequest(weights, k, where, vector=_vectors(vector, weights), offset=offset)
    if image is not None:
        data = await image.read(limits.max_upload_bytes + 1) if isinstance(image, UploadFile) else None
        if data is None:
            raise HTTPError(400, "image: send the file as a multipart upload")
        return SearchRequest(weights, k, where, image=check_image(data, limits), offset=offset)
    return SearchRequest(weights, k, where, key=check_key(catalogue, key), offset=offset)


def _vectors(spec, weights: Dict[str, float]) -> Dict[str, List[float]]:
    """{attribute: [numbers]} with one vector per ranked attribute (sizes are checked against the index)."""
    if not isinstance(spec, dict) or not all(isinstance(v, list) for v in spec.values()):
        raise HTTPError(400, "vector: give {attribute: [numbers]}, one per attribute ranked by")
    missing = [a for a in weights if a not in spec]
    if missing:
        raise HTTPError(400, f"vector: no vector for {missing[0]!r} (ranked by {', '.join(weights)})")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for a in weights for x in spec[a]):
        raise HTTPError(400, "vector: every entry must be a number")
    return {a: [float(x) for x in spec[a]] for a in weights}


async def _fields(request: Request, limits: Limits) -> dict:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the JSON body must be an object")
        return body
    if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise HTTPError(415, "send multipart/form-data, application/x-www-form-urlencoded or application/json")
    try:
        form = await request.form(max_files=1, max_fields=limits.max_fields, max_part_size=64 * 1024)
    except HTTPError:
        raise
    except Exception as e:   # starlette's parser: malformed multipart, too many fields or files
        raise HTTPError(400, f"the form could not be read ({getattr(e, 'detail', None) or e})") from None
    return dict(form)


def _weights(spec) -> Dict[str, float]:
    if isinstance(spec, dict):
        try:
            weights = {str(a): float(w) for a, w in spec.items()}
        except (TypeError, ValueError):
            raise HTTPError(400, f"attributes: weights must be numbers, got {str(spec)[:80]}") from None
    elif isinstance(spec, list):
        weights = {str(a): 1.0 for a in spec}
    elif isinstance(spec, str) and spec.strip():
        weights = parse_weights(spec)
    else:
        weights = {}
    if not weights:
        raise HTTPError(400, "attributes: give at least one, e.g. colour or colour:1,pattern:0.5")
    if any(w != w or abs(w) == float("inf") for w in weights.values()):
        raise HTTPError(400, "attributes: weights must be finite numbers")
    try:
        return check_weights(weights)
    except ConfigError as e:
        raise HTTPError(400, f"attributes: {e}") from None


def _where(spec) -> Dict[str, List[str]]:
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        return {str(c): [str(x) for x in (v if isinstance(v, list) else [v])] for c, v in spec.items()}
    if not isinstance(spec, str):
        raise HTTPError(400, "where: COLUMN=VALUE,... or {column: value}")
    return parse_where(spec)


def _offset(value, limits: Limits) -> int:
    return _whole("offset", value, 0, limits.max_offset)


def _k(value, limits: Limits) -> int:
    return _whole("k", value, 1, limits.max_k)


def _whole(name: str, value, low: int, high: int) -> int:
    """A whole number in [low, high] from a form or JSON field (1.5, true and "ten" are refused)."""
    try:
        n = int(value)
        if isinstance(value, (float, bool)):
            raise ValueError
    except (TypeError, ValueError):
        raise HTTPError(400, f"{name} must be a whole number, got {str(value)[:40]!r}") from None
    if not low <= n <= high:
        raise HTTPError(400, f"{name} must be between {low} and {high}, got {n}")
    return n

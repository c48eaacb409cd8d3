"""Shard sets where users keep them: `data.shards` (or an increment's `shards`) may be an http(s):// URL, or
any fsspec URL whose package is installed (s3:// with s3fs, gs:// with gcsfs). The manifest is read from there;
each shard (and its DALI index) is fetched once into a local cache (`data.cache_dir`), in chunks (bounded
memory), checked against the manifest (size, then sample count, as locally), and renamed into place; every
loader then reads the verified local copy, so the second epoch and a resumed run read from the cache.

Transient faults (connection refused or reset, timeouts, HTTP 5xx and 429) are retried with exponential
backoff, a partial download continuing where it stopped (HTTP Range); they are counted. A permanent one
(403, 404) stops with one line naming the URL. A URL that carries a password is refused: credentials come
from each backend's own environment and files, never from config.yaml."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import urlsplit

from ..errors import ConfigError, ShardError

log = logging.getLogger("mclfir")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
CHUNK = 1 << 20
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mclfir" / "shards"
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


def is_url(root) -> bool:
    return bool(URL.match(str(root)))


@dataclass
class Settings:
    cache_dir: str = ""
    retries: int = 8
    backoff_s: float = 0.5
    cache_max_gb: float = 0.0


SETTINGS = Settings()   # data.cache_dir & co., set by `configure` from the run's config before any shard is read
STATS: Dict[str, dict] = {}   # url -> {manifest_sha256, cache, downloaded_bytes, retries}: results.json


def configure(cache_dir: str, retries: int, cache_max_gb: float) -> None:
    SETTINGS.cache_dir, SETTINGS.retries, SETTINGS.cache_max_gb = cache_dir, retries, cache_max_gb


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        raise ConfigError(f"{redact(url)}: a shard URL must not carry a password (it would be saved in config.yaml "
                          "and every checkpoint); use the backend's own credentials (~/.netrc, AWS_* variables, "
                          "~/.aws/credentials)")
    if parts.scheme not in ("http", "https"):
        try:
            import fsspec
            fsspec.get_filesystem_class(parts.scheme)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"{url}: no reader for {parts.scheme}:// here ({e}); http(s) needs nothing, s3:// "
                              "needs `pip install s3fs`") from None
    return url.rstrip("/") + "/"


def redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def mirror_dir(url: str) -> Path:
    """The cache folder of one shard set: its URL's hash (a readable name beside it in SOURCE)."""
    base = Path(SETTINGS.cache_dir) if SETTINGS.cache_dir else DEFAULT_CACHE
    return base / hashlib.sha256(url.encode()).hexdigest()[:16]


def fetch_manifest(url: str) -> Path:
    """The set's manifest.json, read from the URL every time (a changed set must be seen), into its cache."""
    url = check_url(url)
    local = mirror_dir(url)
    local.mkdir(parents=True, exist_ok=True)
    (local / "SOURCE").write_text(redact(url) + "\n")
    data = _read_all(url + "manifest.json", url)
    tmp = local / f".manifest.json.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, local / "manifest.json")
    STATS.setdefault(url, {"downloaded_bytes": 0, "retries": 0, "from_cache": 0})
    STATS[url].update(manifest_sha256=hashlib.sha256(data).hexdigest(), cache=str(local))
    return local


def fetch_file(url: str, name: str, size: Optional[int]) -> Path:
    """One file of the set into its cache (kept when it is there with the manifest's size), else fetched."""
    url = check_url(url)
    local = mirror_dir(url) / name
    stats = STATS.setdefault(url, {"downloaded_bytes": 0, "retries": 0, "from_cache": 0})
    if local.is_file() and (size is None or local.stat().st_size == size):
        stats["from_cache"] += 1
        os.utime(local)   # recently used: the last to be evicted
        return local
    tmp = local.with_name(f".{local.name}.{os.getpid()}.part")   # per process: ranks may share one cache
    _download(url + name, tmp, url)
    got = tmp.stat().st_size
    if size is not None and got != size:   # kept: the manifest check names it (or skip_bad_shards leaves it out)
        log.warning("%s%s: %d bytes, the manifest says %d: the shard changed since the manifest was written",
                    redact(url), name, got, size)
    os.replace(tmp, local)
    stats["downloaded_bytes"] += got
    evict(keep=mirror_dir(url))
    return local


def _read_all(target: str, root: str) -> bytes:
    import io
    buf = io.BytesIO()
    _with_retries(target, root, lambda offset: _stream(target, offset, buf.write), lambda: buf.tell())
    return buf.getvalue()


def _download(target: str, tmp: Path, root: str) -> None:
    """Into `tmp`, appending: a retry continues from the bytes already there."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"")
    with open(tmp, "ab") as f:
        _with_retries(target, root, lambda offset: _stream(target, offset, f.write), lambda: f.tell())


def _with_retries(target: str, root: str, attempt, position) -> None:
    for n in range(SETTINGS.retries + 1):
        try:
            return attempt(position())
        except PermanentError as e:
            raise ShardError(f"{redact(target)}: {e}") from None
        except TransientError as e:
            if n == SETTINGS.retries:
                raise ShardError(f"{redact(target)}: still failing after {n} retries ({e})") from None
            STATS.setdefault(root, {"downloaded_bytes": 0, "retries": 0, "from_cache": 0})["retries"] += 1
            wait = min(30.0, SETTINGS.backoff_s * 2 ** n)
            log.warning("%s: %s; retry %d/%d in %.1f s", redact(target), e, n + 1, SETTINGS.retries, wait)
            time.sleep(wait)


class TransientError(Exception):
    pass


class PermanentError(Exception):
    pass


def _stream(target: str, offset: int, write) -> None:
    if target.startswith(("http://", "https://")):
        return _stream_http(target, offset, write)
    import fsspec
    try:
        with fsspec.open(target, "rb") as f:
            f.seek(offset)
            for chunk in iter(lambda: f.read(CHUNK), b""):
                write(chunk)
    except FileNotFoundError:
        raise PermanentError("not found") from None
    except PermissionError as e:
        raise PermanentError(f"access denied ({e})") from None
    except (OSError, TimeoutError) as e:
        raise TransientError(f"{type(e).__name__}: {e}") from None


def _stream_http(target: str, offset: int, write) -> None:
    import urllib.error
    import urllib.request
    request = urllib.request.Request(target, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            if offset and r.status != 206:   # the server ignored Range: start over is not possible here
                raise TransientError(f"no range support (HTTP {r.status}) after {offset} bytes")
            expected, got = r.length, 0   # a server that goes away mid-body ends the stream early, no error
            for chunk in iter(lambda: r.read(CHUNK), b""):
                write(chunk)
                got += len(chunk)
            if expected is not None and got < expected:
                raise TransientError(f"the connection closed after {got} of {expected} bytes")
    except urllib.error.HTTPError as e:
        if e.code in TRANSIENT_HTTP:
            raise TransientError(f"HTTP {e.code} {e.reason}") from None
        if e.code == 416 and offset:   # asked past the end: the download was complete
            return
        raise PermanentError(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        raise TransientError(f"{type(getattr(e, 'reason', e)).__name__}: {getattr(e, 'reason', e)}") from None


def evict(keep: Path) -> None:
    """Above data.cache_max_gb, delete the least recently used files of other shard sets in the cache."""
    if SETTINGS.cache_max_gb <= 0:
        return
    base, limit = keep.parent, SETTINGS.cache_max_gb * 1e9
    files = [p for p in base.glob("*/*") if p.is_file() and not p.name.startswith(".")]
    total = sum(p.stat().st_size for p in files)
    for p in sorted((p for p in files if p.parent != keep and p.name != "manifest.json"),
                    key=lambda p: p.stat().st_mtime):
        if total <= limit:
            break
        total -= p.stat().st_size
        p.unlink(missing_ok=True)
        log.info("data.cache_max_gb: evicted %s", p)


def stats_for_results() -> Dict[str, dict]:
    return json.loads(json.dumps({redact(u): s for u, s in STATS.items()}))


def upload(local: Path, url: str) -> Dict[str, int]:
    """A built shard set to a URL: any old manifest removed first, every shard and index file, then the
    manifest last, so a reader never takes a half-written set for a complete one. HTTP needs a server that
    takes PUT and DELETE (nginx's dav_methods); other schemes go through fsspec. Returns {file: bytes}."""
    url = check_url(url)
    names = sorted(p.name for p in Path(local).iterdir() if p.is_file() and p.name != "manifest.json"
                   and not p.name.startswith("."))
    _with_retries(url + "manifest.json", url, lambda _: _delete(url + "manifest.json"), lambda: 0)
    sent = {}
    for name in [*names, "manifest.json"]:
        data = (Path(local) / name).read_bytes() if name == "manifest.json" else None
        _with_retries(url + name, url, lambda _, n=name, d=data: _put(url + n, Path(local) / n, d), lambda: 0)
        sent[name] = (Path(local) / name).stat().st_size
        log.info("uploaded %s%s (%d bytes)", redact(url), name, sent[name])
    return sent


def _put(target: str, path: Path, data: Optional[bytes]) -> None:
    if not target.startswith(("http://", "https://")):
        import fsspec
        try:
            fs, _, (where,) = fsspec.get_fs_token_paths(target)
            fs.put_file(str(path), where)
        except PermissionError as e:
            raise PermanentError(f"access denied ({e})") from None
        except OSError as e:
            raise TransientError(f"{type(e).__name__}: {e}") from None
        return
    import urllib.error
    import urllib.request
    with open(path, "rb") as f:   # streamed from the file: bounded memory
        request = urllib.request.Request(target, data=f, method="PUT",
                                         headers={"Content-Length": str(path.stat().st_size)})
        _http(request)


def _delete(target: str) -> None:
    if not target.startswith(("http://", "https://")):
        import fsspec
        fs, _, (where,) = fsspec.get_fs_token_paths(target)
        if fs.exists(where):
            fs.rm(where)
        return
    import urllib.request
    try:
        _http(urllib.request.Request(target, method="DELETE"))
    except PermanentError as e:
        if "404" not in str(e):   # nothing to remove
            raise


def _http(request) -> None:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            r.read()
    except urllib.error.HTTPError as e:
        if e.code in TRANSIENT_HTTP:
            raise TransientError(f"HTTP {e.code} {e.reason}") from None
        raise PermanentError(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        raise TransientError(f"{type(getattr(e, 'reason', e)).__name__}: {getattr(e, 'reason', e)}") from None

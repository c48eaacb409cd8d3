"""A catalogue item's image, found by its key only (the service, the contact sheet): the index's locations.txt says where (an image file for
catalogues embedded from a folder or CSV, a shard name for shard sets). Nothing in a request becomes a path."""
from __future__ import annotations

import tarfile
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..errors import BadInputError
from .index import CatalogueIndex
from ..utils.names import check_file_name, inside

# magic bytes -> media type: what an upload may be, and what an item's image is served as
MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
         (b"GIF89a", "image/gif"))


def media_type(data: bytes) -> Optional[str]:
    """The image type from the first bytes (JPEG, PNG, GIF, WebP), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((t for magic, t in MAGIC if data.startswith(magic)), None)


def check_image_file(path: Path, what: str) -> Path:
    """A query image path that names a regular file (a FIFO would block the read, a folder cannot be one)."""
    import os
    import stat
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: no such file: {path}") from None
    except OSError as e:
        raise BadInputError(f"{what}: {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "special"
        raise BadInputError(f"{what}: {path} is not a regular file ({kind})")
    return Path(path)


def image_type(data: bytes) -> Optional[str]:
    """The media type of bytes that are an image: known magic bytes and a header PIL parses (no pixel is
    decoded); None for anything else (a text file a hostile locations.txt points at)."""
    kind = media_type(data)
    if kind is None:
        return None
    import io
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None
    return kind if width > 0 and height > 0 else None


class CatalogueImages:
    """An item's image by key, through the index's locations.txt (a file, or a member of a shard). With `root`,
    only files under that folder are read, after resolving links (mclfir serve --images-root)."""

    def __init__(self, catalogue: CatalogueIndex, root: Optional[str | Path] = None):
        self.catalogue = catalogue
        self.root = Path(root).resolve() if root else None
        source = catalogue.meta.get("embed", {}).get("source", {})
        self.shards = Path(source["shards"]) if isinstance(source, dict) and source.get("shards") else None
        self._members: Dict[str, Dict[str, Tuple[int, int]]] = {}   # shard name -> {member: (offset, size)}
        self._lock = threading.Lock()

    def read(self, key: str) -> bytes:
        """The image bytes of catalogue item `key` (a key known to the catalogue)."""
        location = self.catalogue.locations[self.catalogue.row(key)]
        if not location:
            raise FileNotFoundError(f"item {key!r} has no recorded image location")
        if self.shards is not None:
            return self._from_shard(location, key)
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"the image of {key!r} is gone from {path}")
        if self.root is not None and not path.resolve().is_relative_to(self.root):
            raise FileNotFoundError(f"the image of {key!r} ({path}) is outside --images-root {self.root}: not read")
        return path.read_bytes()

    def _from_shard(self, shard: str, key: str) -> bytes:
        check_file_name(shard, f"{self.catalogue.folder / 'locations.txt'}", BadInputError)
        path = inside(self.shards, shard, f"{self.catalogue.folder / 'locations.txt'}", BadInputError)
        if self.root is not None and not path.resolve().is_relative_to(self.root):
            raise FileNotFoundError(f"the shard of {key!r} ({path}) is outside --images-root {self.root}: not read")
        with self._lock:
            if shard not in self._members:
                if not path.is_file():
                    raise FileNotFoundError(f"the shard of {key!r} is gone: {path}")
                with tarfile.open(path) as tar:
                    self._members[shard] = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
            members = self._members[shard]
        found = next((members[f"{key}.{ext}"] for ext in ("jpg", "jpeg", "png") if f"{key}.{ext}" in members), None)
        if found is None:
            raise FileNotFoundError(f"{path} holds no image for {key!r}")
        offset, size = found
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

"""Names that come from files (attribute and head names, shard and index file names, sample keys) become
file names and lines of other files. A crafted one must never reach outside its folder or inject a line:
each is checked against a safe pattern where it is read, and the error names the file it came from."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Type

# attribute / head names: they name files (<attribute>.npy, <attribute>.faiss)
ATTRIBUTE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,99}")
# a file inside its folder: no separator, no leading dot, no '..'
FILE_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_\-.]{0,199}")
# sample keys: one line of keys.txt and of a DALI index each; no whitespace, separator, dot or control byte
KEY = re.compile(r"[^\s/\\.\x00-\x1f\x7f]{1,255}")


def check_attribute(name, source: str, error: Type[Exception]) -> str:
    if not isinstance(name, str) or not ATTRIBUTE.fullmatch(name):
        raise error(f"{source}: attribute name {name!r} is not allowed (letters, digits, '_' and '-', at most 100, "
                    "starting with a letter or digit)")
    return name


def check_file_name(name, source: str, error: Type[Exception]) -> str:
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name) or ".." in name:
        raise error(f"{source}: file name {name!r} is not allowed (a plain name inside the folder: no path "
                    "separator, no leading dot, no '..')")
    return name


def check_key(key, source: str, error: Type[Exception]) -> str:
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise error(f"{source}: sample key {key!r} is not allowed (no whitespace, '/', '\\', '.' or control "
                    "characters, 1-255 characters)")
    return key


def inside(root: Path, name: str, source: str, error: Type[Exception]) -> Path:
    """root / name, refused unless it resolves inside root (a symlink pointing out included)."""
    path = (Path(root) / name)
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise error(f"{source}: {name!r} resolves outside {root}")
    return path

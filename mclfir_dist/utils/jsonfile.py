"""Reading JSON files a user may have damaged: one line naming the file and the field, in the error type of
the caller's domain (ShardError for shards, BadInputError for embeddings and indexes)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Tuple, Type, Union

Kinds = Union[type, Tuple[type, ...]]


def read_json(path: Path, kind: type, error: Type[Exception]) -> Any:
    """The file's JSON, which must be a `kind` (dict, list)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, kind):
        raise error(f"{path}: expected a JSON {kind.__name__}, got {type(data).__name__}")
    return data


def expect(value: Any, kind: Kinds, what: str, path: Path, error: Type[Exception]) -> Any:
    """`value` (the field `what` of `path`) must be a `kind`; a bool is not an int here."""
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise error(f"{path}: '{what}' must be {names}, got {type(value).__name__} {value!r:.60}")
    return value

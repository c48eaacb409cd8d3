"""Atomic file writes: a crash never leaves a half-written checkpoint or results file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import OutputError

_UMASK = os.umask(0)
os.umask(_UMASK)



def _output_error(path: Path, err: OSError) -> OutputError:
    hint = {28: "the disk is full", 122: "the disk quota is exceeded", 30: "the file system is read-only",
            13: "permission denied", 1: "operation not permitted"}.get(err.errno or 0, err.strerror or str(err))
    return OutputError(err.errno, f"cannot write {path}: {hint}")


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and prove a file can be written there, before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise _output_error(path, e) from None
    return path


class _Recording:
    """A file that remembers the OSError of a failed write: torch.save turns it into a RuntimeError
    ('unexpected pos'), which must still read as the full disk it was."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(fileobj)` on a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(path, e) from None
    recording = None
    try:
        with os.fdopen(fd, mode) as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should read like any written file
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)      # never a partial file left behind; the previous version of `path` stays
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise _output_error(path, e) from None
        if recording is not None and recording.error is not None:
            raise _output_error(path, recording.error) from None
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=_json_default)
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))

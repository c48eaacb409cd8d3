"""One writer per run directory. The main process holds an `fcntl` lock on RUN/.lock while it trains; the
file records its host and PID. A second writer is refused with one line naming the holder. The OS drops
the lock when its process dies, so a lock left by a dead run is simply taken over. Readers (`eval`,
`embed`, `report`) take no lock.

A forked child (a DataLoader worker) would inherit the locked descriptor and keep the lock for as long as it
outlives a killed parent, so every forked child closes it at once. The lock file is opened with O_NOFOLLOW:
a link planted at RUN/.lock is refused, never written through."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from ..errors import OutputError, RunLockedError
from ..runfolder.layout import RunFolder
from ..utils.io import ensure_writable_dir

_HELD: "set[RunLock]" = set()   # held until released, even by a caller that dropped the object


def _drop_in_child() -> None:
    """After a fork, in the child: close the inherited lock descriptors (closing a duplicate does not unlock
    the parent's; the child must never unlock or keep it)."""
    for lock in list(_HELD):
        if lock.fd >= 0:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = -1
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = RunFolder(self.run_dir).lock
        self.fd = -1

    def acquire(self) -> "RunLock":
        ensure_writable_dir(self.run_dir)   # a read-only or full place: one line naming it
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:   # e.g. a folder of that name, or a planted link
            why = "it is a symbolic link (refused: a lock is never written through a link)" \
                if e.errno == errno.ELOOP else e.strerror
            raise OutputError(f"cannot use the lock file {self.path}: {why}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(f"{self.run_dir} is being written by {holder} (lock file {self.path}): wait for "
                                 "that run to end or stop it, or give another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
        self.fd = fd
        _HELD.add(self)
        return self

    def release(self) -> None:
        _HELD.discard(self)
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

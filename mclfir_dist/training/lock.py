"""One writer per run directory. The main process holds an `fcntl` lock on RUN/.lock while it trains; the
file records its host and PID. A second writer is refused with one line naming the holder. The OS drops
the lock when its process dies, so a lock left by a dead run is simply taken over. Readers (`eval`,
`embed`, `report`) take no lock."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from ..errors import OutputError, RunLockedError
from ..utils.io import ensure_writable_dir

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd = -1

    def acquire(self) -> "RunLock":
        ensure_writable_dir(self.run_dir)   # a read-only or full place: one line naming it
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:   # e.g. a folder of that name
            raise OutputError(f"cannot use the lock file {self.path}: {e.strerror}") from None
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
        return self

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

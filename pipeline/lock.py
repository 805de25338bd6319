"""One writer per output: an advisory lock file that names its holder.

The lock is an ``fcntl.flock`` on a small file holding ``{"pid", "started_at", "host"}``.
The kernel drops a flock when its process dies, so a lock left by a killed run is
simply taken over by the next run (the stale holder info is overwritten).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from pipeline.errors import OutputError
from pipeline.records import utcnow


class OutputLock:
    def __init__(self, path: Path, wait: bool = False, poll_seconds: float = 0.5):
        self.path = path
        self.wait = wait
        self.poll_seconds = poll_seconds
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.wait:
                    holder = _describe_holder(fd)
                    os.close(fd)
                    raise OutputError(
                        f"another run is writing to this output ({holder}); "
                        "wait for it to finish or pass --wait"
                    ) from None
                time.sleep(self.poll_seconds)
        info = {"pid": os.getpid(), "started_at": utcnow().isoformat(), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started_at')}"
    except (OSError, ValueError):
        return "holder unknown"

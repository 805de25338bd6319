"""One writer per output: an advisory lock file that names its holder.

The lock is an ``fcntl.flock`` on a small file holding one JSON document: the holder
(``pid``, ``started_at``, ``host``) and, once the writer publishes it, its live state
(the run in progress and its counts, the last finished run). The kernel drops a flock
when its process dies, so a lock left by a killed run is simply taken over by the next
run (the stale document is overwritten). Readers (``status``) read the document and
probe whether the lock is still held; a document in an unlocked file is history.

The document is rewritten in place with one ``pwrite`` padded to its previous length
(no truncate), so a reader never sees an empty file; a reader that catches a torn
write retries.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline.errors import OutputError
from pipeline.records import rfc3339, utcnow

_MAX_DOC = 1 << 16


class OutputLock:
    def __init__(
        self, path: Path, wait: bool = False, poll_seconds: float = 0.5, wait_seconds: float | None = None
    ):
        self.path = path
        self.wait = wait
        self.poll_seconds = poll_seconds
        #: With ``wait``: give up after this long (None = wait forever).
        self.wait_seconds = wait_seconds
        self.holder: dict[str, Any] = {}
        self._fd: int | None = None
        self._written = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        fd = _open_lock_file(self.path)
        deadline = None if self.wait_seconds is None else time.monotonic() + self.wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                expired = deadline is not None and time.monotonic() >= deadline
                if not self.wait or expired:
                    holder = _describe_holder(fd)
                    os.close(fd)
                    if expired:
                        raise OutputError(
                            f"another run is still writing to this output after waiting {self.wait_seconds:g} s "
                            f"({holder}); try again later"
                        ) from None
                    raise OutputError(
                        f"another run is writing to this output ({holder}); wait for it to finish or pass --wait"
                    ) from None
                time.sleep(self.poll_seconds if deadline is None else max(0.0, min(self.poll_seconds, deadline - time.monotonic())))
        self._fd = fd
        self._written = os.fstat(fd).st_size
        self.holder = {"pid": os.getpid(), "started_at": rfc3339(utcnow()), "host": socket.gethostname()}
        self.publish({})

    def publish(self, state: dict[str, Any]) -> None:
        """Replace the document with holder info + ``state`` (lock held)."""
        if self._fd is None:
            return
        body = json.dumps(self.holder | state, default=str, sort_keys=True).encode()[:_MAX_DOC]
        padded = body.ljust(self._written)
        os.pwrite(self._fd, padded, 0)
        self._written = len(padded)

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


def _open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot create the lock file {path}: {exc.strerror}") from exc


def read_lock(path: Path) -> tuple[bool, dict[str, Any]]:
    """(held by a live writer, its document) without taking the lock for more than a probe."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False, {}
    try:
        held = False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            held = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        return held, _read_doc(fd)
    finally:
        os.close(fd)


def _read_doc(fd: int, attempts: int = 5) -> dict[str, Any]:
    for _ in range(attempts):
        try:
            doc = json.loads(os.pread(fd, _MAX_DOC, 0) or b"{}")
            return doc if isinstance(doc, dict) else {}
        except ValueError:
            time.sleep(0.01)  # a write in progress: read again
        except OSError:
            return {}
    return {}


def _describe_holder(fd: int) -> str:
    info = _read_doc(fd)
    if not info:
        return "holder unknown"
    run = info.get("run") or {}
    running = f"run {run['run_id']}, " if run.get("run_id") else ""
    return f"{running}pid {info.get('pid')} on {info.get('host')}, started {info.get('started_at')}"

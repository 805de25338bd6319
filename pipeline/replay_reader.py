"""Replay's reader: a second process reads and transforms the landing zone while this
one commits, so decoding and the warehouse's writes each get a core (threads would
share one interpreter lock).

The reader loads no pyarrow (pipeline.columns builds the tables' buffers): it sends one
message per part of a batch through a pipe, the part's outcomes, warnings and table
layouts pickled, then each table's buffers as they are, which the committing process
reads into one Arrow buffer per table and wraps without a copy. :func:`received` takes
them in a thread of the committing process while it commits, up to a byte budget ahead;
the caller gathers parts into batches.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pipeline import columns
from pipeline.batch import PendingCalls, PreparedBatch, prepare_batch
from pipeline.errors import EXIT_WAREHOUSE, StagesError
from pipeline.raw import WHOLE, BadLine, Share, read_landing_zone

#: How often the committing side looks up from a wait (to notice a stop signal).
POLL_SECONDS = 0.2
_PR_SET_PDEATHSIG = 1
_PIPE_BYTES = 1 << 20
_GC_THRESHOLD = 20_000
#: Each buffer of a table frame starts at a multiple of this (Arrow's fixed-width values stay aligned).
_ALIGN = 8


class ReaderError(StagesError):
    """The reader process failed or died."""

    exit_code = EXIT_WAREHOUSE


@dataclass
class ReplayMessage:
    """What the reader sends: bad lines read so far, then a batch (None once at the end)."""

    bad_lines: list[BadLine] = field(default_factory=list)
    batch: PreparedBatch | None = None
    #: On the last message: the reader's peak resident memory (KiB), where the OS tells it.
    peak_rss_kb: int | None = None


def read_batches(
    raw_dir: Path, batch_stages: int, batch_bytes: int, run_id: str, share: Share = WHOLE
) -> Iterator[ReplayMessage]:
    """The landing zone's calls of ``share`` as prepared batches, their tables as columns
    (pipeline.columns); the last message has no batch."""
    pending = PendingCalls(batch_stages, batch_bytes)
    bad_lines: list[BadLine] = []

    def message(batch: PreparedBatch | None) -> ReplayMessage:
        sent = ReplayMessage(bad_lines[:], batch)
        bad_lines.clear()
        return sent

    def prepared() -> PreparedBatch:
        return prepare_batch(pending.take(), run_id, as_columns=True)

    for fetch in read_landing_zone(raw_dir, bad_lines.append, share):
        if not pending.fits(fetch):
            yield message(prepared())
        pending.add(fetch)
        if pending.full():
            yield message(prepared())
    if pending:
        yield message(prepared())
    yield message(None)


#: A table's layout in a message: (name, rows, per column (part lengths, -1 for none; null count; checked)).
Layout = tuple[str, int, list[tuple[tuple[int, ...], int, bool]]]


class _FrameSender:
    """Sends messages as pipe frames: the pickled rest (table layouts included) through
    the connection, then each table's buffers, each padded to a multiple of _ALIGN."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def send(self, message: ReplayMessage) -> None:
        batch = message.batch
        tables: dict[str, columns.TableColumns] = {} if batch is None else batch.tables
        rest = (batch.outcomes, batch.warnings, batch.stages, batch.nbytes) if batch is not None else message.peak_rss_kb
        head = (message.bad_lines, rest, [_layout(table) for table in tables.values()])
        self.conn.send_bytes(pickle.dumps(head, protocol=pickle.HIGHEST_PROTOCOL))
        for name in list(tables):
            self._send_table(tables.pop(name))  # each table is let go once sent

    def _send_table(self, table: columns.TableColumns) -> None:
        fd = self.conn.fileno()
        for column in table.columns:
            for part in column.parts():
                if part:
                    _write_all(fd, memoryview(part))
                    if len(part) % _ALIGN:
                        _write_all(fd, memoryview(bytes(_ALIGN - len(part) % _ALIGN)))


def _layout(table: columns.TableColumns) -> Layout:
    return table.name, table.rows, [
        (tuple(-1 if part is None else len(part) for part in column.parts()), column.null_count, column.checked)
        for column in table.columns
    ]


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _read_table(fd: int, layout: Layout) -> Any:
    """One table frame written by :class:`_FrameSender`, read straight into one Arrow
    buffer, as an Arrow table sharing it."""
    import pyarrow as pa  # the committing process's (the reader never receives)

    name, rows, column_layouts = layout
    frame = pa.allocate_buffer(sum(_padded(n) for lengths, _, _ in column_layouts for n in lengths if n > 0))
    _read_exact(fd, memoryview(frame))
    offset = 0
    built: list[columns.Buffers] = []
    for lengths, null_count, checked in column_layouts:
        parts: list[Any] = []
        for n in lengths:
            parts.append(None if n < 0 else frame.slice(offset, n))
            offset += _padded(max(n, 0))
        validity, *rest = parts
        offsets, data = rest if len(rest) == 2 else (None, rest[0])
        built.append(columns.Buffers(validity, offsets, data, null_count, checked))
    # Already UTF-8: the reader takes its bytes only from lines raw.py checked.
    return columns.to_arrow(columns.TableColumns(name, rows, built), check_utf8=False)


def _read_exact(fd: int, view: memoryview) -> memoryview:
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if not n:
            raise EOFError
        got += n
    return view


def _failure(exc: BaseException) -> str:
    """One line for a failure of the reader (never an arbitrary exception's text: it may quote data)."""
    if isinstance(exc, StagesError):
        return str(exc)[:300]
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return type(exc).__name__


def _widen(fd: int) -> None:
    """A 1 MiB pipe on Linux (instead of 64 KiB): a batch crosses in far fewer reads and writes."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
    except (ImportError, OSError):
        pass  # not Linux, or above the system's pipe-max-size: the default size works too


def _peak_rss_kb() -> int | None:
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def _die_with_parent() -> None:
    """On Linux, be killed with the committing process (a kill -9 of it must not leave us reading)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _reader_main(
    fd: int, raw_dir: str, batch_stages: int, batch_bytes: int, run_id: str, share: Share = WHOLE,
    go: IO[bytes] | None = None,
) -> None:
    """The reader: waits for a byte on ``go`` (if given), then sends every message to ``fd``."""
    # Stop signals are the committing process's to handle; it ends us when it stops.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    _die_with_parent()
    if go is not None and not go.read(1):
        return  # the committing process ended before it let us read (e.g. its output is locked)
    # The batches are acyclic: the collector's passes over them cost more than they find.
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, 20, 20)
    conn = Connection(fd, readable=False)
    sender = _FrameSender(conn)
    try:
        for message in read_batches(Path(raw_dir), batch_stages, batch_bytes, run_id, share):
            if message.batch is None:
                message.peak_rss_kb = _peak_rss_kb()
            sender.send(message)
            del message
    except (BrokenPipeError, ConnectionResetError):
        return  # the committing process is gone
    except BaseException as exc:
        try:
            conn.send_bytes(pickle.dumps(("failed", _failure(exc))))
        except OSError:
            pass
    finally:
        conn.close()


class ReplayReader:
    """The reader process, as a source of :class:`ReplayMessage` (until the last one).

    Started as ``python -m pipeline.replay_reader`` rather than by multiprocessing,
    whose spawn would run the caller's main script again in the child."""

    def __init__(self, raw_dir: Path, batch_stages: int, batch_bytes: int, run_id: str, share: Share = WHOLE):
        read_fd, write_fd = os.pipe()
        _widen(write_fd)
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.replay_reader", str(write_fd), str(raw_dir), str(batch_stages),
                 str(batch_bytes), run_id, str(share.index), str(share.count)],
                pass_fds=(write_fd,), stdin=subprocess.PIPE, env=env,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._conn = Connection(read_fd, writable=False)

    def go(self) -> None:
        """Let the reader start reading (it has started and imported meanwhile)."""
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(b"g")
            self._process.stdin.close()
        except BrokenPipeError:
            pass  # it died already: its pipe's end says so to the next receive

    def __enter__(self) -> ReplayReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def receive(self) -> ReplayMessage:
        """The next message (waits for it)."""
        try:
            head = pickle.loads(self._conn.recv_bytes())
            if isinstance(head, tuple) and len(head) == 2 and head[0] == "failed":
                raise ReaderError(f"the replay reader failed ({head[1]}); run replay again, and report it if it happens again")
            return self._rest(head)
        except EOFError:  # also in the middle of a table's frame
            raise ReaderError(f"the replay reader process died (exit code {self._process.wait()}); run replay again") from None

    def _rest(self, head: tuple[list[BadLine], object, list[Layout]]) -> ReplayMessage:
        bad_lines, rest, layouts = head
        tables = {layout[0]: _read_table(self._conn.fileno(), layout) for layout in layouts}
        if not isinstance(rest, tuple):
            return ReplayMessage(bad_lines, None, rest)  # type: ignore[arg-type]
        return ReplayMessage(bad_lines, PreparedBatch(tables, *rest))

    def close(self) -> None:
        self._conn.close()
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        if self._process.stdin is not None and not self._process.stdin.closed:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass


def messages(readers: Sequence[ReplayReader], stopping: Callable[[], bool]) -> Iterator[tuple[int, ReplayMessage]]:
    """(reader index, message) as they arrive, until each reader has sent its last one,
    or until ``stopping()`` is true while waiting."""
    active = {reader._conn: index for index, reader in enumerate(readers)}
    while active:
        ready = wait(list(active), POLL_SECONDS)
        if not ready and stopping():
            return
        for conn in ready:
            index = active[conn]  # type: ignore[index]
            message = readers[index].receive()
            if message.batch is None:
                del active[conn]  # type: ignore[arg-type]
            yield index, message


_END = object()


def received(readers: Sequence[ReplayReader], stopping: Callable[[], bool], ahead_bytes: int) -> Iterator[ReplayMessage]:
    """The readers' messages, received by a thread while the caller commits (so a reader
    never waits for a commit to end) until their batches' page bytes waiting reach
    ``ahead_bytes``; until each reader has sent its last one, or ``stopping()`` is true."""
    waiting: deque[tuple[object, int]] = deque()
    changed = threading.Condition()
    done = threading.Event()

    def put(item: object, nbytes: int = 0) -> None:
        with changed:
            waiting.append((item, nbytes))
            changed.notify_all()
            while not done.is_set() and sum(n for _, n in waiting) >= ahead_bytes:
                changed.wait(POLL_SECONDS)

    def receive() -> None:
        try:
            for _, message in messages(readers, done.is_set):
                put(message, message.batch.nbytes if message.batch is not None else 0)
        except BaseException as exc:  # handed to the caller, which raises it
            put(exc)
        else:
            put(_END)

    thread = threading.Thread(target=receive, name="replay-receiver", daemon=True)
    thread.start()
    try:
        while True:
            with changed:
                if not waiting:
                    changed.wait(POLL_SECONDS)
                if not waiting:
                    if stopping():
                        return
                    continue
                item, _ = waiting.popleft()
                changed.notify_all()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        done.set()
        with changed:
            changed.notify_all()
        # A thread still inside a receive ends when the readers are closed (their pipes end).
        thread.join(timeout=5 * POLL_SECONDS)

if __name__ == "__main__":
    _reader_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
                 Share(int(sys.argv[6]), int(sys.argv[7])), sys.stdin.buffer)

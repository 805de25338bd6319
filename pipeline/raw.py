"""The raw landing zone: write it, read it back.

Writing: one ``<run_id>.jsonl.gz`` per run under RAW_DIR. While the run goes on the
file is ``.<run_id>.jsonl.gz.partial``; every batch is written, flushed and fsynced
before it is transformed, so a transform bug never loses data. When the run ends the
file is renamed into place. A ``.partial`` left by a killed run is healed by the next
writer: its complete lines become a clean ``<run_id>.jsonl.gz``, the cut tail is
dropped and reported. Pages are redacted (pipeline.redact) before they are written; a
call with a page that cannot be redacted is not landed at all, and returned as such.

Reading (``replay``): any ``*.jsonl`` / ``*.jsonl.gz`` under RAW_DIR, in file-name
order, one HTTP answer per line. Pages are reassembled into calls: a page fetched
without a ``cursor`` starts a new fetch of its call, later pages append, a page with
no ``next`` completes it; a 404 line completes a ``not_found`` fetch. Completed
fetches are yielded as they complete, so later lines win and memory holds only the
calls whose paging is still open. A line is decoded into the declared page
(pipeline.api_schema) with its stages left as the bytes received, which the transform
keeps as ``raw``; a line msgspec refuses is decoded by ``jsonio.loads`` instead, so a
line too deep, too long or not JSON is a reported bad line either way.
"""

from __future__ import annotations

import codecs
import gzip
import itertools
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, cast

import msgspec

from pipeline import jsonio
from pipeline.api_schema import Page
from pipeline.calls_input import normalize_call_id
from pipeline.records import CallFetch, parse_rfc3339, rfc3339, utcnow
from pipeline.redact import RedactionError, redact_page

try:  # ISA-L's gunzip reads the landing zone a few times faster than zlib's
    from isal import igzip_threaded, isal_zlib

    def _gunzip_ahead(path: Path, mode: str) -> IO[bytes]:
        return cast(IO[bytes], igzip_threaded.open(path, mode, threads=1))

    GUNZIP_ERRORS: tuple[type[Exception], ...] = (zlib.error, isal_zlib.error)
except ImportError:  # a platform without an isal wheel
    _gunzip_ahead = gzip.open
    GUNZIP_ERRORS = (zlib.error,)
_READ_ERRORS = (OSError, EOFError, *GUNZIP_ERRORS)

try:
    import fcntl
except ImportError:  # not POSIX: partial files are healed without checking for a live writer
    fcntl = None  # type: ignore[assignment]

PARTIAL_SUFFIX = ".partial"
HEALING_SUFFIX = ".healing"
#: A longer line is a bad line (reading it would need that much memory).
MAX_LINE_BYTES = 512 * 1024 * 1024
_CHUNK = 1024 * 1024
_DECODE_BELOW_BYTES = 1024 * 1024
_PIECE = 64 * 1024  # compressed bytes fed at a time while healing
_SURROGATE = re.compile("[\ud800-\udfff]")


class RawWriter:
    """Writes one run's landing file. ``warn(message)`` receives one line per killed
    run's file healed when the writer opens (also kept in ``warnings``)."""

    def __init__(self, raw_dir: Path, run_id: str, warn: Callable[[str], None] | None = None):
        raw_dir.mkdir(parents=True, exist_ok=True)
        self._warn = warn
        self.warnings: list[str] = []
        for message in heal_partial_files(raw_dir):
            self._warning(message)
        self.final_path = raw_dir / f"{run_id}.jsonl.gz"
        self.partial_path = raw_dir / f".{run_id}.jsonl.gz{PARTIAL_SUFFIX}"
        self._file: IO[bytes] = open(self.partial_path, "wb")
        if fcntl is not None:  # tells a healer in another process that this file is live
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._gz = gzip.GzipFile(fileobj=self._file, mode="wb", compresslevel=1)
        self.lines = 0

    def _warning(self, message: str) -> None:
        self.warnings.append(message)
        if self._warn is not None:
            self._warn(message)

    def write(self, fetches: list[CallFetch]) -> dict[str, str]:
        """Land the batch; returns {call id: reason} for the calls not landed, because
        a page of theirs cannot be redacted or encoded (the others are landed)."""
        out: list[bytes] = []
        not_landed: dict[str, str] = {}
        for fetch in fetches:
            try:
                out.extend(_fetch_lines(fetch))
            except _NotLanded as exc:
                not_landed[fetch.call_id] = str(exc)
        if out:
            self._gz.write(b"".join(out))
            # Sync-flush the gzip stream and fsync: everything so far is readable.
            self._gz.flush(zlib.Z_SYNC_FLUSH)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.lines += len(out)
        return not_landed

    def close(self) -> None:
        self._gz.close()
        self._file.close()
        if self.lines:
            os.replace(self.partial_path, self.final_path)
        else:
            self.partial_path.unlink(missing_ok=True)


class _NotLanded(Exception):
    """A call none of whose lines may be written (a call with a page left out would
    replay as a different call)."""


def _fetch_lines(fetch: CallFetch) -> list[bytes]:
    if fetch.status == "not_found":
        return [_line(fetch.call_id, 404, fetch.fetched_at, (fetch.page_urls[-1:] or [""])[0], None)]
    if fetch.status != "loaded":
        return []
    try:
        return [
            _line(fetch.call_id, 200, fetch.fetched_at, url, redact_page(_decoded(page)))
            for url, page in zip(fetch.page_urls, fetch.pages)
        ]
    except RedactionError as exc:
        raise _NotLanded(f"a page is {exc}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise _NotLanded(f"a page cannot be written as JSON ({type(exc).__name__})") from None


def _decoded(page: Any) -> Any:
    """A page whose stages are still bytes (``msgspec.Raw``) as objects, to be redacted."""
    results = page.get("results") if isinstance(page, dict) else None
    if isinstance(results, list) and any(isinstance(item, msgspec.Raw) for item in results):
        loads = jsonio.loads
        return {**page, "results": [loads(item) if isinstance(item, msgspec.Raw) else item for item in results]}
    return page


def _line(call_id: str, status: int, fetched_at: datetime, url: str, page: Any) -> bytes:
    record = {"call_id": call_id, "status": status, "fetched_at": rfc3339(fetched_at), "url": url, "page": page}
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate (jsonio.loads replaces them; other sources may not)
        return _SURROGATE.sub("\ufffd", text).encode()


# --------------------------------------------------------------------------- healing


def heal_partial_files(raw_dir: Path) -> list[str]:
    """Put the files of killed runs in place, keeping every complete line.

    A run killed mid-write leaves ``.<run>.jsonl.gz.partial`` whose gzip stream ends
    anywhere. It is decompressed as far as it goes, lines up to the last newline are
    re-written as a clean ``<run>.jsonl.gz`` (temp file, fsync, rename) and the partial
    file is removed. Returns one message per healed file, saying what was dropped.
    A partial file locked by a live writer is left alone.
    """
    for leftover in raw_dir.glob(f".*.jsonl.gz{HEALING_SUFFIX}"):
        leftover.unlink(missing_ok=True)  # a heal that was itself interrupted
    messages = []
    for partial in sorted(raw_dir.glob(f".*.jsonl.gz{PARTIAL_SUFFIX}")):
        message = _heal(partial, partial.with_name(partial.name[1 : -len(PARTIAL_SUFFIX)]))
        if message:
            messages.append(message)
    return messages


def _heal(partial: Path, target: Path) -> str | None:
    try:
        source = open(partial, "rb")
    except FileNotFoundError:  # healed by another process meanwhile
        return None
    with source:
        if fcntl is not None:
            try:
                fcntl.flock(source.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return None  # a running writer holds it
        temp = target.with_name(f".{target.name}{HEALING_SUFFIX}")
        with open(temp, "wb") as sink:
            with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=1) as gz:
                lines, dropped, corrupt = _copy_complete_lines(source, gz)
            sink.flush()
            os.fsync(sink.fileno())
        if lines:
            os.replace(temp, target)
            _fsync_dir(target.parent)
        else:
            temp.unlink()
        partial.unlink()
    message = f"{partial.name} (left by a run that was killed): "
    message += f"{lines} complete line(s) kept in {target.name}" if lines else "no complete line, nothing kept"
    if dropped:
        message += f"; dropped an incomplete last line ({dropped} bytes)"
    if corrupt:
        message += "; the rest of the file was unreadable and dropped"
    return message


def _copy_complete_lines(source: IO[bytes], gz: IO[bytes]) -> tuple[int, int, bool]:
    """Decompress ``source`` (gzip members, possibly cut anywhere) and write every
    complete line to ``gz``: (lines written, bytes after the last newline, whether
    undecodable data was met and dropped)."""
    lines = _LineSink(gz)
    decompressor = zlib.decompressobj(wbits=31)
    while data := source.read(_PIECE):
        backup = decompressor.copy()
        try:
            decompressor = _decompress(decompressor, data, lines)
        except zlib.error:
            # zlib gives nothing of a piece it fails on: redo it a byte at a time.
            decompressor = backup
            try:
                for at in range(len(data)):
                    decompressor = _decompress(decompressor, data[at : at + 1], lines)
            except zlib.error:
                return lines.count, lines.pending, True
    return lines.count, lines.pending, False


def _decompress(decompressor: Any, data: bytes, lines: _LineSink) -> Any:
    """Feed ``data``; returns the decompressor for what follows (a new one after the
    end of a gzip member: another may follow)."""
    while data:
        lines.add(decompressor.decompress(data, _CHUNK))
        data = decompressor.unconsumed_tail
        if decompressor.eof:
            data = decompressor.unused_data + data
            decompressor = zlib.decompressobj(wbits=31)
    return decompressor


class _LineSink:
    """Writes decompressed bytes up to the last newline; holds the incomplete line."""

    def __init__(self, out: IO[bytes]):
        self.out = out
        self.count = 0
        self._tail: list[bytes] = []  # in pieces: a line may be long
        self.pending = 0

    def add(self, data: bytes) -> None:
        end = data.rfind(b"\n") + 1
        if end:
            self.out.write(b"".join(self._tail))
            self.out.write(data[:end])
            self.count += data.count(b"\n", 0, end)
            self._tail, self.pending = [], 0
        if end < len(data):
            self._tail.append(data[end:])
            self.pending += len(data) - end


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- reading


def landing_files(raw_dir: Path) -> list[Path]:
    files = [p for p in raw_dir.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz"))]
    return sorted(files, key=lambda p: p.relative_to(raw_dir).as_posix())


@dataclass
class BadLine:
    where: str  # file:line
    reason: str


def _file_lines(path: Path) -> Iterator[bytes | None]:
    """A landing file's lines (see :func:`_lines`); a damaged gzip stream gives its lines
    up to the damage, then raises."""
    if not path.name.endswith(".gz"):
        with open(path, "rb") as stream:
            yield from _lines(stream)
        return
    given = 0
    try:
        # Decompressed in a thread of its own (ISA-L releases the GIL): the transform keeps its core.
        with _gunzip_ahead(path, "rb") as stream:
            for line in _lines(stream):
                given += 1
                yield line
        return
    except _READ_ERRORS:
        pass
    # ISA-L drops the lines decompressed with the damage: zlib gives every line up to it.
    with gzip.open(path, "rb") as stream:
        yield from itertools.islice(_lines(stream), given, None)


@dataclass(frozen=True)
class Share:
    """The calls one of ``count`` readers of a landing zone takes: those whose id hashes
    to ``index``. Every reader reads every line; reader 0 reports the bad lines that
    belong to no call."""

    index: int
    count: int

    def takes(self, call_id: str) -> bool:
        return zlib.crc32(call_id.encode()) % self.count == self.index

    def takes_line(self, call_id: Any) -> bool:
        normal = normalize_call_id(call_id) if isinstance(call_id, str) else None
        return self.takes(normal) if normal is not None else self.index == 0


WHOLE = Share(0, 1)
#: RawWriter puts the call id first: most lines of other readers are skipped without decoding.
_LEADING_CALL_ID = re.compile(rb'\{\s*"call_id"\s*:\s*"([0-9A-Fa-f-]{36})"')


def read_landing_zone(
    raw_dir: Path, on_bad_line: Callable[[BadLine], None], share: Share = WHOLE
) -> Iterator[CallFetch]:
    open_fetches: dict[str, CallFetch] = {}
    reports_lines = share.index == 0
    for path in landing_files(raw_dir):
        number = 0
        try:
            for number, line in enumerate(_file_lines(path), start=1):
                    if line is None:
                        if reports_lines:
                            on_bad_line(BadLine(f"{path}:{number}", f"line longer than {MAX_LINE_BYTES} bytes"))
                        continue
                    if share.count > 1 and not _maybe_taken(line, share):
                        continue
                    if not line.strip():
                        continue
                    try:
                        record = _decode_line(line)
                        if share.count > 1 and not share.takes_line(_call_id_of(record)):
                            continue
                        done = _apply_line(record, open_fetches, len(line))
                    except (ValueError, KeyError, TypeError) as exc:
                        if reports_lines:
                            on_bad_line(BadLine(f"{path}:{number}", _bad_reason(exc)))
                        continue
                    if done is not None:
                        yield done
        except _READ_ERRORS as exc:
            # A cut gzip stream (e.g. a killed run's last lines): keep what was read.
            if reports_lines:
                on_bad_line(BadLine(f"{path}:{number + 1}", f"unreadable from here on ({exc.__class__.__name__})"))
    for call_id in open_fetches:
        on_bad_line(BadLine(str(raw_dir), f"call {call_id}: paging incomplete (no last page); not loaded"))


def _maybe_taken(line: bytes, share: Share) -> bool:
    """False only for a line that surely belongs to another reader (its leading call id says so)."""
    leading = _LEADING_CALL_ID.match(line)
    return leading is None or share.takes_line(leading.group(1).decode())


def _call_id_of(record: Any) -> Any:
    if isinstance(record, LandedLine):
        return record.call_id
    return record.get("call_id") if isinstance(record, dict) else None


def _lines(stream: IO[bytes]) -> Iterator[bytes | None]:
    """The stream's lines; None for a line longer than MAX_LINE_BYTES, which is
    skipped without being held in memory."""
    while line := stream.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES:
            yield line
            continue
        while not line.endswith(b"\n") and (line := stream.readline(_CHUNK)):
            pass
        yield None


def _bad_reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"field {exc} is missing"
    return str(exc) or type(exc).__name__


class LandedLine(msgspec.Struct):
    """One line of the landing zone, as :func:`_line` writes it."""

    call_id: str
    status: int
    fetched_at: str | None = None
    url: str | None = None
    page: Page | None = None


_landed_line = msgspec.json.Decoder(LandedLine)


def _decode_line(line: bytes) -> LandedLine | Any:
    """The line typed, its stages as bytes; anything msgspec refuses, or that it would
    let through unchecked inside those bytes (nesting, text that is not UTF-8, such as
    an encoded surrogate), goes to ``jsonio.loads``, which repairs or reports it."""
    if jsonio.too_deep(line):
        return jsonio.loads(line)
    try:
        _check_utf8(line)  # msgspec checks UTF-8 only in the fields it decodes
        return _landed_line.decode(line)
    except (msgspec.MsgspecError, UnicodeDecodeError):
        return jsonio.loads(line)


def _check_utf8(line: bytes) -> None:
    """Raise UnicodeDecodeError unless ``line`` is UTF-8; a long line is decoded a piece at a
    time (decoding it whole would build a str of up to four times its size)."""
    if len(line) < _DECODE_BELOW_BYTES:
        line.decode()
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(line)
    for start in range(0, len(line), _DECODE_BELOW_BYTES):
        decoder.decode(view[start:start + _DECODE_BELOW_BYTES])
    decoder.decode(b"", final=True)


def _apply_line(record: Any, open_fetches: dict[str, CallFetch], nbytes: int = 0) -> CallFetch | None:
    if isinstance(record, LandedLine):
        record = _typed_record(record)
    if not isinstance(record, dict):
        raise ValueError("line is not a JSON object")
    call_id = normalize_call_id(str(record["call_id"]))
    if call_id is None:
        raise ValueError(f"call_id {str(record['call_id'])[:40]!r} is not a UUID")
    status = record["status"]
    fetched_at = _parse_time(record.get("fetched_at"))
    url = str(record.get("url") or "")
    if status == 404:
        open_fetches.pop(call_id, None)
        return CallFetch(call_id, "not_found", fetched_at=fetched_at, page_urls=[url])
    if status != 200:
        return None  # other answers (errors) carry no data
    page = record["page"]
    if not isinstance(page, dict) or not isinstance(page.get("results"), list):
        raise ValueError("status 200 but 'page.results' is not a list")
    # A page fetched without a cursor starts a fetch (plain string work: parsing the
    # URL properly cost more than decoding the page).
    is_first_page = not any(p.startswith("cursor=") for p in url.partition("?")[2].split("&"))
    fetch = open_fetches.get(call_id)
    if fetch is None or is_first_page:
        fetch = CallFetch(call_id, "loaded", fetched_at=fetched_at)
        open_fetches[call_id] = fetch
    fetch.pages.append(page)
    fetch.page_urls.append(url)
    fetch.nbytes += nbytes
    fetch.fetched_at = fetched_at
    if not page.get("next"):
        return open_fetches.pop(call_id)
    return None


def _typed_record(line: LandedLine) -> dict[str, Any]:
    page = line.page
    body = None if page is None else {"results": page.results, "next": page.next, "total": page.total}
    return {"call_id": line.call_id, "status": line.status, "fetched_at": line.fetched_at, "url": line.url,
            "page": body}


def _parse_time(value: Any) -> datetime:
    if isinstance(value, str):
        try:
            return parse_rfc3339(value)
        except ValueError:
            pass
    return utcnow()

"""The raw landing zone (CONTRACT.md, "Raw landing zone"): write it, read it back.

Writing: one ``<run_id>.jsonl.gz`` per run under RAW_DIR. While the run goes on the
file is ``.<run_id>.jsonl.gz.partial``; every batch is written, flushed and fsynced
before it is transformed, so a transform bug never loses data. When the run ends the
file is renamed into place. A ``.partial`` left by a killed run is renamed into place
by the next writer (its last, unflushed lines may be cut: the reader reports that).

Reading (``replay``): any ``*.jsonl`` / ``*.jsonl.gz`` under RAW_DIR, in file-name
order, one HTTP answer per line. Pages are reassembled into calls: a page fetched
without a ``cursor`` starts a new fetch of its call, later pages append, a page with
no ``next`` completes it; a 404 line completes a ``not_found`` fetch. Completed
fetches are yielded as they complete, so later lines win and memory holds only the
calls whose paging is still open.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, cast

from pipeline.calls_input import normalize_call_id
from pipeline.records import CallFetch, utcnow
from pipeline.redact import redact_page

PARTIAL_SUFFIX = ".partial"


class RawWriter:
    def __init__(self, raw_dir: Path, run_id: str):
        raw_dir.mkdir(parents=True, exist_ok=True)
        heal_partial_files(raw_dir)
        self.final_path = raw_dir / f"{run_id}.jsonl.gz"
        self.partial_path = raw_dir / f".{run_id}.jsonl.gz{PARTIAL_SUFFIX}"
        self._file: IO[bytes] = open(self.partial_path, "wb")
        self._gz = gzip.GzipFile(fileobj=self._file, mode="wb", compresslevel=1)
        self.lines = 0

    def write(self, fetches: list[CallFetch]) -> None:
        out: list[bytes] = []
        for fetch in fetches:
            if fetch.status == "not_found":
                out.append(_line(fetch.call_id, 404, fetch.fetched_at, fetch.page_urls[-1:] or [""], None))
            elif fetch.status == "loaded":
                for url, page in zip(fetch.page_urls, fetch.pages):
                    out.append(_line(fetch.call_id, 200, fetch.fetched_at, [url], redact_page(page)))
        if out:
            self._gz.write(b"".join(out))
            # Sync-flush the gzip stream and fsync: everything so far is readable.
            self._gz.flush(zlib.Z_SYNC_FLUSH)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.lines += len(out)

    def close(self) -> None:
        self._gz.close()
        self._file.close()
        if self.lines:
            os.replace(self.partial_path, self.final_path)
        else:
            self.partial_path.unlink(missing_ok=True)


def _line(call_id: str, status: int, fetched_at: datetime, url: list[str], page: Any) -> bytes:
    record = {"call_id": call_id, "status": status, "fetched_at": fetched_at.isoformat(), "url": url[0], "page": page}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def heal_partial_files(raw_dir: Path) -> None:
    for partial in raw_dir.glob(f".*.jsonl.gz{PARTIAL_SUFFIX}"):
        target = partial.with_name(partial.name[1 : -len(PARTIAL_SUFFIX)])
        os.replace(partial, target)


def landing_files(raw_dir: Path) -> list[Path]:
    files = [p for p in raw_dir.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz"))]
    return sorted(files, key=lambda p: p.relative_to(raw_dir).as_posix())


@dataclass
class BadLine:
    where: str  # file:line
    reason: str


def _open_lines(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def read_landing_zone(raw_dir: Path, on_bad_line: Callable[[BadLine], None]) -> Iterator[CallFetch]:
    open_fetches: dict[str, CallFetch] = {}
    for path in landing_files(raw_dir):
        number = 0
        try:
            with _open_lines(path) as stream:
                for number, line in enumerate(stream, start=1):
                    if not line.strip():
                        continue
                    try:
                        done = _apply_line(json.loads(line), open_fetches)
                    except (ValueError, KeyError, TypeError) as exc:
                        on_bad_line(BadLine(f"{path}:{number}", str(exc) or type(exc).__name__))
                        continue
                    if done is not None:
                        yield done
        except (OSError, EOFError, zlib.error) as exc:
            # A cut gzip stream (e.g. a killed run's last lines): keep what was read.
            on_bad_line(BadLine(f"{path}:{number + 1}", f"unreadable from here on ({exc.__class__.__name__})"))
    for call_id in open_fetches:
        on_bad_line(BadLine(str(raw_dir), f"call {call_id}: paging incomplete (no last page); not loaded"))


def _apply_line(record: Any, open_fetches: dict[str, CallFetch]) -> CallFetch | None:
    if not isinstance(record, dict):
        raise ValueError("line is not a JSON object")
    call_id = normalize_call_id(str(record["call_id"]))
    if call_id is None:
        raise ValueError(f"call_id {record['call_id']!r} is not a UUID")
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
    fetch.fetched_at = fetched_at
    if not page.get("next"):
        return open_fetches.pop(call_id)
    return None


def _parse_time(value: Any) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    return utcnow()

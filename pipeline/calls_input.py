"""Call IDs from a calls file, stdin or --call-id: validated, normalised, de-duplicated.

Accepted per line: a UUID in any case, optionally in braces, surrounded by spaces;
blank lines and ``#`` comments (whole-line or trailing) are ignored; a UTF-8 BOM and
CRLF line ends are tolerated. Everything is validated before anything is fetched: one
bad line means exit 2 listing the bad ``file:line`` (the first few, then a count).
The file is read line by line with a cap on the line length, the number of lines and
the number of IDs, so a wrong file (``/dev/zero``, a huge dump) is refused quickly in
bounded memory.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline.errors import InputError

#: Bytes that are not UTF-8, as the "surrogateescape" error handler decodes them.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_UUID = re.compile(r"\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?")
#: Bad lines named in the error message; the rest are counted.
MAX_LISTED = 20
#: Longest line accepted (a UUID in braces plus room for a trailing comment).
MAX_LINE_CHARS = 1000
#: Most distinct call IDs one run takes (they are all held in memory).
MAX_CALL_IDS = 10_000_000
#: Most lines read, blank and comment lines included (an endless stream ends here).
MAX_LINES = 2 * MAX_CALL_IDS


def normalize_call_id(text: str) -> str | None:
    """Canonical lower-case UUID, or None when ``text`` is not one."""
    m = _UUID.fullmatch(text.strip())
    if not m or (text.strip().startswith("{") != text.strip().endswith("}")):
        return None
    return m.group(1).lower()


@dataclass
class CallIds:
    ids: list[str] = field(default_factory=list)
    duplicates: int = 0
    #: A calls file (or stdin) was given — with ``ids`` empty it held no call ID at all.
    source_given: bool = False
    _seen: set[str] = field(default_factory=set, repr=False)

    def add(self, call_id: str) -> None:
        if call_id in self._seen:
            self.duplicates += 1
            return
        self._seen.add(call_id)
        self.ids.append(call_id)


@dataclass
class _BadLines:
    shown: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.shown) < MAX_LISTED:
            self.shown.append(where)

    def error(self) -> InputError:
        more = f" and {self.count - len(self.shown)} more" if self.count > len(self.shown) else ""
        return InputError(
            f"{self.count} malformed call ID(s), nothing fetched: {', '.join(self.shown)}{more} (expected one UUID a line)"
        )


def _lines(name: str, stream: IO[str]) -> Iterator[tuple[str, int, str]]:
    """(name, line number, text without comment), reading at most MAX_LINE_CHARS a line."""
    number = 0
    while True:
        line = stream.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        number += 1
        if _UNDECODABLE.search(line):
            raise InputError(f"calls file {name} is not UTF-8 text (line {number}); expected one UUID a line")
        if len(line.rstrip("\n")) > MAX_LINE_CHARS:
            raise InputError(
                f"calls file {name}:{number}: line longer than {MAX_LINE_CHARS} characters, nothing fetched "
                "(expected one UUID a line; is this the right file?)"
            )
        if number > MAX_LINES:
            raise InputError(
                f"calls file {name} has more than {MAX_LINES:,} lines, nothing fetched "
                "(is this the right file? split a real list into several files)"
            )
        if number == 1:
            line = line.lstrip("\ufeff")
        yield name, number, line.split("#", 1)[0].strip()


def _open(calls_file: str) -> IO[str]:
    if calls_file == "-":
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape", newline=None)  # type: ignore[union-attr]
        return sys.stdin
    try:
        # Undecodable bytes are found per line (a strict decoder fails a whole chunk at once).
        return Path(calls_file).open(encoding="utf-8", errors="surrogateescape", newline=None)
    except OSError as exc:
        raise InputError(f"cannot read calls file {calls_file}: {exc.strerror}") from None


def read_call_ids(calls_file: str | None, call_ids: Iterable[str]) -> CallIds:
    """Stream the file once, keeping only canonical IDs (not the file's text)."""
    result = CallIds(source_given=bool(calls_file))
    bad = _BadLines()
    sources: list[Iterable[tuple[str, int, str]]] = [
        (("--call-id", i, c.strip()) for i, c in enumerate(call_ids, start=1))
    ]
    stream = _open(calls_file) if calls_file else None
    if stream is not None:
        sources.append(_lines("<stdin>" if calls_file == "-" else calls_file, stream))
    try:
        for source in sources:
            for name, number, text in source:
                if not text:
                    continue
                canonical = normalize_call_id(text)
                if canonical is None:
                    bad.add(f"{name}:{number}")
                    continue
                result.add(canonical)
                if len(result.ids) > MAX_CALL_IDS:
                    raise InputError(
                        f"more than {MAX_CALL_IDS:,} call IDs given (the most one run takes), nothing fetched; "
                        "split the list into several files and run once per file"
                    )
    finally:
        if stream is not None and stream is not sys.stdin:
            stream.close()
    if bad.count:
        raise bad.error()
    return result

"""Call IDs from a calls file, stdin or --call-id: validated, normalised, de-duplicated.

Accepted per line: a UUID in any case, optionally in braces, surrounded by spaces;
blank lines and ``#`` comments (whole-line or trailing) are ignored; a UTF-8 BOM and
CRLF line ends are tolerated. Everything is validated before anything is fetched: one
bad line means exit 2 listing every bad ``file:line``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline.errors import InputError

_UUID = re.compile(r"\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?")
_MAX_LISTED = 20


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
    _seen: set[str] = field(default_factory=set, repr=False)

    def add(self, call_id: str) -> None:
        if call_id in self._seen:
            self.duplicates += 1
            return
        self._seen.add(call_id)
        self.ids.append(call_id)


def _lines(name: str, stream: IO[str]) -> Iterator[tuple[str, int, str]]:
    for number, line in enumerate(stream, start=1):
        if number == 1:
            line = line.lstrip("\ufeff")
        yield name, number, line.split("#", 1)[0].strip()


def read_call_ids(calls_file: str | None, call_ids: Iterable[str]) -> CallIds:
    """Stream the file once, keeping only canonical IDs (not the file's text)."""
    result = CallIds()
    bad: list[str] = []
    sources: list[Iterable[tuple[str, int, str]]] = [
        (("--call-id", i, c.strip()) for i, c in enumerate(call_ids, start=1))
    ]
    stream: IO[str] | None = None
    if calls_file == "-":
        sys.stdin.reconfigure(encoding="utf-8", newline=None)  # type: ignore[union-attr]
        sources.append(_lines("<stdin>", sys.stdin))
    elif calls_file:
        try:
            stream = Path(calls_file).open(encoding="utf-8", newline=None)
        except OSError as exc:
            raise InputError(f"cannot read calls file {calls_file}: {exc.strerror}") from None
        sources.append(_lines(calls_file, stream))
    try:
        for source in sources:
            for name, number, text in source:
                if not text:
                    continue
                canonical = normalize_call_id(text)
                if canonical is None:
                    bad.append(f"{name}:{number}")
                else:
                    result.add(canonical)
    except UnicodeDecodeError:
        raise InputError(f"calls file {calls_file} is not UTF-8 text") from None
    finally:
        if stream is not None:
            stream.close()
    if bad:
        shown = ", ".join(bad[:_MAX_LISTED]) + (f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else "")
        raise InputError(f"{len(bad)} malformed call ID(s), nothing fetched: {shown} (expected one UUID a line)")
    return result

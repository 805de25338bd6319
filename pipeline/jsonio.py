"""JSON decoding for everything read from the API or the raw landing zone.

:func:`loads` is ``json.loads`` made safe for hostile input:

* nesting deeper than :data:`MAX_DEPTH` raises :class:`JSONTooDeep` before parsing,
  found without recursion (the stdlib parser recurses once per level);
* lone UTF-16 surrogates (``"\\ud800"``), in keys or values, become U+FFFD: the
  stdlib keeps them as code points that no UTF-8 writer accepts;
* every failure is a :class:`JSONError` (a ``ValueError``) whose message gives a
  position, never content.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

MAX_DEPTH = 200

# A JSON string once its escaped backslashes and quotes are gone (see too_deep).
_PLAIN_STRING = re.compile(rb'"[^"]*"')
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_NOT_OPENER = bytes(sorted(set(range(256)) - set(b"[{")))
# A \uD800-\uDFFF escape anywhere: the cheap test before the exact rewrite below.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]", re.ASCII)
# Left to right: an escaped backslash (so "\\ud800" is not an escape), a valid pair, a lone half.
_ESCAPE_TOKEN = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)
# A surrogate code point written as UTF-8 bytes (json.loads(bytes) lets those through).
_ENCODED_SURROGATE = re.compile(rb"\xed[\xa0-\xbf][\x80-\xbf]")


class JSONError(ValueError):
    """Not valid JSON (the message says where, never what)."""


class JSONTooDeep(JSONError):
    """Arrays/objects nested deeper than MAX_DEPTH."""


def loads(data: bytes | str) -> Any:
    """Decode JSON text: lone surrogates become U+FFFD, depth is capped at MAX_DEPTH."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if too_deep(raw):
        raise JSONTooDeep(f"JSON nested deeper than {MAX_DEPTH} levels")
    if b"\xed" in raw and _ENCODED_SURROGATE.search(raw):
        raw = _ENCODED_SURROGATE.sub("\ufffd".encode(), raw)
    if _SURROGATE_ESCAPE.search(raw):
        raw = _replace_lone_surrogates(raw)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise JSONError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise JSONError(f"invalid JSON: not UTF-8 at byte {exc.start}") from None
    except RecursionError:  # only reachable when called already deep in the stack
        raise JSONTooDeep(f"JSON nested deeper than the interpreter allows here (MAX_DEPTH {MAX_DEPTH})") from None


def too_deep(raw: bytes) -> bool:
    """Whether arrays/objects outside strings nest deeper than MAX_DEPTH (C-speed scans)."""
    if len(raw.translate(None, _NOT_OPENER)) <= MAX_DEPTH:  # one pass: what is left is the openers
        return False
    if b"\\" in raw:  # escaped backslashes first, then escaped quotes: no quote is left inside a string
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    steps = _PLAIN_STRING.sub(b"", raw).translate(_STEPS, _NOT_BRACKET)
    if steps.count(1) <= MAX_DEPTH:
        return False
    return max(itertools.accumulate(memoryview(steps).cast("b"))) > MAX_DEPTH


def _replace_lone_surrogates(raw: bytes) -> bytes:
    def fix(match: re.Match[bytes]) -> bytes:
        token = match.group()
        return b"\\ufffd" if len(token) == 6 else token

    return _ESCAPE_TOKEN.sub(fix, raw)

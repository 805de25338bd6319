"""Redaction of third-party credentials before anything is written.

One rule for stages, stages pages and calls listed by ``GET /api/calls``:

* A *voice* is the value of any key named ``externalVoice`` or ``voiceOverrides``
  (letter case, ``-`` and ``_`` ignored), at any depth, whatever its JSON type: an
  ``{<provider>: {...}}`` object for a provider known or not, a list, a string.
* Inside a voice, at any depth, lists included:

  - under a ``headers`` key (any letter case; also names ending in ``headers`` such as
    ``extraHeaders``) every header value becomes ``"<redacted>"``, header names are
    kept; a headers value that is not an object (a list, a string) is redacted whole;
  - the value of a credential-named key (:func:`is_credential_name`) becomes
    ``"<redacted>"``, whatever it is;
  - a voice that is a string or a number (malformed: a voice is an object) is redacted
    whole, as are the strings and numbers of a list standing for a voice.

* Credential names are matched broadly, since inside a voice a false positive only
  hides a value while a false negative leaks: the folded name (lower-cased, ``-``/``_``
  removed) contains authorization, apikey, token, secret, password, passphrase,
  privatekey, credential, cookie, signature, accesskey, bearer, sessionid, jwt or auth
  (not author), ends in key, or is pass/pwd. Exempt: token *counts* such as
  ``maxTokens``, ``max_output_tokens``, ``tokenizer`` (``tokens``, ``accessTokens`` are not).
* Nothing outside voices is touched. Objects are copied only along the path to a
  redacted value: with nothing to redact the input itself comes back (callers test
  ``result is stage``). Inputs are never mutated.
* Nesting deeper than :data:`MAX_NESTING` raises :class:`RedactionError`: such a
  value cannot be shown to be clean, so it is never written as it is.
"""

from __future__ import annotations

import re
import string
from typing import Any

REDACTED = "<redacted>"
#: Deeper than anything ``jsonio.loads`` accepts (its MAX_DEPTH), so a page it decoded
#: can always be redacted; the recursion stays far below Python's limit.
MAX_NESTING = 256


class RedactionError(ValueError):
    """A value that cannot be redacted (nested too deeply); it must not be written."""


_VOICE_NAMES = frozenset({"externalvoice", "voiceoverrides", "voiceoverride"})
_CREDENTIAL = re.compile(
    r"authorization|apikey|token|secret|passw(?:or)?d|passphrase|privatekey|credential|cookie|signature"
    r"|accesskey|bearer|sessionid|jwt|auth(?!or(?!i[sz]))|key$|^pass$|^pwd$"
)
_TOKEN_COUNT = re.compile(
    r"(?:max|min|num|total|initial|latest)(?:new|output|input|prompt|completion)?tokens?(?:count|limit)?"
    r"|tokens?(?:count|limit|izer|ization)s?"
)
_PLAIN, _VOICE, _HEADERS, _CREDENTIAL_KEY = range(4)
_kind_cache: dict[str, int] = {}
#: Every name that is not _PLAIN contains one of these once folded (see may_hold_secret).
_FRAGMENTS = (
    "externalvoice", "voiceoverride", "header", "auth", "key", "token", "secret", "pass", "pwd", "credential",
    "cookie", "signature", "bearer", "session", "jwt",
)
_FRAGMENT = re.compile("|".join(_FRAGMENTS))


def _fold(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def is_credential_name(name: str) -> bool:
    """True when a JSON key looks like it holds a credential (case/``-``/``_`` blind)."""
    folded = _fold(name)
    return _CREDENTIAL.search(folded) is not None and _TOKEN_COUNT.fullmatch(folded) is None


def _key_kind(name: Any) -> int:
    if type(name) is not str:
        return _PLAIN
    kind = _kind_cache.get(name)
    if kind is None:
        folded = _fold(name)
        if folded in _VOICE_NAMES:
            kind = _VOICE
        elif folded.endswith("headers") or folded == "header":
            kind = _HEADERS
        elif is_credential_name(name):
            kind = _CREDENTIAL_KEY
        else:
            kind = _PLAIN
        if len(_kind_cache) < 10_000:  # keys are few and repetitive; bound it anyway
            _kind_cache[name] = kind
    return kind


_FRAGMENT_BYTES = re.compile("|".join(_FRAGMENTS).encode())


def may_hold_secret(json_text: Any) -> bool:
    """Cheap pre-check on the JSON text of a value inside a voice: False guarantees
    that :func:`redact_provider` would not change it, so it can be used as it is.

    Folding the whole text like key names are folded keeps every key that is not
    plain a substring of it, as long as no ``\\u`` escape spells a letter (json.dumps
    never writes one; callers holding received bytes with escapes decode them first);
    values that happen to contain a fragment ("keyboard") only cost the full check.
    Takes text or JSON bytes.
    """
    if isinstance(json_text, str):
        return _FRAGMENT.search(_fold(json_text)) is not None
    data = bytes(json_text)
    if not data.isascii():  # str.lower() folds some non-ASCII letters to ASCII ones (KELVIN SIGN → k)
        return _FRAGMENT.search(_fold(data.decode("utf-8", "replace"))) is not None
    return _FRAGMENT_BYTES.search(fold_ascii(data)) is not None


_ASCII_LOWER = bytes.maketrans(string.ascii_uppercase.encode(), string.ascii_lowercase.encode())


def fold_ascii(data: bytes) -> bytes:
    """``data`` folded as key names are (ASCII letters lower-cased, ``-`` and ``_`` gone), in one pass."""
    return data.translate(_ASCII_LOWER, b"-_")


def is_plain_name(name: Any) -> bool:
    """True when a key is neither a voice, a headers nor a credential name."""
    return _key_kind(name) == _PLAIN


def _hidden(value: Any) -> Any:
    """``"<redacted>"``, the value itself when it already is (keeps objects shared)."""
    return value if type(value) is str and value == REDACTED else REDACTED


_OUTSIDE, _INSIDE, _VOICE_LIST = range(3)  # where a container is: outside voices, inside one, a list voice


def _voice_scalar(value: Any) -> Any:
    """A string or number where a voice object belongs (malformed): hidden whole."""
    return value if value is None or value == "" else _hidden(value)


def _walk(value: Any, where: int, depth: int) -> Any:
    """A dict or list redacted according to ``where`` it is; one frame per level."""
    if depth > MAX_NESTING:
        raise RedactionError(f"nested more than {MAX_NESTING} levels deep; cannot be redacted")
    if isinstance(value, dict):
        out: dict[Any, Any] | None = None
        for key, item in value.items():
            kind = _key_kind(key)
            if kind == _VOICE:
                if isinstance(item, dict):
                    new = _walk(item, _INSIDE, depth + 1)
                elif isinstance(item, (list, tuple)):
                    new = _walk(item, _VOICE_LIST, depth + 1)
                else:
                    new = _voice_scalar(item)
            elif where == _OUTSIDE or kind == _PLAIN:
                if not isinstance(item, (dict, list, tuple)):
                    continue
                new = _walk(item, _OUTSIDE if where == _OUTSIDE else _INSIDE, depth + 1)
            elif kind == _HEADERS:
                new = _headers(item)
            else:
                new = _hidden(item)
            if new is not item:
                if out is None:
                    out = dict(value)
                out[key] = new
        return value if out is None else out
    items: list[Any] | None = None
    for index, item in enumerate(value):
        if isinstance(item, dict):
            new = _walk(item, _OUTSIDE if where == _OUTSIDE else _INSIDE, depth + 1)
        elif isinstance(item, (list, tuple)):
            new = _walk(item, where, depth + 1)
        elif where == _VOICE_LIST:
            new = _voice_scalar(item)
        else:
            continue
        if new is not item:
            if items is None:
                items = list(value)
            items[index] = new
    return value if items is None else items


def _redact(value: Any, where: int) -> Any:
    if where == _VOICE_LIST and not isinstance(value, (dict, list, tuple)):
        return _voice_scalar(value)
    if not isinstance(value, (dict, list, tuple)):
        return value
    try:
        return _walk(value, _INSIDE if where == _VOICE_LIST and isinstance(value, dict) else where, 1)
    except RecursionError:  # called from deep in the stack already
        raise RedactionError("nested too deeply; cannot be redacted") from None


def _headers(value: Any) -> Any:
    # Header values are credentials for the third-party service; names are useful.
    if value is None:
        return value
    if isinstance(value, dict):
        if all(type(v) is str and v == REDACTED for v in value.values()):
            return value
        return {name: REDACTED for name in value}
    return _hidden(value)


def redact_provider(settings: Any) -> Any:
    """A value inside a voice (a provider object such as ``{"url", "headers", ...}``), redacted."""
    return _redact(settings, _INSIDE)


def redact_voice(voice: Any) -> Any:
    """A voice (``{provider: settings}``, or whatever stands in its place), redacted."""
    return _redact(voice, _VOICE_LIST)


def redact_tree(value: Any) -> Any:
    """Any JSON value with every voice in it redacted (the same object if none)."""
    return _redact(value, _OUTSIDE)


def redact_stage(stage: Any) -> Any:
    """The stage with voice secrets redacted; the same object when there are none."""
    return redact_tree(stage)


def redact_page(page: Any) -> Any:
    """A stages page, whatever its shape, with every voice in it redacted; raises
    :class:`RedactionError` when it cannot be."""
    return redact_tree(page)


def redact_call(call: Any) -> Any:
    """A call listed by ``GET /api/calls`` with the voices in it (top level, or nested
    e.g. under an agent) redacted."""
    return redact_tree(call)

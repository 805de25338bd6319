"""The Ultravox API's input, declared once as msgspec Structs.

Decoding into these checks types in C and says where a value is wrong (a JSON path,
never the value). Strictness is what the warehouse needs: counts are BIGINT (an
integral float such as ``12.0`` is accepted and checked integral afterwards, a string
or a boolean is not), text is text, numbers are numbers. Fields the warehouse has no
column for are not declared: they stay in the stage's received bytes, which is what
``raw`` keeps. Values stored as JSON (voices, settings, state) are ``msgspec.Raw``:
the bytes as received, never re-encoded.

msgspec refuses some JSON that ``pipeline.jsonio.loads`` accepts (a lone surrogate
escape, ``1e400``); callers fall back to ``jsonio.loads`` when :func:`needs_fallback`
says so.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from msgspec import Meta, Raw, Struct

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BigInt = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]
#: A count: a BIGINT, or a float that must be integral (checked after decoding).
Count = BigInt | float | None
#: JSON ``null``: the value of a Raw field that is absent.
NULL = Raw(b"null")


class InactivityMessage(Struct, gc=False):
    duration: str | None = None
    message: str | None = None
    endBehavior: str | None = None


class VoiceSettings(Struct):
    """The fields of a provider's settings that stage_voices has columns for (any
    provider; the others stay in the settings' bytes)."""

    voiceId: str | None = None
    model: str | None = None
    modelId: str | None = None
    speed: float | None = None
    speakingRate: float | None = None


#: ExternalVoice is a one-of keyed by provider; unknown providers are kept like known ones.
ExternalVoice = dict[str, Raw]


class Stage(Struct, gc=False):
    callId: str | None = None
    callStageId: str | None = None
    created: str | None = None
    model: str | None = None
    #: The prompt's JSON string token as received (checked by check_prompt): its text
    #: goes into its column as UTF-8, never through a str.
    systemPrompt: Raw = NULL
    temperature: float | None = None
    languageHint: str | None = None
    voice: str | None = None
    timeExceededMessage: str | None = None
    initialTokenCount: Count = None
    latestTokenCount: Count = None
    errorCount: Count = None
    inactivityMessages: list[InactivityMessage] | None = None
    externalVoice: Raw = NULL
    voiceOverrides: Raw = NULL
    experimentalSettings: Raw = NULL
    initialState: Raw = NULL


class Page(Struct):
    """A page of ``GET /api/calls/{id}/stages`` (or ``GET /api/calls``): its items as
    the bytes received."""

    results: list[Raw]
    next: str | None = None
    previous: str | None = None
    total: int | None = None


class ListedCall(Struct):
    """A call as ``GET /api/calls`` lists it (the fields discovery keeps)."""

    callId: str
    created: str | None = None
    joined: str | None = None
    ended: str | None = None
    endReason: str | None = None
    billedDuration: str | None = None
    agentId: str | None = None
    metadata: dict[str, str] | None = None


_page = msgspec.json.Decoder(Page)
_stage = msgspec.json.Decoder(Stage)
_voice = msgspec.json.Decoder(ExternalVoice)
_settings = msgspec.json.Decoder(VoiceSettings)
_listed_call = msgspec.json.Decoder(ListedCall)
_text = msgspec.json.Decoder(str | None)


def decode_page(body: bytes) -> tuple[Page, list[Raw]]:
    """A page envelope and its items' bytes; raises ``msgspec.MsgspecError``."""
    page = _page.decode(body)
    return page, page.results


def decode_stage(data: bytes | Raw) -> Stage:
    """A stage, typed; raises ``msgspec.ValidationError`` naming the field's path."""
    return _stage.decode(data)


def decode_text(token: bytes | Raw) -> str | None:
    """A JSON string (or null) token as text."""
    return _text.decode(token)


def check_prompt(token: Raw) -> None:
    """Raise ``msgspec.ValidationError`` (as decode_stage would) unless a stage's
    ``systemPrompt`` token is a string or null (msgspec has checked it is valid JSON)."""
    if memoryview(token)[:1] == b'"' or token == NULL:
        return
    try:
        decode_text(token)
    except msgspec.ValidationError as exc:
        raise msgspec.ValidationError(f"{exc} - at `$.systemPrompt`") from None


def decode_voice(data: bytes | Raw) -> ExternalVoice:
    return _voice.decode(data)


def decode_voice_settings(data: bytes | Raw) -> VoiceSettings:
    return _settings.decode(data)


def decode_listed_call(data: bytes | Raw) -> ListedCall:
    return _listed_call.decode(data)


def needs_fallback(exc: msgspec.MsgspecError) -> bool:
    """Whether ``jsonio.loads`` may still accept what msgspec refused: not JSON to
    msgspec (lone surrogates), or a number beyond a double (``1e400``)."""
    return not isinstance(exc, msgspec.ValidationError) or str(exc).startswith("Number out of range")


_TYPES = re.compile(r"Expected `([^`]*)`, got `([^`]*)`")
_KINDS = {"str": "a string", "int": "an integer", "float": "a non-integral number", "bool": "a boolean",
          "array": "a list", "object": "an object", "null": "missing"}
_WANTED = {"str": "a string", "int": "an integer", "float": "a number", "array": "a list", "object": "an object"}


def describe(exc: msgspec.ValidationError, where: str = "") -> str:
    """A validation error in the project's words: ``field is a string, expected an
    integer``. msgspec's messages name the path and the types, never the value."""
    text, _, at = str(exc).partition(" - at `")
    path = ".".join(p for p in (where, at.rstrip("`").removeprefix("$").removeprefix(".")) if p) or "the value"
    types = _TYPES.fullmatch(text)
    if types is not None:
        expected, got = types.groups()
        names = expected.split(" | ")
        if "int" in names:  # a Count: a float is accepted only when integral
            names = [n for n in names if n != "float"]
        wanted = " or ".join(_WANTED[t] for t in names if t in _WANTED) or expected
        return f"{path} is {_KINDS.get(got, got)}, expected {wanted}"
    if text.startswith("Expected `int` "):  # the one constraint declared: the BIGINT range
        return f"{path} is out of the BIGINT range"
    if text.startswith("Number out of range"):
        return f"{path} is out of the DOUBLE range"
    return f"{path}: {text}"

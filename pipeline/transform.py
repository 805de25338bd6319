"""Transform: each call's stages → Arrow tables ``call_stages``,
``stage_inactivity_messages`` and ``stage_voices`` (CONTRACT.md, "Warehouse tables").

A call is validated as a whole: one bad stage fails the call with a short reason (no
secrets, no prompt text) and none of its rows are produced; other calls are not
affected. So a call is always loaded completely or not at all.

How it is fast (bench/transform_bench.py): values are gathered column by column in
plain lists and become Arrow arrays once per batch; a failing call is rolled back by
truncating the lists. Work that is per character or per row in Python is done in bulk
instead: ``created`` timestamps are validated and parsed by Arrow, stage ids are
checked by one regex over the column, durations go through a cache of parsed strings
and become DECIMAL(38,9) via integer nanoseconds. The ``raw`` JSON is encoded by the C
JSON encoder (built once, not per call as ``json.dumps`` does) *without* the system
prompt, which is usually most of the stage's bytes; the prompt is JSON-escaped and
spliced in by DuckDB over the whole column, on both cores. Checks that run in bulk
fail their call after the fact: its rows are filtered out of the three tables.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.durations import duration_nanos
from pipeline.redact import may_hold_secret, redact_provider, redact_stage, redact_voice

ROLES = (("externalVoice", "external"), ("voiceOverrides", "override"))
#: proto3 JSON omits an enum field that has its default value.
UNSPECIFIED = "END_BEHAVIOR_UNSPECIFIED"
_TIMESTAMP = pa.timestamp("us", tz="UTC")
_DECIMAL = pa.decimal128(38, 9)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TEXT_TYPES = frozenset({str, type(None)})
_TEXT_FIELDS = (
    ("model", "model"),
    ("systemPrompt", "system_prompt"),
    ("languageHint", "language_hint"),
    ("voice", "voice"),
    ("timeExceededMessage", "time_exceeded_message"),
)
_INT_FIELDS = (
    ("initialTokenCount", "initial_token_count"),
    ("latestTokenCount", "latest_token_count"),
    ("errorCount", "error_count"),
)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_COLUMN = "^" + _UUID.pattern + "$"
#: Prompts shorter than this are encoded along with the rest of the stage.
SPLICE_MIN_CHARS = 256


class StageError(ValueError):
    """A stage that cannot be loaded; fails its whole call."""


@dataclass
class TransformResult:
    tables: dict[str, pa.Table]
    stage_counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- JSON


def _make_encoder() -> Callable[[Any], str]:
    """Compact JSON (``separators=(",", ":")``, ``ensure_ascii=False``, NaN refused).

    ``json.dumps`` builds a new C encoder on every call, which costs more than encoding
    a small object; build it once. ``allow_nan=False``: NaN/Infinity (which
    ``json.loads`` accepts) are not JSON, and DuckDB's JSON type would reject the row.
    """
    fallback = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return fallback

    def refuse(value: Any) -> Any:
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    try:
        iterencode = make(None, refuse, json.encoder.encode_basestring, None, ":", ",", False, False, False)

        def encode(value: Any) -> str:
            return "".join(iterencode(value, 0))

        probe = {"a": [1, 2.5, None, True, "é\n"], "b": {}}
        if encode(probe) == fallback(probe):
            return encode
    except TypeError:  # another interpreter's private signature
        pass
    return fallback


_encode = _make_encoder()
_encode_text: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]
#: Stand-ins for parts of a stage encoded separately (the long system prompt, the
#: redacted voices) while the rest of the stage is encoded. The JSON form of such a
#: string (quotes included) can only appear as that value, since a quote inside any
#: string is escaped; it is still checked to occur exactly once.
_PROMPT_SENTINEL = "\x00ultravox-stages:systemPrompt\x00"
_VOICE_SENTINELS = {
    "externalVoice": "\x00ultravox-stages:externalVoice\x00",
    "voiceOverrides": "\x00ultravox-stages:voiceOverrides\x00",
}
_PROMPT_SENTINEL_JSON = _encode_text(_PROMPT_SENTINEL)
_VOICE_SENTINELS_JSON = {name: _encode_text(text) for name, text in _VOICE_SENTINELS.items()}


def _json(value: Any) -> str | None:
    return None if value is None else _encode(value)


# --------------------------------------------------------------------------- values


def _kind(value: Any) -> str:
    """A value's JSON type for error messages (never the value: it may be a secret)."""
    if value is None:
        return "missing"
    if type(value) is bool:
        return "a boolean"
    if type(value) is float:
        return "a non-integral number"
    return {str: "a string", int: "an integer", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _text(value: Any, name: str) -> str | None:
    if value is None or type(value) is str:
        return value
    raise StageError(f"{name} is {_kind(value)}, expected a string")


def _integer(value: Any, name: str) -> int | None:
    # bool is an int subclass: type() rather than isinstance() keeps True out.
    if type(value) is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
        raise StageError(f"{name} is out of the BIGINT range")
    if value is None:
        return None
    if type(value) is float and value.is_integer():  # 12.0 is a JSON integer too
        return _integer(int(value), name)
    raise StageError(f"{name} is {_kind(value)}, expected an integer")


def _number(value: Any, name: str) -> float | None:
    if type(value) is float:
        return value
    if value is None:
        return None
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            raise StageError(f"{name} is out of the DOUBLE range") from None
    raise StageError(f"{name} is {'a string' if type(value) is str else _kind(value)}, expected a number")


#: Parsed durations by text: the API uses a handful of values ("30s", "15s", ...).
_nanos_cache: dict[str, int] = {}


def _duration_nanos(text: Any, where: str) -> int:
    try:
        # The OpenAPI pattern allows 12 integer digits, beyond protobuf's range: a
        # call the API's schema allows is loaded, its value kept exactly.
        nanos = duration_nanos(text, check_range=False)
    except ValueError as exc:
        raise StageError(f"{where}: {exc}") from None
    if len(_nanos_cache) >= 4096:
        _nanos_cache.clear()
    _nanos_cache[text] = nanos
    return nanos


def _provider(voice: dict[str, Any]) -> tuple[str, Any]:
    """ExternalVoice is a one-of: the provider is the key that is set. Unknown keys
    (retired ``playHt``, future providers) are providers as well. If several are set
    (the API should not), the first with a non-null value wins."""
    for key, value in voice.items():
        if value is not None:
            return str(key), value
    key = next(iter(voice))
    return str(key), None


def _first(settings: dict[str, Any], names: tuple[str, str]) -> Any:
    value = settings.get(names[0])
    return settings.get(names[1]) if value is None else value


# --------------------------------------------------------------------------- timestamps

# The shapes the API sends, which Arrow's cast parses exactly like the slow path.
_CREATED_FAST = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$"
# RFC 3339 date-time: "T"/"Z" in either case (RFC 3339 §5.6), a space for "T" (common),
# any number of fractional digits (truncated to microseconds).
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 timestamp as an aware UTC datetime (microsecond precision)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"created {text[:40]!r} is not an RFC 3339 timestamp")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        micros = int(fraction[:6].ljust(6, "0")) if fraction else 0
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros)
        offset = timedelta(0)
        if not zulu:
            if int(off_m) > 59:
                raise ValueError("offset minutes out of range")
            offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (-1 if sign == "-" else 1)
        return local.replace(tzinfo=timezone(offset)).astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise ValueError(f"created {text[:40]!r} is not a valid date and time") from None


def _timestamps(values: Sequence[str]) -> tuple[pa.Array, dict[int, str]]:
    """Parse a column of ``created`` strings: (array, {row: reason} for bad rows)."""
    strings = _strings(values)
    if pc.all(pc.match_substring_regex(strings, _CREATED_FAST)).as_py() is not False:
        try:
            return strings.cast(_TIMESTAMP), {}
        except pa.ArrowInvalid:
            pass  # e.g. February 30th: the slow path finds out which rows
    parsed: list[datetime | None] = []
    bad: dict[int, str] = {}
    for row, text in enumerate(values):
        try:
            parsed.append(parse_rfc3339(text))
        except ValueError as exc:
            parsed.append(None)
            bad[row] = str(exc)
    return pa.array(parsed, _TIMESTAMP), bad


# --------------------------------------------------------------------------- columns


def _decimal_seconds(nanos: Sequence[int | None]) -> pa.Array:
    """DECIMAL(38,9) from integer nanoseconds, exactly: the decimal's unscaled value is
    the nanosecond count, so cast to DECIMAL(38,0) and reinterpret the scale."""
    try:
        unscaled = pa.array(nanos, pa.int64()).cast(pa.decimal128(38, 0))
    except (OverflowError, pa.ArrowInvalid):  # beyond ±292 years: rare, slower
        unscaled = pa.array(nanos, pa.decimal128(38, 0))
    return unscaled.view(_DECIMAL)


def _strings(values: Sequence[str | None]) -> pa.Array:
    try:
        return pa.array(values, pa.string())
    except UnicodeEncodeError:
        # json.loads turns an escaped lone surrogate ("\ud800") into a str that is not
        # valid UTF-8. Keep the row, with U+FFFD in its place.
        return pa.array(
            [v if v is None else v.encode("utf-8", "replace").decode("utf-8") for v in values], pa.string()
        )


_local = threading.local()


def _duckdb() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB for this thread (a connection is not thread-safe, and
    opening one costs tens of milliseconds)."""
    con: duckdb.DuckDBPyConnection | None = getattr(_local, "duckdb", None)
    if con is None:
        con = _local.duckdb = duckdb.connect()
    return con


def _splice_raw(heads: Sequence[str], prompts: pa.Array, tails: Sequence[str | None]) -> pa.Array | pa.ChunkedArray:
    """``head + JSON(prompt) + tail`` per row (tail None: the head is the whole JSON).

    JSON-escaping a few KB of prompt per stage is the costliest step in Python (the
    C encoder: ~9 ns a character here); DuckDB's ``to_json`` does it 4× faster, over
    the column, on all cores (one per record batch), without the GIL.
    """
    if all(tail is None for tail in tails):
        return _strings(heads)
    table = pa.table({"h": _strings(heads), "p": prompts, "t": _strings(tails)})
    con = _duckdb()
    chunk = -(-len(table) // max(1, os.cpu_count() or 1))
    con.register("stages", pa.Table.from_batches(table.to_batches(max_chunksize=chunk)))
    try:
        # A plain projection keeps the input order (preserve_insertion_order).
        result = con.sql("SELECT h || coalesce(to_json(p)::VARCHAR || t, '') AS raw FROM stages").to_arrow_table()
    finally:
        con.unregister("stages")
    raw = result.column(0)
    return raw if raw.type == pa.string() else raw.cast(pa.string())


# --------------------------------------------------------------------------- batch


class _Batch:
    """Rows for the three tables, filled call by call.

    A row is one tuple in the table's column order (one append per row instead of one
    per column); the lists are transposed into columns once, in :meth:`tables`.
    Stage tuples end with the two parts of ``raw`` (see :func:`_splice_raw`) instead of
    ``raw``, ``run_id`` and ``extracted_at``.
    """

    def __init__(self) -> None:
        self.stage_rows: list[tuple[Any, ...]] = []
        self.message_rows: list[tuple[Any, ...]] = []
        self.voice_rows: list[tuple[Any, ...]] = []

    def mark(self) -> tuple[int, int, int]:
        return len(self.stage_rows), len(self.message_rows), len(self.voice_rows)

    def rollback(self, mark: tuple[int, int, int]) -> None:
        del self.stage_rows[mark[0]:]
        del self.message_rows[mark[1]:]
        del self.voice_rows[mark[2]:]

    def add_call(self, call_id: str, stages: Sequence[Any]) -> None:
        seen: set[str] = set()
        for index, stage in enumerate(stages):
            if not isinstance(stage, dict):
                raise StageError(f"stage {index} is {_kind(stage)}, not an object")
            stage_id = _stage_id(stage, index, call_id)
            if stage_id in seen:
                raise StageError(f"stage {stage_id} appears twice")
            seen.add(stage_id)
            try:
                self._add_stage(stage, stage_id, call_id, index)
            except StageError as exc:
                raise StageError(f"stage {stage_id}: {exc}") from None

    def _add_stage(self, stage: dict[str, Any], stage_id: str, call_id: str, index: int) -> None:
        get = stage.get
        created = get("created")
        if type(created) is not str:
            raise StageError(f"created is {_kind(created)}, expected an RFC 3339 timestamp")
        texts = get("model"), get("systemPrompt"), get("languageHint"), get("voice"), get("timeExceededMessage")
        if not _TEXT_TYPES.issuperset(map(type, texts)):
            texts = tuple(_text(value, api) for value, (api, _) in zip(texts, _TEXT_FIELDS))
        initial = _integer(get("initialTokenCount"), "initialTokenCount")
        latest = _integer(get("latestTokenCount"), "latestTokenCount")
        errors = _integer(get("errorCount"), "errorCount")
        temperature = get("temperature")
        if type(temperature) is not float:
            temperature = _number(temperature, "temperature")
        voices = self._add_voices(stage, stage_id, call_id)
        head, tail = _raw_parts(stage, texts[1], voices)
        messages = get("inactivityMessages")
        count = 0 if messages is None else self._add_messages(messages, stage_id, call_id)
        self.stage_rows.append((
            stage_id, call_id, index, created, texts[0], texts[1], temperature, texts[2], texts[3], texts[4],
            initial, latest, errors, _json(get("experimentalSettings")), _json(get("initialState")), count,
            head, tail,
        ))

    def _add_messages(self, messages: Any, stage_id: str, call_id: str) -> int:
        if type(messages) is not list:
            raise StageError(f"inactivityMessages is {_kind(messages)}, expected a list")
        append = self.message_rows.append
        cache = _nanos_cache
        offset = 0
        for position, message in enumerate(messages):
            if type(message) is not dict:
                raise StageError(f"inactivityMessages[{position}] is {_kind(message)}, not an object")
            duration, text, end = message.get("duration"), message.get("message"), message.get("endBehavior")
            nanos: int | None = None
            if duration is not None:
                nanos = cache.get(duration) if type(duration) is str else None
                if nanos is None:
                    nanos = _duration_nanos(duration, f"inactivityMessages[{position}]")
                # "Durations are cumulative, so a message m > 1 with duration 30s will
                # be spoken 30 seconds after message m-1": offset = running sum. A
                # message without a duration adds nothing (proto3 default: 0s).
                offset += nanos
            if end is None:
                end = UNSPECIFIED  # proto3 JSON leaves an enum out at its default value
            if type(text) is not str or type(end) is not str:
                _text(text, f"inactivityMessages[{position}].message")
                _text(end, f"inactivityMessages[{position}].endBehavior")
            append((stage_id, call_id, position, duration, nanos, offset, text, end))
        return len(messages)

    def _add_voices(self, stage: dict[str, Any], stage_id: str, call_id: str) -> dict[str, str]:
        """Voice rows; returns the redacted JSON of each voice, for ``raw``."""
        pieces: dict[str, str] = {}
        for api_field, role in ROLES:
            voice = stage.get(api_field)
            if voice is None:
                continue
            if not isinstance(voice, dict):
                raise StageError(f"{api_field} is {_kind(voice)}, not an object")
            if voice:
                columns, pieces[api_field] = _voice_columns(api_field, voice)
                self.voice_rows.append((stage_id, call_id, role, *columns))
        return pieces

    # ----------------------------------------------------------------- to Arrow

    def columns(self) -> tuple[list[Sequence[Any]], list[Sequence[Any]], list[Sequence[Any]]]:
        """The rows transposed: one sequence per column."""
        return (
            _transpose(self.stage_rows, len(schema.CALL_STAGES.columns) - 1),
            _transpose(self.message_rows, len(schema.STAGE_INACTIVITY_MESSAGES.columns)),
            _transpose(self.voice_rows, len(schema.STAGE_VOICES.columns)),
        )


def _stage_id(stage: dict[str, Any], index: int, call_id: str) -> str:
    """The stage's id, lower-cased, after checking the stage belongs to ``call_id``."""
    stage_id = stage.get("callStageId")
    if type(stage_id) is not str:
        raise StageError(f"stage {index} has no callStageId")
    # Checked to be a UUID in bulk afterwards (_check_rows).
    stage_id = stage_id.lower()
    owner = stage.get("callId")
    if owner != call_id and (type(owner) is not str or owner.lower() != call_id):
        if owner is None:
            raise StageError(f"stage {stage_id[:40]} has no callId")
        if type(owner) is not str:
            raise StageError(f"stage {stage_id[:40]}: callId is {_kind(owner)}, expected a UUID")
        raise StageError(f"stage {stage_id[:40]} belongs to call {owner[:40]}")
    return stage_id


def _raw_parts(stage: dict[str, Any], prompt: str | None, voices: dict[str, str]) -> tuple[str, str | None]:
    """The redacted stage's JSON for ``raw``, a long prompt left out: (before, after)
    it, or (all of it, None). ``voices`` are the voices' redacted JSON, already
    encoded for stage_voices, so they are put in as text rather than encoded twice."""
    try:
        shell = dict(stage)
        for name in voices:
            shell[name] = _VOICE_SENTINELS[name]
        long_prompt = prompt is not None and len(prompt) >= SPLICE_MIN_CHARS
        if long_prompt:
            shell["systemPrompt"] = _PROMPT_SENTINEL
        text = _encode(shell)
        for name, piece in voices.items():
            at = _find_once(text, _VOICE_SENTINELS_JSON[name])
            if at < 0:
                return _encode(redact_stage(stage)), None
            text = text[:at] + piece + text[at + len(_VOICE_SENTINELS_JSON[name]):]
        at = _find_once(text, _PROMPT_SENTINEL_JSON) if long_prompt else -1
        if at < 0:
            return (_encode(redact_stage(stage)), None) if long_prompt else (text, None)
        return text[:at], text[at + len(_PROMPT_SENTINEL_JSON):]
    except ValueError:
        raise StageError("contains NaN or Infinity, which JSON cannot hold") from None
    except RecursionError:
        raise StageError("is nested too deeply") from None


def _find_once(text: str, part: str) -> int:
    """Where ``part`` is in ``text`` if it is there exactly once, else -1."""
    at = text.find(part)
    return at if at >= 0 and text.find(part, at + 1) < 0 else -1


def _settings_json(settings: Any) -> tuple[Any, str | None]:
    """A provider object redacted, and its JSON. Usually there is nothing to redact,
    which the JSON text tells cheaply (see redact.may_hold_secret)."""
    if settings is None:
        return None, None
    text = _encode(settings)
    if may_hold_secret(text):
        clean = redact_provider(settings)
        if clean is not settings:
            return clean, _encode(clean)
    return settings, text


def _voice_columns(api_field: str, voice: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    """(provider, voice_id, model, speed, settings) of one ExternalVoice, and the
    voice's redacted JSON."""
    try:
        if len(voice) == 1:
            ((key, settings),) = voice.items()
            provider = str(key)
            settings, settings_json = _settings_json(settings)
            piece = "{" + _encode_text(provider) + ":" + (settings_json or "null") + "}"
        else:  # the API sets exactly one provider; cope with more, slowly
            redacted = redact_voice(voice)
            provider, settings = _provider(redacted)
            settings_json, piece = _json(settings), _encode(redacted)
    except ValueError:
        raise StageError(f"{api_field} contains NaN or Infinity") from None
    voice_id = model = speed = None
    if type(settings) is dict:
        get = settings.get
        voice_id, model, speed = get("voiceId"), get("model"), get("speed")
        if model is None:
            model = get("modelId")
        if speed is None:
            speed = get("speakingRate")
        if type(voice_id) is not str or type(model) is not str or type(speed) is not float:
            where = f"{api_field}.{provider[:40]}"
            voice_id = _text(voice_id, f"{where}.voiceId")
            model = _text(model, f"{where}.model")
            speed = _number(speed, f"{where}.speed")
    return (provider, voice_id, model, speed, settings_json), piece


def _transpose(rows: list[tuple[Any, ...]], width: int) -> list[Sequence[Any]]:
    return list(zip(*rows)) if rows else [() for _ in range(width)]


#: Field order of the row tuples built by _Batch (tables are assembled by name).
_STAGE_ROW = (
    "call_stage_id", "call_id", "stage_index", "created", "model", "system_prompt", "temperature",
    "language_hint", "voice", "time_exceeded_message", "initial_token_count", "latest_token_count",
    "error_count", "experimental_settings", "initial_state", "inactivity_message_count", "raw_head", "raw_tail",
)
_MESSAGE_ROW = (
    "call_stage_id", "call_id", "position", "duration", "duration_seconds", "offset_seconds", "message",
    "end_behavior",
)
_VOICE_ROW = ("call_stage_id", "call_id", "role", "provider", "voice_id", "model", "speed", "settings")


def _column(values: Sequence[Any], column: schema.Column) -> pa.Array:
    if column.sql_type == schema.DECIMAL:
        return _decimal_seconds(values)
    if column.arrow_type == pa.string():
        return _strings(values)
    return pa.array(values, column.arrow_type)


def _table(table: schema.Table, values: dict[str, Any]) -> pa.Table:
    """An Arrow table in the schema's column order from lists/arrays by column name."""
    arrays = [v if isinstance(v, (pa.Array, pa.ChunkedArray)) else _column(v, c) for c in table.columns
              for v in (values[c.name],)]
    return pa.Table.from_arrays(arrays, schema=table.arrow_schema)


def _check_stage_rows(stage_cols: dict[str, Sequence[Any]]) -> tuple[dict[int, str], pa.Array]:
    """Bulk checks over all stages of the batch: ({row: reason} for rows whose
    callStageId is not a UUID or whose ``created`` is not RFC 3339, parsed ``created``)."""
    ids = stage_cols["call_stage_id"]
    bad: dict[int, str] = {}
    if ids and not pc.all(pc.match_substring_regex(_strings(ids), _UUID_COLUMN)).as_py():
        for row, stage_id in enumerate(ids):
            if not _UUID.fullmatch(stage_id):
                bad[row] = f"stage {stage_cols['stage_index'][row]}: callStageId is not a UUID"
    created, bad_created = _timestamps(stage_cols["created"])
    for row, reason in bad_created.items():
        bad.setdefault(row, f"stage {ids[row][:40]}: {reason}")
    return bad, created


def _without_calls(tables: dict[str, pa.Table], call_ids: list[str]) -> dict[str, pa.Table]:
    if not call_ids:
        return tables
    drop = pa.array(call_ids, pa.string())
    return {name: t.filter(pc.invert(pc.is_in(t["call_id"], value_set=drop))) for name, t in tables.items()}


def _claim_stage_ids(owners: dict[str, str], rows: list[tuple[Any, ...]], call_id: str) -> None:
    """A stage id belongs to one call: the same id under two calls of one batch
    (an API bug) would break call_stages' primary key, so the later call fails."""
    for row in rows:
        owner = owners.get(row[0])
        if owner is not None and owner != call_id:
            raise StageError(f"stage {row[0]} also belongs to call {owner}")
    for row in rows:
        owners[row[0]] = call_id


def _normal_call_id(call_id: Any) -> str | None:
    if type(call_id) is not str:
        return None
    lowered = call_id.strip().lower()
    return lowered if _UUID.fullmatch(lowered) else None


def transform_calls(
    calls: Sequence[tuple[str, Sequence[Any]]], run_id: str, extracted_at: datetime
) -> TransformResult:
    """Flatten each call's stages (in API order, not yet redacted) into the three
    data tables. Calls that fail validation are in ``failures`` and have no rows."""
    result = TransformResult(tables={})
    batch = _Batch()
    keys: dict[str, str] = {}  # normalised id → the caller's id
    owners: dict[str, str] = {}  # stage id → the call that has it in this batch
    # A call listed twice: the later stages win (like the loader's replace-per-call).
    for call_id, stages in {call_id: stages for call_id, stages in calls}.items():
        normal = _normal_call_id(call_id)
        if normal is None or normal in keys:
            result.failures[call_id] = "call id is not a UUID" if normal is None else "call listed twice"
            continue
        mark = batch.mark()
        try:
            if not isinstance(stages, (list, tuple)):
                raise StageError(f"stages are {_kind(stages)}, expected a list")
            batch.add_call(normal, stages)
            _claim_stage_ids(owners, batch.stage_rows[mark[0]:], normal)
        except StageError as exc:
            batch.rollback(mark)
            result.failures[call_id] = " ".join(str(exc).split())[:300]
            continue
        keys[normal] = call_id
        result.stage_counts[call_id] = len(stages)

    stage_lists, message_lists, voice_lists = batch.columns()
    stage_cols = dict(zip(_STAGE_ROW, stage_lists))
    bad_rows, created = _check_stage_rows(stage_cols)
    failed: list[str] = []
    for row, reason in sorted(bad_rows.items()):
        normal = stage_cols["call_id"][row]
        if keys[normal] not in result.failures:
            failed.append(normal)
            result.failures[keys[normal]] = reason[:300]
            del result.stage_counts[keys[normal]]

    n = len(created)
    prompts = _strings(stage_cols["system_prompt"])
    stage_values: dict[str, Any] = {
        **stage_cols,
        "created": created,
        "system_prompt": prompts,
        "raw": _splice_raw(stage_cols["raw_head"], prompts, stage_cols["raw_tail"]),
        "run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
        "extracted_at": pa.repeat(pa.scalar(extracted_at, _TIMESTAMP), n),
    }
    tables = {
        schema.CALL_STAGES.name: _table(schema.CALL_STAGES, stage_values),
        schema.STAGE_INACTIVITY_MESSAGES.name: _table(
            schema.STAGE_INACTIVITY_MESSAGES, dict(zip(_MESSAGE_ROW, message_lists))
        ),
        schema.STAGE_VOICES.name: _table(schema.STAGE_VOICES, dict(zip(_VOICE_ROW, voice_lists))),
    }
    result.tables = _without_calls(tables, failed)
    return result

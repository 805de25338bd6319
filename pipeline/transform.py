"""Transform: each call's stages → Arrow tables ``call_stages``,
``stage_inactivity_messages`` and ``stage_voices`` (the warehouse tables).

A call is validated as a whole: one bad stage fails the call with a short reason (no
secrets, no prompt text) and none of its rows are produced; other calls are not
affected, whatever the exception. So a call is always loaded completely or not at all.

A stage comes as the bytes received (``msgspec.Raw``, from the raw landing zone) or as
a decoded object (from the extractor). Either way it is decoded into the declared
:class:`pipeline.api_schema.Stage`, so type checks run in C, and ``raw`` is the
stage's JSON bytes: as received, unless the stage holds something to redact (then it
is redacted by pipeline.redact's rule and re-encoded). Bytes msgspec refuses (a lone
surrogate escape, ``1e400``), and a ``\\u`` escape outside the prompt (it may spell a
key), are decoded by ``jsonio.loads`` and re-encoded instead. The prompt, text where no
key can be, is left out of those byte scans and kept as its JSON token until its column is built.
Values become columns once per batch (pipeline.columns: Arrow's layout, built without
pyarrow, which replay's reader never loads); checks that are cheaper over a column
(UUIDs, timestamps, integral counts) run in bulk and fail their call after the fact.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from pipeline import columns, jsonio, schema
from pipeline.api_schema import (
    INT64_MAX, INT64_MIN, NULL, Stage, check_prompt, decode_stage, decode_text, decode_voice, decode_voice_settings,
    describe, needs_fallback,
)
from pipeline.durations import duration_nanos
from pipeline.records import CANONICAL_UUID, micros, parse_rfc3339
from pipeline.redact import RedactionError, fold_ascii, may_hold_secret, redact_stage, redact_voice

ROLES = (("externalVoice", "external"), ("voiceOverrides", "override"))
#: proto3 JSON omits an enum field that has its default value.
UNSPECIFIED = "END_BEHAVIOR_UNSPECIFIED"
#: Stage ids of 36 characters each, joined: all are UUIDs when this matches (one pass in C).
_UUIDS = re.compile(f"(?:{CANONICAL_UUID.pattern})*")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: A ``\\u`` escape (a regex finds it faster than ``in`` among many ``\\n`` escapes).
_ESCAPE_U = re.compile(rb"\\u")
#: The prompt's key as compact JSON writes it (an unescaped quote starts no text inside a string).
_PROMPT_KEY = b'"systemPrompt":'
_COUNT_FIELDS = (
    ("initial_token_count", "initialTokenCount"),
    ("latest_token_count", "latestTokenCount"),
    ("error_count", "errorCount"),
)


class StageError(ValueError):
    """A stage that cannot be loaded; fails its whole call."""


@dataclass
class TransformResult:
    #: By table name: Arrow tables (transform_calls) or their columns (transform_columns).
    tables: dict[str, Any]
    stage_counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- values


def _kind(value: Any) -> str:
    """A value's JSON type for error messages (never the value: it may be a secret)."""
    if value is None:
        return "missing"
    if type(value) is bool:
        return "a boolean"
    if type(value) is float:
        return "a non-integral number"
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


#: Parsed durations by text: the API uses a handful of values ("30s", "15s", ...).
_nanos_cache: dict[str, int] = {}
#: Kept per distinct value; cleared when full (the values repeat: a few voices and durations per account).
_CACHE_ENTRIES = 4096


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    if len(cache) >= _CACHE_ENTRIES:
        cache.clear()
    cache[key] = value
    return value


def _duration_nanos(text: str, where: str) -> int:
    nanos = _nanos_cache.get(text)
    if nanos is not None:
        return nanos
    try:
        # The OpenAPI pattern allows 12 integer digits, beyond protobuf's range: a
        # call the API's schema allows is loaded, its value kept exactly.
        nanos = duration_nanos(text, check_range=False)
    except ValueError as exc:
        raise StageError(f"{where}: {exc}") from None
    return _remember(_nanos_cache, text, nanos)


# --------------------------------------------------------------------------- timestamps


def _timestamps(values: Sequence[str | None]) -> tuple[list[int | None], dict[int, str]]:
    """Parse a column of ``created`` strings: (microseconds, {row: reason} for bad rows)."""
    parsed: list[int | None] = []
    bad: dict[int, str] = {}
    for row, text in enumerate(values):
        if text is None:
            parsed.append(None)
            bad[row] = "created is missing, expected an RFC 3339 timestamp"
            continue
        try:
            parsed.append(micros(parse_rfc3339(text)))
        except ValueError as exc:
            parsed.append(None)
            bad[row] = str(exc)
    return parsed, bad


# --------------------------------------------------------------------------- columns


#: JSON escapes that Python's escape_decode reads otherwise (or not at all).
_NOT_PYTHON_ESCAPE = re.compile(rb"\\[u/]")


def _text_column(tokens: Sequence[msgspec.Raw]) -> columns.Buffers:
    """JSON string tokens (or null) → a string column."""
    return columns.utf8([_unescaped(token) for token in tokens])


def _unescaped(token: msgspec.Raw) -> bytes | None:
    """A token's text as UTF-8. msgspec has checked the token, so it holds no escape but
    JSON's; all of them except ``\\u`` and ``\\/`` mean the same to escape_decode (in C)."""
    body = memoryview(token)
    if body[:1] != b'"':
        return None
    if _NOT_PYTHON_ESCAPE.search(body):
        return decode_text(token).encode()  # type: ignore[union-attr]
    return codecs.escape_decode(body[1:-1])[0]


# --------------------------------------------------------------------------- stage bytes


def _encode(value: Any) -> bytes:
    """Compact JSON, as the landing zone writes it. NaN/Infinity (which ``json.loads``
    accepts) are not JSON: DuckDB's JSON type would reject the row."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise StageError("contains NaN or Infinity, which JSON cannot hold") from None
    except RecursionError:
        raise StageError("is nested too deeply") from None
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate from a decoder other than jsonio.loads
        return _SURROGATE.sub("\ufffd", text).encode()


def _voices_elsewhere(data: bytes, stage: Stage) -> bool:
    """Whether the stage's JSON names a voice anywhere but in its own two voice keys
    (cheap on bytes; a prompt naming one only costs the full redaction)."""
    expected = (stage.externalVoice is not NULL) + (stage.voiceOverrides is not NULL)
    folded = fold_ascii(data)
    return folded.count(b"externalvoice") + folded.count(b"voiceoverride") != expected


def _needs_redaction(data: bytes, stage: Stage) -> bool:
    """Whether redact_stage might change the stage (``data`` has no ``\\u`` escapes):
    only its two voices can, when no other key names a voice."""
    if _voices_elsewhere(data, stage):
        return True
    return any(voice is not NULL and _voice_needs_redaction(bytes(voice)) for voice in (stage.externalVoice, stage.voiceOverrides))


#: Voice JSON → whether redaction would change it.
_redaction_cache: dict[bytes, bool] = {}


def _voice_needs_redaction(data: bytes) -> bool:
    known = _redaction_cache.get(data)
    if known is None:
        value = jsonio.loads(data) if may_hold_secret(data) else None
        known = _remember(_redaction_cache, data, value is not None and redact_voice(value) is not value)
    return known


def _from_object(value: Any, index: int) -> tuple[bytes, Stage]:
    if not isinstance(value, dict):
        raise StageError(f"stage {index} is {_kind(value)}, not an object")
    data = _encode(redact_stage(value))
    try:
        return data, _typed(data)
    except msgspec.ValidationError as exc:
        raise StageError(_decode_reason(exc, index)) from None


def _typed(data: bytes) -> Stage:
    """The stage decoded, its prompt checked to be text."""
    stage = decode_stage(data)
    check_prompt(stage.systemPrompt)
    return stage


def _decode_reason(exc: msgspec.ValidationError, index: int) -> str:
    text = describe(exc)
    if text.startswith("the value is "):  # the stage itself is not an object
        return f"stage {index} is {text[len('the value is '):].split(',')[0]}, not an object"
    return f"stage {index}: {text}"


def stage_bytes(item: Any, index: int) -> tuple[bytes, Stage]:
    """A stage's JSON bytes for ``raw`` (redacted) and its typed form."""
    if not isinstance(item, (msgspec.Raw, bytes)):
        return _from_object(item, index)
    data = bytes(item)
    try:
        stage = _typed(data)
    except msgspec.ValidationError as exc:
        if not needs_fallback(exc):
            raise StageError(_decode_reason(exc, index)) from None
        return _from_object(jsonio.loads(data), index)
    except msgspec.MsgspecError:  # e.g. a lone surrogate escape: jsonio.loads replaces it
        return _from_object(jsonio.loads(data), index)
    keys = _outside_prompt(data, stage.systemPrompt)
    if _ESCAPE_U.search(keys) or _needs_redaction(keys, stage):  # an escape may spell a key
        return _from_object(jsonio.loads(data), index)
    return data, stage


def _outside_prompt(data: bytes, prompt: msgspec.Raw) -> bytes:
    """The stage's bytes without its prompt's string token (text, where no key can be),
    or all of them when the token is not right after the first prompt key."""
    if prompt == NULL:
        return data
    at = data.find(_PROMPT_KEY)
    if at < 0:
        return data
    start = at + len(_PROMPT_KEY)
    end = start + len(memoryview(prompt))
    if not data.startswith(prompt, start):  # type: ignore[arg-type]
        return data
    return data[:at] + data[end:]


# --------------------------------------------------------------------------- batch


class _Batch:
    """Rows for the three tables, filled call by call.

    A row is one tuple in the table's column order (one append per row instead of one
    per column); the lists are transposed into columns once, by :func:`_batch_tables`.
    Stage tuples end with ``raw`` (bytes) instead of ``raw``, ``run_id`` and ``extracted_at``.
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
        for index, item in enumerate(stages):
            data, stage = stage_bytes(item, index)
            stage_id = _stage_id(stage, index, call_id)
            if stage_id in seen:
                raise StageError(f"stage {stage_id} appears twice")
            seen.add(stage_id)
            try:
                self._add_stage(stage, data, stage_id, call_id, index)
            except Exception as exc:
                raise StageError(f"stage {stage_id[:40]}: {failure_reason(exc)}") from None

    def _add_stage(self, stage: Stage, data: bytes, stage_id: str, call_id: str, index: int) -> None:
        self._add_voices(stage, stage_id, call_id)
        messages = stage.inactivityMessages
        count = 0 if messages is None else self._add_messages(messages, stage_id, call_id)
        settings, state = stage.experimentalSettings, stage.initialState
        self.stage_rows.append((
            stage_id, call_id, index, stage.created, stage.model, stage.systemPrompt, stage.temperature,
            stage.languageHint, stage.voice, stage.timeExceededMessage, stage.initialTokenCount,
            stage.latestTokenCount, stage.errorCount,
            None if settings == NULL else bytes(settings), None if state == NULL else bytes(state), count, data,
        ))

    def _add_messages(self, messages: list[Any], stage_id: str, call_id: str) -> int:
        append = self.message_rows.append
        offset = 0
        for position, message in enumerate(messages):
            duration, end = message.duration, message.endBehavior
            nanos: int | None = None
            if duration is not None:
                nanos = _duration_nanos(duration, f"inactivityMessages[{position}]")
                # "Durations are cumulative, so a message m > 1 with duration 30s will
                # be spoken 30 seconds after message m-1": offset = running sum. A
                # message without a duration adds nothing (proto3 default: 0s).
                offset += nanos
            append((stage_id, call_id, position, duration, nanos, offset, message.message, end or UNSPECIFIED))
        return len(messages)

    def _add_voices(self, stage: Stage, stage_id: str, call_id: str) -> None:
        for api_field, role in ROLES:
            raw = getattr(stage, api_field)
            if raw == NULL:
                continue
            columns = _voice_row(api_field, bytes(raw))
            if isinstance(columns, str):
                raise StageError(columns)
            if columns:
                self.voice_rows.append((stage_id, call_id, role, *columns))



#: (field, voice JSON) → its stage_voices columns, () for an empty voice, or why it fails its stage.
_voice_cache: dict[tuple[str, bytes], tuple[Any, ...] | str] = {}


def _voice_row(api_field: str, data: bytes) -> tuple[Any, ...] | str:
    key = (api_field, data)
    columns = _voice_cache.get(key)
    if columns is None:
        try:
            voice = decode_voice(data)
            columns = _voice_columns(api_field, voice) if voice else ()
        except msgspec.ValidationError as exc:
            columns = describe(exc, api_field)
        except StageError as exc:
            columns = str(exc)
        _remember(_voice_cache, key, columns)
    return columns


def _provider(voice: dict[str, msgspec.Raw]) -> str:
    """ExternalVoice is a one-of: the provider is the key that is set. Unknown keys
    (retired ``playHt``, future providers) are providers as well. If several are set
    (the API should not), the first with a non-null value wins."""
    return next((key for key, value in voice.items() if value != NULL), next(iter(voice)))


def _voice_columns(api_field: str, voice: dict[str, msgspec.Raw]) -> tuple[Any, ...]:
    """(provider, voice_id, model, speed, settings JSON) of one (redacted) ExternalVoice."""
    provider = _provider(voice)
    settings = voice[provider]
    if settings == NULL:
        return provider, None, None, None, None
    data = bytes(settings)
    if not data.startswith(b"{"):  # not an object (the API sends one): kept as JSON only
        return provider, None, None, None, data
    try:
        values = decode_voice_settings(data)
    except msgspec.ValidationError as exc:
        raise StageError(describe(exc, f"{api_field}.{provider[:40]}")) from None
    model = values.modelId if values.model is None else values.model
    speed = values.speakingRate if values.speed is None else values.speed
    return provider, values.voiceId, model, speed, data


def failure_reason(exc: BaseException) -> str:
    """One line for a call that cannot be flattened: the StageError's own words, else
    the kind of problem (never an exception's text, which may quote a value)."""
    if isinstance(exc, StageError):
        text = str(exc)
    elif isinstance(exc, RedactionError):
        text = "a voice is nested too deeply to be redacted"
    elif isinstance(exc, jsonio.JSONTooDeep) or isinstance(exc, RecursionError):
        text = "is nested too deeply"
    elif isinstance(exc, jsonio.JSONError):
        text = "is not valid JSON"
    elif isinstance(exc, UnicodeError):
        text = "holds text that is not valid Unicode"
    elif isinstance(exc, columns.TooMuchText):
        text = str(exc)
    elif isinstance(exc, OverflowError):
        text = "holds a number out of range"
    else:
        text = f"could not be flattened ({type(exc).__name__})"
    return " ".join(text.split())[:300]


def _stage_id(stage: Stage, index: int, call_id: str) -> str:
    """The stage's id, lower-cased, after checking the stage belongs to ``call_id``."""
    stage_id = stage.callStageId
    if stage_id is None:
        raise StageError(f"stage {index} has no callStageId")
    # Checked to be a UUID in bulk afterwards (_check_stage_rows).
    stage_id = stage_id.lower()
    owner = stage.callId
    if owner != call_id and (owner is None or owner.lower() != call_id):
        if owner is None:
            raise StageError(f"stage {stage_id[:40]} has no callId")
        raise StageError(f"stage {stage_id[:40]} belongs to call {owner[:40]}")
    return stage_id


def _transpose(rows: list[tuple[Any, ...]], width: int) -> list[Sequence[Any]]:
    return list(zip(*rows)) if rows else [() for _ in range(width)]


#: Field order of the row tuples built by _Batch (tables are assembled by name).
_STAGE_ROW = (
    "call_stage_id", "call_id", "stage_index", "created", "model", "system_prompt", "temperature",
    "language_hint", "voice", "time_exceeded_message", "initial_token_count", "latest_token_count",
    "error_count", "experimental_settings", "initial_state", "inactivity_message_count", "raw",
)
_MESSAGE_ROW = (
    "call_stage_id", "call_id", "position", "duration", "duration_seconds", "offset_seconds", "message",
    "end_behavior",
)
_VOICE_ROW = ("call_stage_id", "call_id", "role", "provider", "voice_id", "model", "speed", "settings")
_JSON_COLUMNS = frozenset({"experimental_settings", "initial_state", "raw", "settings"})
#: Columns whose rows hold a JSON string token (msgspec.Raw, or null) rather than text.
_TOKEN_COLUMNS = frozenset({"system_prompt"})
_DATA_TABLES = (schema.CALL_STAGES, schema.STAGE_INACTIVITY_MESSAGES, schema.STAGE_VOICES)


def _column(values: Sequence[Any], column: schema.Column) -> columns.Buffers:
    if column.name in _JSON_COLUMNS:
        return columns.utf8(values)
    if column.name in _TOKEN_COLUMNS:
        return _text_column(values)
    return columns.column(column.sql_type, values)


def _table(table: schema.Table, values: dict[str, Any], rows: int) -> columns.TableColumns:
    """A table's columns in the schema's column order from lists (or ready columns) by name."""
    built = [v if isinstance(v, columns.Buffers) else _column(v, c) for c in table.columns for v in (values[c.name],)]
    return columns.TableColumns(table.name, rows, built)


def _integral_counts(stage_cols: dict[str, Sequence[Any]], bad: dict[int, str]) -> None:
    """Counts decoded as floats (``12.0``) become integers; fractional ones fail the row."""
    for column, api_field in _COUNT_FIELDS:
        values = stage_cols[column]
        if float not in set(map(type, values)):
            continue
        fixed = list(values)
        for row, value in enumerate(values):
            if type(value) is not float:
                continue
            if value.is_integer() and INT64_MIN <= value <= INT64_MAX:
                fixed[row] = int(value)
            else:
                fixed[row] = None
                reason = "a non-integral number" if not value.is_integer() else "out of the BIGINT range"
                bad.setdefault(row, f"stage {stage_cols['call_stage_id'][row][:40]}: {api_field} is {reason}")
        stage_cols[column] = fixed


def _all_uuids(ids: Sequence[str]) -> bool:
    return set(map(len, ids)) <= {36} and _UUIDS.fullmatch("".join(ids)) is not None


def _check_stage_rows(stage_cols: dict[str, Sequence[Any]]) -> dict[int, str]:
    """Bulk checks over all stages of the batch: {row: reason} for rows whose
    callStageId is not a UUID, whose ``created`` is not RFC 3339 or whose counts are
    not integers. ``created`` becomes microseconds, counts integers."""
    ids = stage_cols["call_stage_id"]
    bad: dict[int, str] = {}
    if not _all_uuids(ids):
        for row, stage_id in enumerate(ids):
            if not CANONICAL_UUID.fullmatch(stage_id):
                bad[row] = f"stage {stage_cols['stage_index'][row]}: callStageId is not a UUID"
    stage_cols["created"], bad_created = _timestamps(stage_cols["created"])
    for row, reason in bad_created.items():
        bad.setdefault(row, f"stage {ids[row][:40]}: {reason}")
    _integral_counts(stage_cols, bad)
    return bad


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
    return lowered if CANONICAL_UUID.fullmatch(lowered) else None


def transform_calls(
    calls: Sequence[tuple[str, Sequence[Any]]], run_id: str, extracted_at: datetime
) -> TransformResult:
    """Flatten each call's stages (in API order; objects or ``msgspec.Raw`` bytes) into
    the three data tables, as Arrow tables. Calls that fail validation are in
    ``failures`` and have no rows; whatever goes wrong with one call (any exception)
    fails that call only."""
    return _transform(calls, run_id, extracted_at, arrow=True)


def transform_columns(
    calls: Sequence[tuple[str, Sequence[Any]]], run_id: str, extracted_at: datetime
) -> TransformResult:
    """:func:`transform_calls` with each table as its columns' buffers
    (:class:`pipeline.columns.TableColumns`), without pyarrow, rows in day order."""
    return _transform(calls, run_id, extracted_at, arrow=False)


def _transform(
    calls: Sequence[tuple[str, Sequence[Any]]], run_id: str, extracted_at: datetime, arrow: bool, isolate: bool = True
) -> TransformResult:
    result = TransformResult(tables={})
    batch = _Batch()
    keys: dict[str, str] = {}  # normalised id → the caller's id
    accepted: list[tuple[str, Sequence[Any]]] = []
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
        except Exception as exc:
            batch.rollback(mark)
            result.failures[call_id] = failure_reason(exc)
            continue
        keys[normal] = call_id
        accepted.append((call_id, stages))
        result.stage_counts[call_id] = len(stages)

    try:
        result.tables, failed = _batch_tables(batch, keys, run_id, extracted_at, arrow)
    except Exception as exc:
        if isolate and len(accepted) > 1:
            return _call_by_call(accepted, result, run_id, extracted_at, arrow)
        result.tables, failed = _empty_tables(arrow), {call_id: failure_reason(exc) for call_id, _ in accepted}
    for call_id, reason in failed.items():
        result.failures[call_id] = reason
        result.stage_counts.pop(call_id, None)
    return result


def _call_by_call(
    accepted: list[tuple[str, Sequence[Any]]], result: TransformResult, run_id: str, extracted_at: datetime, arrow: bool
) -> TransformResult:
    """A bulk step failed for the batch: redo it one call at a time, so that only the
    call that causes it fails (slow, and only ever after a failure)."""
    parts = [_transform([call], run_id, extracted_at, arrow) for call in accepted]
    for part in parts:
        result.failures.update(part.failures)
    # The calls that pass alone are built together once more (a batch holds at most one
    # call above its byte budget, so together they fit what each fits alone).
    kept = [call for call, part in zip(accepted, parts, strict=True) if not part.failures]
    rest = _transform(kept, run_id, extracted_at, arrow, isolate=False)
    result.failures.update(rest.failures)
    result.stage_counts, result.tables = rest.stage_counts, rest.tables
    return result


def _empty_tables(arrow: bool) -> dict[str, Any]:
    if arrow:
        return {t.name: t.arrow_schema.empty_table() for t in _DATA_TABLES}
    return {t.name: columns.empty(t) for t in _DATA_TABLES}


def _by_day(batch: _Batch) -> None:
    """Rows in order of their stage's ``created`` date (its text before the T; a stable
    sort): the Parquet output then splits a replay's batch of such parts into its date
    folders by slices, without a copy of the batch. Arrow tables keep the API's order."""
    day = {row[0]: row[3][:10] if type(row[3]) is str else "" for row in batch.stage_rows}
    for rows in (batch.stage_rows, batch.message_rows, batch.voice_rows):
        rows.sort(key=lambda row: day[row[0]])


def _batch_tables(
    batch: _Batch, keys: dict[str, str], run_id: str, extracted_at: datetime, arrow: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    """The batch's rows as the three tables, and {call id: reason} for the calls that
    the bulk checks fail (their rows are left out). Columns come in day order (see _by_day)."""
    if not arrow:
        _by_day(batch)
    stage_cols = dict(zip(_STAGE_ROW, _transpose(batch.stage_rows, len(_STAGE_ROW))))
    bad_rows = _check_stage_rows(stage_cols)
    failures: dict[str, str] = {}
    for row, reason in sorted(bad_rows.items()):
        normal = stage_cols["call_id"][row]
        if keys[normal] not in failures:
            failures[keys[normal]] = reason[:300]
    message_rows, voice_rows = batch.message_rows, batch.voice_rows
    if failures:
        failed = {normal for normal, call_id in keys.items() if call_id in failures}
        kept = [row for row, call_id in enumerate(stage_cols["call_id"]) if call_id not in failed]
        stage_cols = {name: [values[row] for row in kept] for name, values in stage_cols.items()}
        message_rows = [row for row in message_rows if row[1] not in failed]
        voice_rows = [row for row in voice_rows if row[1] not in failed]

    n = len(stage_cols["call_id"])
    stage_values: dict[str, Any] = {
        **stage_cols,
        "run_id": columns.repeat_text(run_id, n),
        "extracted_at": columns.fixed(schema.TIMESTAMPTZ, [micros(extracted_at)] * n),
    }
    tables = [
        _table(schema.CALL_STAGES, stage_values, n),
        _table(schema.STAGE_INACTIVITY_MESSAGES, dict(zip(_MESSAGE_ROW, _transpose(message_rows, len(_MESSAGE_ROW)))),
               len(message_rows)),
        _table(schema.STAGE_VOICES, dict(zip(_VOICE_ROW, _transpose(voice_rows, len(_VOICE_ROW)))), len(voice_rows)),
    ]
    return {t.name: columns.to_arrow(t) if arrow else t for t in tables}, failures

"""transform_calls: exact rows from a recorded page, redaction, per-call failures, and
tables that DuckDB accepts as they are."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.redact import REDACTED, redact_stage
from pipeline.transform import parse_rfc3339, transform_calls

FIXTURES = Path(__file__).parent / "fixtures"
CALL = "5b0f3c9e-2d4a-4e8b-9c1f-7a6d5e4c3b2a"
RUN = "20261120T100000Z-abc123"
NOW = datetime(2026, 11, 20, 11, 0, tzinfo=timezone.utc)
SECRETS = (
    "sk-live-4f9Qz7LmX2aB8cD1eF6gH3",
    "xk-93e1c0ffee",
    "body-key-5521",
    "cs-7781",
    "sk-live-override-0042",
    "nova-secret-1188",
)


def page() -> dict[str, Any]:
    return json.loads((FIXTURES / "stages_all_providers.json").read_text(encoding="utf-8"))


def stages() -> list[dict[str, Any]]:
    return page()["results"]


def rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


def by_stage(table: pa.Table) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows(table):
        out.setdefault(row["call_stage_id"], []).append(row)
    return out


def uid(n: int) -> str:
    return str(uuid.UUID(int=n))


def simple_stage(call_id: str, n: int, **fields: Any) -> dict[str, Any]:
    stage: dict[str, Any] = {
        "callId": call_id,
        "callStageId": uid(10_000 + n),
        "created": "2026-11-20T10:00:00Z",
        "inactivityMessages": [{"duration": "30s", "message": "Hello?"}],
        "initialTokenCount": 10,
        "latestTokenCount": 20,
        "model": "fixie-ai/ultravox",
        "systemPrompt": "Be brief.",
        "temperature": 0.3,
        "externalVoice": {"lmnt": {"voiceId": "lily"}},
        "errorCount": 0,
        "experimentalSettings": None,
        "initialState": {},
    }
    stage.update(fields)
    return stage


@pytest.fixture(scope="module")
def result():
    return transform_calls([(CALL, stages())], RUN, NOW)


# --------------------------------------------------------------------------- shapes


def test_tables_have_exactly_the_schema_arrow_schemas(result) -> None:
    assert result.failures == {}
    assert result.stage_counts == {CALL: 10}
    assert set(result.tables) == {"call_stages", "stage_inactivity_messages", "stage_voices"}
    for name, table in result.tables.items():
        assert table.schema.equals(schema.TABLES[name].arrow_schema, check_metadata=True), name
    assert result.tables["call_stages"].num_rows == 10
    assert result.tables["stage_inactivity_messages"].num_rows == 3 + 3 + 1 + 1
    assert result.tables["stage_voices"].num_rows == 11


def test_empty_input_gives_empty_tables_with_the_schema() -> None:
    result = transform_calls([], RUN, NOW)
    assert result.failures == {} and result.stage_counts == {}
    for name, table in result.tables.items():
        assert table.num_rows == 0
        assert table.schema.equals(schema.TABLES[name].arrow_schema)


def test_call_without_stages_is_a_success_with_zero_rows() -> None:
    result = transform_calls([(uid(1), [])], RUN, NOW)
    assert result.stage_counts == {uid(1): 0} and result.failures == {}


# --------------------------------------------------------------------------- call_stages


def test_first_stage_row_exact(result) -> None:
    row = rows(result.tables["call_stages"])[0]
    source = stages()[0]
    raw = row.pop("raw")
    assert row == {
        "call_stage_id": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
        "call_id": CALL,
        "stage_index": 0,
        "created": datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=timezone.utc),
        "model": "fixie-ai/ultravox",
        "system_prompt": source["systemPrompt"],
        "temperature": 0.4,
        "language_hint": "en-US",
        "voice": None,
        "time_exceeded_message": "We are out of time, goodbye!",
        "initial_token_count": 412,
        "latest_token_count": 1873,
        "error_count": 0,
        "experimental_settings": None,
        "initial_state": "{}",
        "inactivity_message_count": 3,
        "run_id": RUN,
        "extracted_at": NOW,
    }
    assert json.loads(raw) == source  # nothing to redact: the stage as received
    assert raw == json.dumps(source, ensure_ascii=False, separators=(",", ":"))


def test_stage_columns_across_the_page(result) -> None:
    table = result.tables["call_stages"]
    assert table["stage_index"].to_pylist() == list(range(10))
    # Upper-case UUIDs from the API come out canonical lower-case.
    assert table["call_stage_id"].to_pylist()[2] == "2c3d4e5f-6a7b-4c8d-8e9f-1a2b3c4d5e6f"
    assert set(table["call_id"].to_pylist()) == {CALL}
    second = rows(table)[1]
    # "+02:00" offset and a one-digit fraction, in UTC.
    assert second["created"] == datetime(2026, 11, 20, 10, 1, 30, 500000, tzinfo=timezone.utc)
    assert second["temperature"] == 0.0 and isinstance(second["temperature"], float)
    assert second["initial_token_count"] is None and second["latest_token_count"] is None
    assert second["error_count"] == 2
    assert json.loads(second["experimental_settings"]) == stages()[1]["experimentalSettings"]
    assert second["experimental_settings"] == '{"vadSettings":{"turnEndpointDelay":"0.384s"},"flags":["a","b"]}'
    assert json.loads(second["initial_state"]) == {"customer": {"id": "c-1042", "tier": "gold"}, "step": 2}
    assert second["inactivity_message_count"] == 0
    fourth = rows(table)[3]
    assert fourth["system_prompt"] is None
    assert fourth["created"] == datetime(2026, 11, 20, 10, 6, 0, 1, tzinfo=timezone.utc)
    # Absent fields are nulls; absent/null inactivityMessages count as none.
    fifth = rows(table)[4]
    assert fifth["language_hint"] is None and fifth["voice"] is None and fifth["inactivity_message_count"] == 0
    assert rows(table)[9]["voice"] == "Mark" and rows(table)[9]["inactivity_message_count"] == 0


def test_raw_is_the_redacted_stage_with_unknown_fields(result) -> None:
    for row, source in zip(rows(result.tables["call_stages"]), stages()):
        assert json.loads(row["raw"]) == redact_stage(source)
        assert list(json.loads(row["raw"])) == list(source)  # key order as received
    unknown = json.loads(rows(result.tables["call_stages"])[8]["raw"])
    assert unknown["agentStageConfig"] == {"toolsVersion": 3, "notes": "unknown top-level field, kept in raw"}


# --------------------------------------------------------------------------- messages


def test_inactivity_messages_exact(result) -> None:
    messages = by_stage(result.tables["stage_inactivity_messages"])
    first = messages["0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"]
    assert [(m["position"], m["duration"], m["duration_seconds"], m["offset_seconds"], m["end_behavior"]) for m in first] == [
        (0, "30s", Decimal("30"), Decimal("30"), "END_BEHAVIOR_UNSPECIFIED"),
        (1, "15s", Decimal("15"), Decimal("45"), "END_BEHAVIOR_UNSPECIFIED"),  # absent → proto3 default
        (2, "1.500s", Decimal("1.5"), Decimal("46.5"), "END_BEHAVIOR_HANG_UP_SOFT"),
    ]
    assert first[1]["message"] == "Hallo? Sind Sie noch da? ☎️"
    assert all(m["call_id"] == CALL for m in first)
    odd = messages["2c3d4e5f-6a7b-4c8d-8e9f-1a2b3c4d5e6f"]
    assert [(m["duration_seconds"], m["offset_seconds"], m["end_behavior"]) for m in odd] == [
        (Decimal("0.000000001"), Decimal("0.000000001"), "END_BEHAVIOR_UNSPECIFIED"),
        (Decimal("45.25"), Decimal("45.250000001"), "END_BEHAVIOR_UNSPECIFIED"),  # null → default
        (Decimal("-0.5"), Decimal("44.750000001"), "END_BEHAVIOR_HANG_UP_STRICT"),
    ]
    missing = messages["3d4e5f6a-7b8c-4d9e-8f0a-2b3c4d5e6f70"][0]
    assert missing["duration"] is None and missing["duration_seconds"] is None
    assert missing["offset_seconds"] == Decimal(0)


def test_huge_durations_are_exact() -> None:
    stage = simple_stage(uid(1), 1, inactivityMessages=[
        {"duration": "315576000000s", "message": "a"},
        {"duration": "315576000000.999999999s", "message": "b"},
        {"duration": "-315576000000s", "message": "c"},
        # Beyond protobuf's range but allowed by the OpenAPI pattern: kept as sent.
        {"duration": "-999999999999.999999999s", "message": "d"},
    ])
    result = transform_calls([(uid(1), [stage])], RUN, NOW)
    assert result.failures == {}
    got = rows(result.tables["stage_inactivity_messages"])
    assert [m["duration_seconds"] for m in got] == [
        Decimal("315576000000"), Decimal("315576000000.999999999"), Decimal("-315576000000"),
        Decimal("-999999999999.999999999"),
    ]
    assert [m["offset_seconds"] for m in got] == [
        Decimal("315576000000"), Decimal("631152000000.999999999"), Decimal("315576000000.999999999"),
        Decimal("-684423999999"),
    ]


# --------------------------------------------------------------------------- voices


def test_voice_rows_for_every_provider(result) -> None:
    got = [
        (r["role"], r["provider"], r["voice_id"], r["model"], r["speed"])
        for r in rows(result.tables["stage_voices"])
    ]
    assert got == [
        ("external", "elevenLabs", "21m00Tcm4TlvDq8ikWAM", "eleven_turbo_v2_5", 1.05),
        ("external", "cartesia", "a0e99841-438c-4a64-b679-ae501e7d6091", "sonic-2", None),
        ("override", "cartesia", None, None, 0.5),
        ("external", "lmnt", "lily", "blizzard", 1.25),
        ("external", "google", "en-US-Chirp3-HD-Charon", None, 0.9),
        ("external", "inworld", "Ashley", "inworld-tts-1-max", 1.1),
        ("external", "respeecher", "sam", "/v1/public/tts/en-rt", None),
        ("external", "generic", None, None, None),
        ("override", "generic", None, None, None),
        ("external", "playHt", "s3://voice-cloning-zero-shot/abc/manifest.json", "PlayHT2.0-turbo", 1.0),
        ("external", "novaTts", "nova-7", "nova-2", 1.3),  # unknown key; the null one before it skipped
    ]


def test_voice_settings_are_the_redacted_provider_object(result) -> None:
    source = stages()
    voices = by_stage(result.tables["stage_voices"])
    eleven = json.loads(voices["0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"][0]["settings"])
    assert eleven == source[0]["externalVoice"]["elevenLabs"]
    generic = json.loads(voices["6a7b8c9d-0e1f-4a2b-9c3d-5e6f708192a3"][0]["settings"])
    assert generic["headers"] == {"Authorization": REDACTED, "X-Api-Key": REDACTED, "Content-Type": REDACTED}
    assert generic["body"]["auth"] == REDACTED  # "auth" itself looks like a credential
    assert generic["body"]["options"] == [{"client_secret": REDACTED}, {"speed": 1}]
    assert generic["url"] == "https://tts.example.com/v1/speak" and generic["responseSampleRate"] == 24000
    nova = json.loads(voices["8c9d0e1f-2a3b-4c4d-9e5f-708192a3b4c5"][0]["settings"])
    assert nova["clientSecret"] == REDACTED and nova["style"] == {"warmth": 0.7}


def test_no_secret_anywhere_in_any_table(result) -> None:
    text = json.dumps({name: t.to_pylist() for name, t in result.tables.items()}, default=str, ensure_ascii=False)
    for secret in SECRETS:
        assert secret not in text
    assert "Bearer" not in text
    assert REDACTED in rows(result.tables["call_stages"])[6]["raw"]


def test_null_and_empty_voices_give_no_rows() -> None:
    stage = simple_stage(uid(1), 1, externalVoice=None, voiceOverrides={})
    stage2 = simple_stage(uid(1), 2)
    del stage2["externalVoice"]
    result = transform_calls([(uid(1), [stage, stage2])], RUN, NOW)
    assert result.failures == {} and result.tables["stage_voices"].num_rows == 0


def test_voice_with_only_null_provider_keeps_the_key() -> None:
    stage = simple_stage(uid(1), 1, externalVoice={"elevenLabs": None})
    result = transform_calls([(uid(1), [stage])], RUN, NOW)
    [row] = rows(result.tables["stage_voices"])
    assert row["provider"] == "elevenLabs" and row["settings"] is None and row["voice_id"] is None


# --------------------------------------------------------------------------- prompts and raw


PROMPT_SPICE = 'Quotes " and \\ backslashes, tabs\t, CR\r, LF\n, NUL \x00, \x1f, DEL \x7f, \u2028, é, 日本, 😀. '


def big_prompt(size: int = 100_000) -> str:
    return (PROMPT_SPICE * (size // len(PROMPT_SPICE) + 1))[:size]


VOICE_LOOKALIKE = '"externalVoice":{"generic":{"apiKey":"sk-x"}}'


def test_100kb_prompt_survives_exactly_in_both_columns() -> None:
    prompt = big_prompt()
    stage = simple_stage(uid(1), 1, systemPrompt=prompt, externalVoice={
        "generic": {"url": "https://x", "headers": {"Authorization": "Bearer sk-live-4f9Qz7LmX2aB8cD1eF6gH3"}}
    })
    result = transform_calls([(uid(1), [stage])], RUN, NOW)
    [row] = rows(result.tables["call_stages"])
    assert row["system_prompt"] == prompt
    assert json.loads(row["raw"]) == redact_stage(stage)
    assert "sk-live" not in row["raw"]


@pytest.mark.parametrize("prompt", [
    "",
    "short",
    "x" * 255,
    big_prompt(5_000),
    # Text that looks like JSON, escapes or voices, in the prompt and elsewhere: still exact.
    VOICE_LOOKALIKE * 20,
    "\x00\\u0065\\\"",
    "é\u2028\u0000",
])
@pytest.mark.parametrize("elsewhere", [None, VOICE_LOOKALIKE, "\\u0065"])
def test_raw_round_trips_for_any_prompt(prompt: str, elsewhere: str | None) -> None:
    stage = simple_stage(uid(1), 1, systemPrompt=prompt, initialState={"x": elsewhere},
                         externalVoice={"lmnt": {"voiceId": elsewhere or "lily"}},
                         voiceOverrides={"generic": {"headers": {"A": "b"}, "body": {"t": elsewhere}}})
    result = transform_calls([(uid(1), [stage])], RUN, NOW)
    [row] = rows(result.tables["call_stages"])
    assert json.loads(row["raw"]) == redact_stage(stage) and row["system_prompt"] == prompt
    assert [json.loads(v) for v in result.tables["stage_voices"]["settings"].to_pylist()] == [
        {"voiceId": elsewhere or "lily"}, {"headers": {"A": REDACTED}, "body": {"t": elsewhere}}
    ]


def test_raw_rows_stay_aligned_in_a_large_batch() -> None:
    calls = []
    for c in range(400):
        call_id = uid(c + 1)
        calls.append((call_id, [
            simple_stage(call_id, c * 10 + i, systemPrompt=f"{c}-{i} " + big_prompt(300 + 37 * i))
            for i in range(c % 4)
        ]))
    calls.append((uid(999), [simple_stage(uid(999), 99_999, created="nope")]))  # filtered out afterwards
    result = transform_calls(calls, RUN, NOW)
    assert list(result.failures) == [uid(999)]
    table = result.tables["call_stages"]
    assert table.num_rows == sum(c % 4 for c in range(400))
    for row in rows(table):
        raw = json.loads(row["raw"])
        assert raw["callStageId"] == row["call_stage_id"] and raw["systemPrompt"] == row["system_prompt"]


def test_lone_surrogate_does_not_break_the_batch() -> None:
    stage = simple_stage(uid(1), 1, systemPrompt=json.loads('"bad \\ud800 half"') + "x" * 300)
    result = transform_calls([(uid(1), [stage]), (uid(2), [simple_stage(uid(2), 2)])], RUN, NOW)
    assert result.failures == {}
    assert result.tables["call_stages"].num_rows == 2


# --------------------------------------------------------------------------- failures


def _bad(**fields: Any) -> dict[str, Any]:
    return simple_stage(BAD, 2, **fields)


BAD = uid(77)
GOOD_BEFORE, GOOD_AFTER = uid(76), uid(78)
FAILURES = [
    ("not an object", lambda: "a string", "stage 0 is a string"),
    ("list stage", lambda: [1, 2], "stage 0 is a list"),
    ("other call", lambda: _bad(callId=uid(12345)), f"belongs to call {uid(12345)}"),
    ("no call id", lambda: {k: v for k, v in _bad().items() if k != "callId"}, "has no callId"),
    ("no stage id", lambda: {k: v for k, v in _bad().items() if k != "callStageId"}, "has no callStageId"),
    ("stage id not uuid", lambda: _bad(callStageId="stage-1"), "callStageId is not a UUID"),
    ("stage id number", lambda: _bad(callStageId=12), "callStageId is an integer"),
    ("no created", lambda: {k: v for k, v in _bad().items() if k != "created"}, "created is missing"),
    ("created garbage", lambda: _bad(created="yesterday"), "not an RFC 3339 timestamp"),
    ("created no offset", lambda: _bad(created="2026-11-20T10:00:00"), "not an RFC 3339 timestamp"),
    ("created feb 30", lambda: _bad(created="2026-02-30T10:00:00Z"), "not a valid date"),
    ("created number", lambda: _bad(created=1763632800), "created is an integer"),
    ("tokens as string", lambda: _bad(initialTokenCount="12"), "initialTokenCount is a string"),
    ("tokens as bool", lambda: _bad(latestTokenCount=True), "latestTokenCount is a boolean"),
    ("tokens too big", lambda: _bad(latestTokenCount=2**63), "out of the BIGINT range"),
    ("errors fractional", lambda: _bad(errorCount=1.5), "errorCount is a non-integral number"),
    ("errors string", lambda: _bad(errorCount="0"), "errorCount is a string"),
    ("temperature string", lambda: _bad(temperature="0.4"), "temperature is a string"),
    ("temperature bool", lambda: _bad(temperature=False), "temperature is a boolean"),
    ("model number", lambda: _bad(model=3), "model is an integer"),
    ("messages object", lambda: _bad(inactivityMessages={"duration": "3s"}), "inactivityMessages is an object"),
    ("message string", lambda: _bad(inactivityMessages=["30s"]), "inactivityMessages[0] is a string"),
    ("duration float", lambda: _bad(inactivityMessages=[{"duration": 30.0}]), "inactivityMessages[0]"),
    ("duration no s", lambda: _bad(inactivityMessages=[{"duration": "30"}]), "invalid duration '30'"),
    ("duration exponent", lambda: _bad(inactivityMessages=[{"duration": "1e3s"}]), "invalid duration"),
    ("duration 10 digits", lambda: _bad(inactivityMessages=[{"duration": "0.0000000001s"}]), "invalid duration"),
    ("duration 13 digits", lambda: _bad(inactivityMessages=[{"duration": "1000000000000s"}]), "invalid duration"),
    ("end behavior number", lambda: _bad(inactivityMessages=[{"duration": "1s", "endBehavior": 2}]), "endBehavior"),
    ("external voice list", lambda: _bad(externalVoice=[{"lmnt": {}}]), "externalVoice is a list"),
    ("override string", lambda: _bad(voiceOverrides="lmnt"), "voiceOverrides is a string"),
    ("speed string", lambda: _bad(externalVoice={"lmnt": {"speed": "fast"}}), "externalVoice.lmnt.speed"),
    ("nan", lambda: _bad(initialState={"x": float("nan")}), "NaN"),
    ("infinity in a voice", lambda: _bad(externalVoice={"lmnt": {"speed": float("inf")}}), "NaN or Infinity"),
    ("deep state", lambda: _bad(initialState=_nested(5_000)), "nested too deeply"),
    ("deep voice", lambda: _bad(externalVoice={"lmnt": {"x": _nested(5_000)}}), "nested too deeply"),
    ("not json", lambda: _bad(initialState={"x": {1, 2}}), "could not be flattened (TypeError)"),
    ("huge int temperature", lambda: _bad(temperature=10**400), "out of the DOUBLE range"),
]


def _nested(depth: int) -> Any:
    value: Any = {"apiKey": "sk-live-deep"}
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("kind, make, reason", FAILURES, ids=[f[0] for f in FAILURES])
def test_bad_call_fails_alone(kind: str, make, reason: str) -> None:
    bad_stages = [simple_stage(BAD, 1), make(), simple_stage(BAD, 3)]
    calls = [
        (GOOD_BEFORE, [simple_stage(GOOD_BEFORE, 10), simple_stage(GOOD_BEFORE, 11)]),
        (BAD, bad_stages),
        (GOOD_AFTER, [simple_stage(GOOD_AFTER, 20)]),
    ]
    if kind in ("not an object", "list stage"):
        calls[1] = (BAD, [make()])
    result = transform_calls(calls, RUN, NOW)
    assert list(result.failures) == [BAD]
    assert reason in result.failures[BAD]
    assert "\n" not in result.failures[BAD] and len(result.failures[BAD]) <= 300
    assert result.stage_counts == {GOOD_BEFORE: 2, GOOD_AFTER: 1}
    for name, table in result.tables.items():
        assert BAD not in table["call_id"].to_pylist(), name
    assert result.tables["call_stages"].num_rows == 3
    assert result.tables["stage_inactivity_messages"].num_rows == 3
    assert result.tables["stage_voices"].num_rows == 3


def test_duplicate_stage_id_fails_the_call() -> None:
    one = simple_stage(BAD, 1)
    two = simple_stage(BAD, 2, callStageId=one["callStageId"].upper())
    result = transform_calls([(BAD, [one, two]), (GOOD_AFTER, [simple_stage(GOOD_AFTER, 3)])], RUN, NOW)
    assert result.failures == {BAD: f"stage {one['callStageId']} appears twice"}
    assert result.stage_counts == {GOOD_AFTER: 1}


def test_reasons_never_carry_secrets_or_prompts() -> None:
    secret_voice = {"generic": {"headers": {"Authorization": "Bearer sk-live-4f9Qz7LmX2aB8cD1eF6gH3"}, "speed": "x"}}
    calls = [
        (uid(1), [simple_stage(uid(1), 1, externalVoice=secret_voice)]),
        (uid(2), [simple_stage(uid(2), 2, systemPrompt="TOP SECRET PROMPT", initialTokenCount="TOP SECRET")]),
        (uid(3), [simple_stage(uid(3), 3, systemPrompt="TOP SECRET PROMPT", model=["TOP SECRET"])]),
    ]
    result = transform_calls(calls, RUN, NOW)
    assert set(result.failures) == {uid(1), uid(2), uid(3)}
    for reason in result.failures.values():
        assert "sk-live" not in reason and "SECRET" not in reason


def test_integral_float_counts_are_accepted() -> None:
    result = transform_calls([(uid(1), [simple_stage(uid(1), 1, errorCount=3.0, initialTokenCount=12.0)])], RUN, NOW)
    [row] = rows(result.tables["call_stages"])
    assert row["error_count"] == 3 and row["initial_token_count"] == 12


def test_upper_case_requested_call_id_matches_and_is_normalised() -> None:
    call_id = uid(5)
    stage = simple_stage(call_id.upper(), 1)
    result = transform_calls([(call_id.upper(), [stage])], RUN, NOW)
    assert result.stage_counts == {call_id.upper(): 1}
    assert result.tables["call_stages"]["call_id"].to_pylist() == [call_id]


def test_same_call_twice_later_wins() -> None:
    first = [simple_stage(uid(1), 1)]
    second = [simple_stage(uid(1), 2), simple_stage(uid(1), 3)]
    result = transform_calls([(uid(1), first), (uid(1), second)], RUN, NOW)
    assert result.stage_counts == {uid(1): 2}
    assert result.tables["call_stages"]["call_stage_id"].to_pylist() == [uid(10_002), uid(10_003)]


def test_transform_never_mutates_its_input() -> None:
    source = stages()
    before = copy.deepcopy(source)
    transform_calls([(CALL, source)], RUN, NOW)
    assert source == before


@pytest.mark.parametrize("text, expected", [
    ("2026-11-20T10:00:00Z", datetime(2026, 11, 20, 10, tzinfo=timezone.utc)),
    ("2026-11-20t10:00:00z", datetime(2026, 11, 20, 10, tzinfo=timezone.utc)),
    ("2026-11-20 10:00:00+00:00", datetime(2026, 11, 20, 10, tzinfo=timezone.utc)),
    ("2026-11-20T10:00:00.123456789-05:30", datetime(2026, 11, 20, 15, 30, 0, 123456, tzinfo=timezone.utc)),
    ("2026-11-20T00:30:00+01:00", datetime(2026, 11, 19, 23, 30, tzinfo=timezone.utc)),
])
def test_rfc3339_slow_path(text: str, expected: datetime) -> None:
    assert parse_rfc3339(text) == expected
    stage = simple_stage(uid(1), 1, created=text)
    result = transform_calls([(uid(1), [stage])], RUN, NOW)
    assert result.tables["call_stages"]["created"].to_pylist() == [expected]


@pytest.mark.parametrize("text", ["2026-11-20", "2026-11-20T10:00Z", "2026-11-20T10:00:00+2400", "2026-13-01T00:00:00Z",
                                  "2026-11-20T10:00:00+05:60", " 2026-11-20T10:00:00Z", "2026-11-20T25:00:00Z"])
def test_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)
    result = transform_calls([(uid(1), [simple_stage(uid(1), 1, created=text)])], RUN, NOW)
    assert uid(1) in result.failures


# --------------------------------------------------------------------------- DuckDB


def test_tables_insert_into_duckdb_by_name(result) -> None:
    con = duckdb.connect()
    try:
        for name, arrow_table in result.tables.items():
            con.execute(schema.TABLES[name].create_sql())
            con.register("arrow_table", arrow_table)
            con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM arrow_table")
            con.unregister("arrow_table")
        assert con.execute("SELECT count(*) FROM call_stages").fetchone() == (10,)
        assert con.execute(
            "SELECT sum(offset_seconds), max(duration_seconds), min(duration_seconds) FROM stage_inactivity_messages"
        ).fetchone() == (Decimal("231.500000003"), Decimal("45.25"), Decimal("-0.5"))
        assert con.execute(
            "SELECT raw->>'$.externalVoice.generic.headers.Authorization' FROM call_stages WHERE stage_index = 6"
        ).fetchone() == (REDACTED,)
        assert con.execute(
            "SELECT settings->>'$.voiceId' FROM stage_voices WHERE provider = 'playHt'"
        ).fetchone() == ("s3://voice-cloning-zero-shot/abc/manifest.json",)
        created = con.execute(
            "SELECT epoch_us(created) FROM call_stages WHERE stage_index = 1"
        ).fetchone()
        assert created == (int(datetime(2026, 11, 20, 10, 1, 30, 500000, tzinfo=timezone.utc).timestamp() * 1e6),)
        assert con.execute("SELECT count(*) FROM call_stages WHERE typeof(call_stage_id) = 'UUID'").fetchone() == (10,)
    finally:
        con.close()


def test_a_stage_id_claimed_by_two_calls_fails_the_later_call():
    from datetime import datetime, timezone

    from pipeline.transform import transform_calls

    a, b = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
    stage_id = "33333333-3333-4333-8333-333333333333"

    def stage(call_id):
        return {"callId": call_id, "callStageId": stage_id, "created": "2026-11-20T10:00:00Z", "errorCount": 0}

    result = transform_calls([(a, [stage(a)]), (b, [stage(b)])], "run", datetime.now(timezone.utc))
    assert result.stage_counts == {a: 1}
    assert "also belongs to call" in result.failures[b]
    assert result.tables["call_stages"].num_rows == 1


def test_stages_that_are_not_a_list_fail_the_call():
    from datetime import datetime, timezone

    from pipeline.transform import transform_calls

    a = "11111111-1111-4111-8111-111111111111"
    result = transform_calls([(a, None), (a.replace("1", "4"), {"x": 1})], "run", datetime.now(timezone.utc))
    assert set(result.failures) == {a, a.replace("1", "4")}


# --------------------------------------------------------------------------- any exception, one call


def test_any_exception_while_flattening_fails_only_that_call(monkeypatch) -> None:
    import pipeline.transform as transform

    real = transform._voice_columns

    def explode(api_field: str, voice: dict[str, Any]):
        if "boom" in voice:
            raise ZeroDivisionError("TOP SECRET PROMPT sk-live-123")
        return real(api_field, voice)

    monkeypatch.setattr(transform, "_voice_columns", explode)
    calls = [(uid(1), [simple_stage(uid(1), 1)]), (uid(2), [simple_stage(uid(2), 2, externalVoice={"boom": {}})]),
             (uid(3), [simple_stage(uid(3), 3)])]
    result = transform_calls(calls, RUN, NOW)
    assert result.failures == {uid(2): f"stage {uid(10_002)}: could not be flattened (ZeroDivisionError)"}
    assert result.tables["call_stages"]["call_id"].to_pylist() == [uid(1), uid(3)]


@pytest.mark.parametrize("as_columns", [False, True], ids=["arrow", "columns"])
def test_a_bulk_step_failing_is_retried_call_by_call(monkeypatch, as_columns: bool) -> None:
    import pipeline.columns as columns
    import pipeline.transform as transform

    real = columns.utf8

    def fragile(values):
        if any(b"poison" in value for value in values if value):
            raise OverflowError("sk-live-123 TOP SECRET")
        return real(values)

    monkeypatch.setattr(columns, "utf8", fragile)
    calls = [(uid(n), [simple_stage(uid(n), n, model="poison" if n == 2 else "m")]) for n in range(1, 5)]
    result = (transform.transform_columns if as_columns else transform_calls)(calls, RUN, NOW)
    assert result.failures == {uid(2): "holds a number out of range"}
    assert result.stage_counts == {uid(1): 1, uid(3): 1, uid(4): 1}
    for name, table in result.tables.items():
        if as_columns:
            table = columns.to_arrow(table)
        assert sorted(set(table["call_id"].to_pylist())) == [uid(1), uid(3), uid(4)], name
        assert table.schema == transform._DATA_TABLES[[t.name for t in transform._DATA_TABLES].index(name)].arrow_schema


def test_lone_surrogates_in_every_string_column() -> None:
    bad = json.loads('"x\\udc00y"')
    stage = simple_stage(
        uid(1), 1, model=bad, systemPrompt=bad * 200, languageHint=bad, voice=bad, timeExceededMessage=bad,
        inactivityMessages=[{"duration": "1s", "message": bad, "endBehavior": bad}],
        externalVoice={bad: {"voiceId": bad, "model": bad, "headers": {bad: bad}}},
        voiceOverrides={"lmnt": {"voiceId": bad}}, initialState={bad: bad}, **{bad: bad},
    )
    result = transform_calls([(uid(1), [stage]), (uid(2), [simple_stage(uid(2), 2)])], RUN, NOW)
    assert result.failures == {}
    for name, table in result.tables.items():
        text = json.dumps(table.to_pylist(), default=str, ensure_ascii=False)
        text.encode()  # valid UTF-8 everywhere
        assert "x\ufffdy" in text, name
    raw = json.loads(result.tables["call_stages"]["raw"][0].as_py())
    assert raw["x\ufffdy"] == "x\ufffdy" and raw["externalVoice"]["x\ufffdy"]["headers"] == {"x\ufffdy": REDACTED}


NESTED_SECRET = "sk-live-nested-9911"


@pytest.mark.parametrize("fields", [
    {"initialState": {"externalVoice": {"generic": {"headers": {"Authorization": NESTED_SECRET}}}}},
    {"experimentalSettings": {"x": [{"voice_overrides": {"someTts": {"apiKey": NESTED_SECRET}}}]}},
    {"ExternalVoice": {"generic": {"HEADERS": {"X-Key": NESTED_SECRET}}}},
    {"voiceOverrides": {"headers": {"Authorization": NESTED_SECRET}}},
    {"externalVoice": {"apiKey": NESTED_SECRET}},
    {"externalVoice": {"generic": {"request": {"Headers": {"A": NESTED_SECRET}}, "privateKeyPem": NESTED_SECRET}}},
    {"externalVoice": {"generic": {"nested": {"externalVoice": NESTED_SECRET}}}},
])
def test_voices_anywhere_in_a_stage_are_redacted_everywhere(fields: dict[str, Any]) -> None:
    stage = simple_stage(uid(1), 1, **fields)
    result = transform_calls([(uid(1), [stage])], RUN, NOW)
    assert result.failures == {}
    for name, table in result.tables.items():
        assert NESTED_SECRET not in json.dumps(table.to_pylist(), default=str), name
    [row] = rows(result.tables["call_stages"])
    assert json.loads(row["raw"]) == redact_stage(stage)
    assert json.loads(row["initial_state"]) == redact_stage(stage)["initialState"]


def test_a_prompt_naming_a_voice_changes_nothing() -> None:
    stage = simple_stage(uid(1), 1, systemPrompt='Set "externalVoice" and voice_overrides.', initialState={"a": 1})
    [row] = rows(transform_calls([(uid(1), [stage])], RUN, NOW).tables["call_stages"])
    assert json.loads(row["raw"]) == stage


def _received(stage: dict[str, Any], ensure_ascii: bool = False) -> msgspec.Raw:
    return msgspec.Raw(json.dumps(stage, ensure_ascii=ensure_ascii, separators=(",", ":")).encode())


@pytest.mark.parametrize("prompt", [
    "Café \"quoted\" \\ back/slash\n\ttab \u2028 😀 end",
    "Mention externalVoice, voice_overrides and apiKey: only text",
    "",
    "x" * 100_000 + "é\n" * 1000,
])
@pytest.mark.parametrize("ensure_ascii", [False, True])
def test_a_received_prompt_keeps_its_bytes_and_is_unescaped_into_its_column(prompt: str, ensure_ascii: bool) -> None:
    """\\u escapes, surrogate pairs, voice names inside the prompt: raw is the stage as received."""
    received = _received(simple_stage(uid(1), 1, systemPrompt=prompt), ensure_ascii)
    result = transform_calls([(uid(1), [received])], RUN, NOW)
    assert result.failures == {}
    [row] = rows(result.tables["call_stages"])
    assert row["system_prompt"] == prompt
    assert row["raw"].encode() == bytes(received)


def test_prompts_of_a_batch_line_up_with_their_stages_nulls_included() -> None:
    prompts = [None, "a\nb", None, "ü" * 5000, "", None]
    calls = [(uid(n), [_received(simple_stage(uid(n), n, systemPrompt=p), ensure_ascii=n % 2 == 0)])
             for n, p in enumerate(prompts, start=1)]
    result = transform_calls(calls, RUN, NOW)
    assert result.failures == {}
    table = result.tables["call_stages"]
    assert dict(zip(table["call_id"].to_pylist(), table["system_prompt"].to_pylist())) == {
        uid(n): p for n, p in enumerate(prompts, start=1)}


@pytest.mark.parametrize("before", [
    # a nested prompt key first, with the same text: the voice after it still counts
    '"extra":{"systemPrompt":"Be brief.","externalVoice":{"generic":{"headers":{"Authorization":"%s"}}}},',
    # the same, with a different text
    '"extra":{"systemPrompt":"Other.","voiceOverrides":{"x":{"apiKey":"%s"}}},',
    # a key ending in an escaped quote and the prompt key's name
    '"a\\"systemPrompt":"Be brief.","state":{"voice_overrides":{"cartesia":{"apiKey":"%s"}}},',
])
def test_a_voice_beside_a_nested_prompt_key_is_redacted(before: str) -> None:
    secret = "sk-live-beside-prompt-7731"
    stage = simple_stage(uid(1), 1)
    body = json.dumps(stage, separators=(",", ":"))
    received = ("{" + before % secret + body[1:]).encode()
    assert json.loads(received)["systemPrompt"] == "Be brief."
    result = transform_calls([(uid(1), [msgspec.Raw(received)])], RUN, NOW)
    assert result.failures == {}
    for name, table in result.tables.items():
        assert secret not in json.dumps(table.to_pylist(), default=str), name
    [row] = rows(result.tables["call_stages"])
    assert row["system_prompt"] == "Be brief." and REDACTED in row["raw"]


@pytest.mark.parametrize("prompt, reason", [
    (12, "systemPrompt is an integer, expected a string"),
    (["a"], "systemPrompt is a list, expected a string"),
    ({"text": "a"}, "systemPrompt is an object, expected a string"),
])
def test_a_prompt_that_is_not_text_fails_its_call_alone(prompt: Any, reason: str) -> None:
    calls = [(uid(1), [_received(simple_stage(uid(1), 1, systemPrompt=prompt))]),
             (uid(2), [_received(simple_stage(uid(2), 2))]),
             (uid(3), [simple_stage(uid(3), 3, systemPrompt=prompt)])]
    result = transform_calls(calls, RUN, NOW)
    assert result.failures == {uid(1): f"stage 0: {reason}", uid(3): f"stage 0: {reason}"}
    assert result.tables["call_stages"]["call_id"].to_pylist() == [uid(2)]


def test_a_received_lone_surrogate_escape_in_a_prompt_is_replaced() -> None:
    text = json.dumps(simple_stage(uid(1), 1, systemPrompt="bad PLACEHOLDER half"), separators=(",", ":"))
    received = msgspec.Raw(text.replace("PLACEHOLDER", "\\ud800").encode())
    result = transform_calls([(uid(1), [received]), (uid(2), [_received(simple_stage(uid(2), 2))])], RUN, NOW)
    assert result.failures == {}
    assert rows(result.tables["call_stages"])[0]["system_prompt"] == "bad \ufffd half"


@pytest.mark.parametrize("token, text", [
    (r'"a\/b \\\/ \\/ \\u0041"', "a/b \\/ \\/ \\u0041"),
    (r'"a\/b \\\/ \\/"', "a/b \\/ \\/"),
    (r'"\"\\\b\f\n\r\t\u00e9\ud83d\ude00\/"', "\"\\\b\f\n\r\t\u00e9\U0001f600/"),
    (r'"\\\\n \\\" \\\\\\"', "\\\\n \\\" \\\\\\"),
    (r'"\\x41 \\101 \\N{DASH} \\a"', "\\x41 \\101 \\N{DASH} \\a"),
    ('"plain é ✓"', "plain é ✓"),
])
def test_every_json_escape_in_a_received_prompt_reads_as_json_says(token: str, text: str) -> None:
    """Also the ones Python's escapes spell otherwise, and Python escapes JSON has not."""
    assert json.loads(token) == text
    body = json.dumps(simple_stage(uid(1), 1, systemPrompt="PROMPT"), separators=(",", ":"))
    received = msgspec.Raw(body.replace('"PROMPT"', token).encode())
    result = transform_calls([(uid(1), [received])], RUN, NOW)
    assert result.failures == {}
    [row] = rows(result.tables["call_stages"])
    assert row["system_prompt"] == text and row["raw"].encode() == bytes(received)

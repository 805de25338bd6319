"""The declared API input (pipeline.api_schema) and the transform built on it: values
equal to ones recomputed straightforwardly from the stage objects, for the sandbox's
synthetic data as the extractor hands it over and as `replay` reads it back."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pipeline import api_schema
from pipeline.raw import RawWriter, read_landing_zone
from pipeline.records import CallFetch
from pipeline.redact import REDACTED, redact_stage
from pipeline.sandbox import SyntheticData
from pipeline.transform import transform_calls

RUN = "20261201T100000Z-golden"
NOW = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _seconds(duration: str | None) -> Decimal | None:
    return None if duration is None else Decimal(duration[:-1])


def expected_rows(call_id: str, stages: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"call_stages": [], "stage_inactivity_messages": [], "stage_voices": []}
    for index, source in enumerate(stages):
        stage = redact_stage(source)
        stage_id = stage["callStageId"].lower()
        messages = stage.get("inactivityMessages") or []
        out["call_stages"].append({
            "call_stage_id": stage_id, "call_id": call_id, "stage_index": index,
            "created": datetime.fromisoformat(stage["created"]).astimezone(timezone.utc),
            "model": stage.get("model"), "system_prompt": stage.get("systemPrompt"),
            "temperature": None if stage.get("temperature") is None else float(stage["temperature"]),
            "language_hint": stage.get("languageHint"), "voice": stage.get("voice"),
            "time_exceeded_message": stage.get("timeExceededMessage"),
            "initial_token_count": stage.get("initialTokenCount"), "latest_token_count": stage.get("latestTokenCount"),
            "error_count": stage.get("errorCount"),
            "experimental_settings": _json(stage.get("experimentalSettings")),
            "initial_state": _json(stage.get("initialState")), "inactivity_message_count": len(messages),
            "raw": _json(stage), "run_id": RUN, "extracted_at": NOW,
        })
        offset = Decimal(0)
        for position, message in enumerate(messages):
            offset += _seconds(message.get("duration")) or 0
            out["stage_inactivity_messages"].append({
                "call_stage_id": stage_id, "call_id": call_id, "position": position,
                "duration": message.get("duration"), "duration_seconds": _seconds(message.get("duration")),
                "offset_seconds": offset, "message": message.get("message"),
                "end_behavior": message.get("endBehavior") or "END_BEHAVIOR_UNSPECIFIED",
            })
        for api_field, role in (("externalVoice", "external"), ("voiceOverrides", "override")):
            voice = stage.get(api_field)
            if not voice:
                continue
            provider = next((k for k, v in voice.items() if v is not None), next(iter(voice)))
            settings = voice[provider] or {}
            speed = settings.get("speed", settings.get("speakingRate"))
            out["stage_voices"].append({
                "call_stage_id": stage_id, "call_id": call_id, "role": role, "provider": provider,
                "voice_id": settings.get("voiceId"), "model": settings.get("model", settings.get("modelId")),
                "speed": None if speed is None else float(speed), "settings": _json(voice[provider]),
            })
    return out


def _synthetic(seed: int, big_prompts: bool = False) -> list[tuple[str, list[dict[str, Any]]]]:
    data = SyntheticData(n_calls=300, seed=seed, big_prompts=big_prompts)
    return [(call_id, data.stages_for(call_id)) for call_id in data.call_ids]


def _replayed(calls: list[tuple[str, list[dict[str, Any]]]], raw_dir: Path) -> list[tuple[str, list[Any]]]:
    """The calls landed by RawWriter and read back as `replay` reads them."""
    writer = RawWriter(raw_dir, "golden")
    url = "https://api.ultravox.ai/api/calls/{}/stages"
    writer.write([CallFetch(c, "loaded", pages=[{"next": None, "results": s, "total": len(s)}],
                            page_urls=[url.format(c)]) for c, s in calls])
    writer.close()
    bad: list[Any] = []
    fetches = list(read_landing_zone(raw_dir, bad.append))
    assert bad == []
    return [(f.call_id, f.stages()) for f in fetches]


@pytest.mark.parametrize("seed, big_prompts", [(1, False), (2, False), (3, False), (4, True)])
@pytest.mark.parametrize("form", ["objects", "replayed"])
def test_tables_equal_values_recomputed_from_the_stages(seed: int, big_prompts: bool, form: str, tmp_path) -> None:
    calls = _synthetic(seed, big_prompts)
    given = _replayed(calls, tmp_path) if form == "replayed" else calls
    if form == "replayed":
        assert all(isinstance(s, msgspec.Raw) for _, stages in given for s in stages)
    result = transform_calls(given, RUN, NOW)
    assert result.failures == {}
    expected: dict[str, list[dict[str, Any]]] = {name: [] for name in result.tables}
    for call_id, stages in calls:
        for name, rows in expected_rows(call_id, stages).items():
            expected[name].extend(rows)
    assert sum(len(rows) for rows in expected.values()) > 300
    for name, table in result.tables.items():
        actual = table.to_pylist()
        assert len(actual) == len(expected[name]), name
        for got, want in zip(actual, expected[name]):
            assert got == want, (name, got["call_stage_id"])


def test_secret_headers_in_synthetic_voices_are_redacted_in_both_forms(tmp_path) -> None:
    calls = _synthetic(5)
    headers = [v for _, stages in calls for s in stages for v in (s.get("externalVoice") or {}).values()
               if isinstance(v, dict) and v.get("headers")]
    assert headers, "the sandbox serves generic voices with headers"
    for given in (calls, _replayed(calls, tmp_path)):
        result = transform_calls(given, RUN, NOW)
        for raw in result.tables["call_stages"]["raw"].to_pylist():
            for voice in (json.loads(raw).get("externalVoice") or {}).values():
                if isinstance(voice, dict) and voice.get("headers"):
                    assert set(voice["headers"].values()) == {REDACTED}


# --------------------------------------------------------------------------- decoding


def test_decode_page_keeps_each_stage_as_the_bytes_received() -> None:
    body = b'{"results": [{"callStageId": "a",  "future": [1, 2.50]}, {"x": "\xc3\xa9"}], "next": null, "total": 2}'
    page, stages = api_schema.decode_page(body)
    assert page.total == 2 and page.next is None
    assert [bytes(s) for s in stages] == [b'{"callStageId": "a",  "future": [1, 2.50]}', b'{"x": "\xc3\xa9"}']


@pytest.mark.parametrize("body, message", [
    (b'{"initialTokenCount": "12"}', "initialTokenCount is a string, expected an integer"),
    (b'{"errorCount": true}', "errorCount is a boolean, expected an integer"),
    (b'{"latestTokenCount": 9223372036854775808}', "latestTokenCount is out of the BIGINT range"),
    (b'{"latestTokenCount": -9223372036854775809}', "latestTokenCount is out of the BIGINT range"),
    (b'{"temperature": 1e400}', "temperature is out of the DOUBLE range"),
    (b'{"inactivityMessages": [{"duration": 30}]}', "inactivityMessages[0].duration is an integer, expected a string"),
    (b'{"created": ["sk-live-SECRET"]}', "created is a list, expected a string"),
])
def test_validation_errors_name_the_path_never_the_value(body: bytes, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as caught:
        api_schema.decode_stage(body)
    assert api_schema.describe(caught.value) == message
    assert "SECRET" not in api_schema.describe(caught.value)


def test_integral_floats_and_bigint_bounds_decode() -> None:
    stage = api_schema.decode_stage(b'{"initialTokenCount": 12.0, "latestTokenCount": 9223372036854775807}')
    assert stage.initialTokenCount == 12.0 and stage.latestTokenCount == 2**63 - 1


@pytest.mark.parametrize("body, falls_back", [
    (b'{"model": "\\ud800"}', True),  # a lone surrogate: msgspec refuses, jsonio.loads replaces
    (b'{"temperature": 1e400}', True),  # a double's overflow: jsonio.loads gives inf
    (b'{"model": "x"', True),  # truncated: jsonio.loads reports where
    (b'{"model": 3}', False),  # a plain type error: the call fails
])
def test_which_refusals_fall_back_to_jsonio(body: bytes, falls_back: bool) -> None:
    with pytest.raises(msgspec.MsgspecError) as caught:
        api_schema.decode_stage(body)
    assert api_schema.needs_fallback(caught.value) is falls_back


def test_voices_keep_unknown_providers_and_their_bytes() -> None:
    voice = api_schema.decode_voice(b'{"someFutureTts": {"voiceId": "v", "extra": {"a": 1}}, "lmnt": null}')
    assert list(voice) == ["someFutureTts", "lmnt"]
    assert bytes(voice["someFutureTts"]) == b'{"voiceId": "v", "extra": {"a": 1}}'
    settings = api_schema.decode_voice_settings(voice["someFutureTts"])
    assert settings.voiceId == "v" and settings.speed is None


def test_listed_call_requires_a_call_id() -> None:
    assert api_schema.decode_listed_call(b'{"callId": "c", "unknown": 1}').callId == "c"
    with pytest.raises(msgspec.ValidationError):
        api_schema.decode_listed_call(b'{"created": "2026-11-20T10:00:00Z"}')

"""Redaction: generic header values and credential-named keys in voice objects."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import jsonio
from pipeline.redact import (
    MAX_NESTING, REDACTED, RedactionError, is_credential_name, may_hold_secret, redact_call, redact_page,
    redact_provider, redact_stage,
)

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN = "Bearer sk-live-4f9Qz7LmX2aB8cD1eF6gH3"


def generic_stage(**generic: Any) -> dict[str, Any]:
    return {
        "callId": "5b0f3c9e-2d4a-4e8b-9c1f-7a6d5e4c3b2a",
        "systemPrompt": "Use the token only if asked. password: not a key, just prompt text",
        "externalVoice": {"generic": {"url": "https://tts.example.com", **generic}},
    }


def test_generic_header_values_redacted_names_kept() -> None:
    stage = generic_stage(headers={"Authorization": TOKEN, "X-Custom": "abc", "Accept": "audio/wav"})
    out = redact_stage(stage)
    assert out["externalVoice"]["generic"]["headers"] == {
        "Authorization": REDACTED, "X-Custom": REDACTED, "Accept": REDACTED
    }
    assert out["externalVoice"]["generic"]["url"] == "https://tts.example.com"
    assert out["systemPrompt"] == stage["systemPrompt"]  # only voices are touched
    assert TOKEN not in json.dumps(out)


def test_voice_overrides_and_unknown_providers_too() -> None:
    stage = {
        "voiceOverrides": {"generic": {"headers": {"Authorization": TOKEN}}},
        "externalVoice": {"futureTts": {"voiceId": "v", "headers": {"X-Key": "k1"}, "accessToken": "t1",
                                        "nested": [{"deeper": {"Private_Key": "pk"}}, "plain"]}},
    }
    out = redact_stage(stage)
    assert out["voiceOverrides"]["generic"]["headers"] == {"Authorization": REDACTED}
    future = out["externalVoice"]["futureTts"]
    assert future == {"voiceId": "v", "headers": {"X-Key": REDACTED}, "accessToken": REDACTED,
                      "nested": [{"deeper": {"Private_Key": REDACTED}}, "plain"]}


def test_credential_keys_in_generic_body_at_any_depth() -> None:
    stage = generic_stage(body={"text": "{text}", "api_key": "k", "cfg": {"ClientSecret": {"a": 1}, "speed": 1},
                                "list": [{"x-api-key": "k2"}, {"password": None}]})
    body = redact_stage(stage)["externalVoice"]["generic"]["body"]
    assert body == {"text": "{text}", "api_key": REDACTED, "cfg": {"ClientSecret": REDACTED, "speed": 1},
                    "list": [{"x-api-key": REDACTED}, {"password": REDACTED}]}


@pytest.mark.parametrize("name", [
    "authorization", "Authorization", "api_key", "apiKey", "X-API-Key", "x_api_key", "token", "accessToken",
    "access-token", "refresh_token", "secret", "clientSecret", "client_secret", "password", "bearer",
    "credentials", "privateKey", "private_key", "xiApiKey", "AWS_SECRET_ACCESS_KEY", "Ocp-Apim-Subscription-Key",
    "auth", "cookie", "authorizationHeader", "privateKeyPem", "clientSecretValue", "tokens", "accessTokens",
    "basicAuth", "authorisation", "sessionId", "jwt", "hmacSignature", "pass", "pwd", "licenseKey", "key",
    "Passphrase", "setCookie", "accessKeyId", "bearerValue", "api\u212aey",
])
def test_credential_names(name: str) -> None:
    assert is_credential_name(name)


@pytest.mark.parametrize("name", [
    "voiceId", "model", "modelId", "speed", "url", "body", "text", "maxTokens", "max_tokens", "tokenizer",
    "responseSampleRate", "jsonAudioFieldPath", "keyboard", "author", "pronunciationDictId", "seed",
    "max_output_tokens", "tokenCount", "authorName", "passage", "keys",
])
def test_ordinary_names(name: str) -> None:
    assert not is_credential_name(name)


def test_nothing_to_redact_returns_the_same_objects() -> None:
    stage = {"externalVoice": {"elevenLabs": {"voiceId": "x", "pronunciationDictionaries": [{"dictionaryId": "d"}]}},
             "voiceOverrides": None, "initialState": {"token": "state is not a voice: left alone"}}
    assert redact_stage(stage) is stage
    page = {"results": [stage, {"voice": "Mark"}], "next": None}
    assert redact_page(page) is page


def test_fixture_page_redacted_without_mutation() -> None:
    page = json.loads((FIXTURES / "stages_all_providers.json").read_text(encoding="utf-8"))
    before = copy.deepcopy(page)
    out = redact_page(page)
    assert page == before  # the caller's objects are untouched
    text = json.dumps(out, ensure_ascii=False)
    for secret in ("sk-live-4f9Qz7LmX2aB8cD1eF6gH3", "xk-93e1c0ffee", "body-key-5521", "cs-7781",
                   "sk-live-override-0042", "nova-secret-1188"):
        assert secret in json.dumps(page) and secret not in text
    assert out["next"] is None and len(out["results"]) == len(page["results"])
    # Stages without secrets are shared, not copied.
    assert out["results"][0] is page["results"][0]
    assert out["results"][6] is not page["results"][6]
    # Untouched parts of a redacted stage are shared too (cheap), the stage object is new.
    assert out["results"][6]["inactivityMessages"] is page["results"][6]["inactivityMessages"]


def test_redact_does_not_mutate_nested_input() -> None:
    stage = generic_stage(headers={"Authorization": TOKEN}, body={"auth": {"token": "t"}, "keep": [1]})
    before = copy.deepcopy(stage)
    out = redact_stage(stage)
    assert stage == before
    assert out is not stage and out["externalVoice"] is not stage["externalVoice"]


@pytest.mark.parametrize("value", [None, "text", 3, [1, {"headers": {"a": "b"}}], {"results": "nope"}])
def test_non_dicts_are_returned_unchanged(value: Any) -> None:
    assert redact_stage(value) is value
    assert redact_page(value) is value


@pytest.mark.parametrize("voice", [None, "", {"generic": None}, {"generic": "x"}, [], {},
                                   {"generic": {"headers": None}}, {"generic": {"headers": {}}}])
def test_odd_voice_shapes_with_nothing_to_hide_are_kept(voice: Any) -> None:
    stage = {"externalVoice": voice}
    assert redact_stage(stage) is stage


@pytest.mark.parametrize("voice, expected", [
    ("generic", REDACTED),
    (5, REDACTED),
    (["generic", None, ["Bearer x"]], [REDACTED, None, [REDACTED]]),
    ('{"generic": {"headers": {"Authorization": "Bearer x"}}}', REDACTED),
    ([{"generic": {"headers": {"Authorization": TOKEN}}}], [{"generic": {"headers": {"Authorization": REDACTED}}}]),
])
def test_malformed_voices_are_redacted(voice: Any, expected: Any) -> None:
    assert redact_stage({"voiceOverrides": voice, "voice": "Mark"}) == {"voiceOverrides": expected, "voice": "Mark"}


def test_headers_that_are_not_an_object_are_redacted_whole() -> None:
    stage = {"externalVoice": {"generic": {"headers": [["Authorization", TOKEN]]}}}
    assert redact_stage(stage)["externalVoice"]["generic"]["headers"] == REDACTED


def test_page_with_odd_items() -> None:
    page = {"results": ["x", None, generic_stage(headers={"A": "b"})], "total": 3}
    out = redact_page(page)
    assert out["results"][:2] == ["x", None]
    assert out["results"][2]["externalVoice"]["generic"]["headers"] == {"A": REDACTED}
    assert page["results"][2]["externalVoice"]["generic"]["headers"] == {"A": "b"}


@pytest.mark.parametrize("spelling", ["headers", "Headers", "HEADERS", "extra_headers", "requestHeaders"])
def test_headers_in_any_case_at_any_depth(spelling: str) -> None:
    stage = {"externalVoice": {"generic": {"request": {spelling: {"X-Auth": TOKEN, "Accept": "audio/wav"}}}},
             "voiceOverrides": {"someNewTts": {"calls": [{"http": {spelling: {"X": TOKEN}}}]}}}
    out = redact_stage(stage)
    assert out["externalVoice"]["generic"]["request"][spelling] == {"X-Auth": REDACTED, "Accept": REDACTED}
    assert out["voiceOverrides"]["someNewTts"]["calls"][0]["http"][spelling] == {"X": REDACTED}
    assert TOKEN not in json.dumps(out)


@pytest.mark.parametrize("name", ["externalVoice", "voiceOverrides", "ExternalVoice", "external_voice", "VOICE-OVERRIDES"])
def test_voices_found_by_name_at_any_depth_of_a_call(name: str) -> None:
    call = {"callId": "c", "metadata": {"token": "not a voice: kept"},
            "agent": {"callTemplate": {name: {"generic": {"headers": {"Authorization": TOKEN}, "apiKey": "k9"}}}},
            "medium": [{"webRtc": {name: "a string voice"}}], name: {"cartesia": {"voiceId": "v"}}}
    out = redact_call(call)
    voice = out["agent"]["callTemplate"][name]["generic"]
    assert voice == {"headers": {"Authorization": REDACTED}, "apiKey": REDACTED}
    assert out["medium"][0]["webRtc"][name] == REDACTED
    assert out["metadata"] is call["metadata"] and out[name] is call[name]


def test_headers_outside_voices_are_not_touched() -> None:
    call = {"metadata": {"headers": {"A": "b"}}, "initialState": {"apiKey": "state"}}
    assert redact_call(call) is call


def test_already_redacted_is_the_same_object() -> None:
    stage = redact_stage(generic_stage(headers={"Authorization": TOKEN}, apiKey="k"))
    assert redact_stage(stage) is stage


def test_too_deep_is_refused_not_leaked() -> None:
    deep: Any = {"headers": {"Authorization": TOKEN}}
    for _ in range(MAX_NESTING + 5):
        deep = {"x": deep}
    with pytest.raises(RedactionError):
        redact_page({"results": [{"externalVoice": {"generic": deep}}]})
    # Nothing is reached beyond the limit outside voices either: a voice may be below it.
    with pytest.raises(RedactionError):
        redact_call({"agent": deep})


def test_anything_jsonio_accepts_can_be_redacted() -> None:
    assert MAX_NESTING >= jsonio.MAX_DEPTH
    depth = jsonio.MAX_DEPTH - 5  # page, results, stage, voice, innermost object: exactly MAX_DEPTH
    text = '{"results":[{"externalVoice":' + '{"x":' * depth + '{"apiKey":"k"}' + "}" * depth + "}]}"
    out = redact_page(jsonio.loads(text))
    assert '"k"' not in json.dumps(out) and REDACTED in json.dumps(out)


def test_may_hold_secret_never_misses_what_redaction_changes() -> None:
    samples = [{"HEADERS": {"a": "b"}}, {"x": [{"privateKeyPem": 1}]}, {"api\u212aey": "k"},
               {"nested": {"voiceOverrides": "s"}}, {"Ba-sic_Auth": "u:p"}, {"voiceId": "v", "speed": 1.0}]
    for sample in samples:
        changed = redact_provider(sample) is not sample
        text = json.dumps(sample, ensure_ascii=False)
        assert not changed or may_hold_secret(text), sample
        # The same answer from the JSON bytes (replayed stages are checked as received).
        assert may_hold_secret(text.encode()) == may_hold_secret(text), sample

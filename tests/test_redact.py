"""Redaction: generic header values and credential-named keys in voice objects."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.redact import REDACTED, is_credential_name, redact_page, redact_stage

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
    "auth", "cookie",
])
def test_credential_names(name: str) -> None:
    assert is_credential_name(name)


@pytest.mark.parametrize("name", [
    "voiceId", "model", "modelId", "speed", "url", "body", "text", "maxTokens", "max_tokens", "tokenizer",
    "responseSampleRate", "jsonAudioFieldPath", "keyboard", "author", "pronunciationDictId", "seed",
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


@pytest.mark.parametrize("voice", ["generic", 5, ["generic"], {"generic": None}, {"generic": "x"},
                                   {"generic": {"headers": None}}, {"generic": {"headers": {}}}])
def test_odd_voice_shapes_tolerated(voice: Any) -> None:
    stage = {"externalVoice": voice}
    assert redact_stage(stage) is stage


def test_headers_that_are_not_an_object_are_redacted_whole() -> None:
    stage = {"externalVoice": {"generic": {"headers": [["Authorization", TOKEN]]}}}
    assert redact_stage(stage)["externalVoice"]["generic"]["headers"] == REDACTED


def test_page_with_odd_items() -> None:
    page = {"results": ["x", None, generic_stage(headers={"A": "b"})], "total": 3}
    out = redact_page(page)
    assert out["results"][:2] == ["x", None]
    assert out["results"][2]["externalVoice"]["generic"]["headers"] == {"A": REDACTED}
    assert page["results"][2]["externalVoice"]["generic"]["headers"] == {"A": "b"}

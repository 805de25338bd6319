"""Property: a secret planted in any credential shape, at any depth, under any spelling,
never reaches a redacted page, a listed call, a table column or a raw file byte, while
header names and ordinary values survive.

Examples come from a seeded generator (fixed count, same examples on every run)."""

from __future__ import annotations

import gzip
import json
import random
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pipeline.raw import RawWriter, read_landing_zone
from pipeline.records import CallFetch
from pipeline.redact import REDACTED, redact_call, redact_page
from pipeline.transform import transform_calls

EXAMPLES = 300
NOW = datetime(2026, 11, 21, tzinfo=timezone.utc)
CREDENTIAL_NAMES = (
    "authorization", "authorizationHeader", "privateKeyPem", "clientSecretValue", "apiKey", "x-api-key", "xi_api_key",
    "accessToken", "refresh_token", "tokens", "password", "passwd", "passphrase", "credentials", "cookie", "Set-Cookie",
    "signature", "awsAccessKeyId", "bearer", "sessionId", "secret", "basicAuth", "subscription-key", "jwt",
)
PROVIDERS = ("generic", "elevenLabs", "cartesia", "playHt", "someFutureTts", "x-unknown")
PLAIN_KEYS = ("config", "request", "options", "extra", "nested", "http", "params", "items")
#: The shapes of Example.secret() and Example.keep() values: one scan of a text finds all of them.
PLANTED = re.compile(r"(?:SECRET|KEEP|X-Header)-\d+-\d+-(?:zq|ok)")


class Example:
    """One generated case: the secrets it planted and the values that must survive."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.n = seed
        self.secrets: list[str] = []
        self.kept: list[str] = []  # must be in every redacted output that holds the voice
        self._count = 0

    def secret(self) -> str:
        self._count += 1
        value = f"SECRET-{self.n}-{self._count}-zq"
        self.secrets.append(value)
        return value

    def keep(self, prefix: str = "KEEP") -> str:
        self._count += 1
        value = f"{prefix}-{self.n}-{self._count}-ok"
        self.kept.append(value)
        return value

    def spelling(self, name: str) -> str:
        """The name in random letter case, sometimes with a '-' or '_' inside."""
        out = "".join(c.upper() if self.rng.random() < 0.3 else c for c in name)
        if self.rng.random() < 0.3:
            at = self.rng.randrange(1, len(out))
            out = out[:at] + self.rng.choice("-_") + out[at:]
        return out

    def carrier(self) -> dict[str, Any]:
        """An object holding a secret in one of the credential shapes."""
        kind = self.rng.choice(("headers", "headers", "credential", "headers-not-object"))
        if kind == "headers":
            names = [self.keep("X-Header") for _ in range(self.rng.randint(1, 3))]
            return {self.spelling(self.rng.choice(("headers", "extraHeaders"))): {name: self.secret() for name in names}}
        if kind == "headers-not-object":
            value = self.rng.choice(([["Authorization", self.secret()]], f"Bearer {self.secret()}"))
            return {self.spelling("headers"): value}
        value: Any = self.secret()
        value = self.rng.choice((value, {"value": value}, [value], {"nested": [{"deeper": value}]}))
        return {self.spelling(self.rng.choice(CREDENTIAL_NAMES)): value}

    def nest(self, value: Any) -> Any:
        """``value`` wrapped in random dicts and lists (plain keys, ordinary values beside)."""
        for _ in range(self.rng.randint(0, 4)):
            if self.rng.random() < 0.5:
                value = {self.rng.choice(PLAIN_KEYS): value, "label": self.keep()}
            else:
                value = [self.keep(), value] if self.rng.random() < 0.5 else [value]
        return value

    def provider_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"voiceId": self.keep(), "url": f"https://tts.example/{self.n}"}
        for _ in range(self.rng.randint(1, 3)):
            settings[self.rng.choice(PLAIN_KEYS) + str(self._count)] = self.nest(self.carrier())
        if self.rng.random() < 0.5:
            settings.update(self.carrier())
        return settings

    def voice(self) -> dict[str, Any]:
        return {self.rng.choice(PROVIDERS): self.provider_settings()}

    def malformed_voice(self) -> Any:
        """A voice sent as a list or a string (the call fails in the transform)."""
        if self.rng.random() < 0.5:
            return [self.voice(), self.nest(self.voice())]
        return self.rng.choice((f"Authorization: Bearer {self.secret()}", json.dumps(self.voice())))

    def voice_key(self) -> str:
        return self.spelling(self.rng.choice(("externalVoice", "voiceOverrides")))

    def stage(self, call_id: str, index: int) -> dict[str, Any]:
        stage: dict[str, Any] = {
            "callId": call_id, "callStageId": str(uuid.UUID(int=self.n * 100 + index + 1)),
            "created": "2026-11-20T10:00:00Z", "systemPrompt": f"Prompt {self.keep()}", "temperature": 0.5,
            "externalVoice": self.voice(),
        }
        if self.rng.random() < 0.5:
            stage["voiceOverrides"] = self.voice()
        if self.rng.random() < 0.4:  # a voice where the schema has none, under any spelling
            stage[self.rng.choice(("initialState", "experimentalSettings"))] = self.nest({self.voice_key(): self.voice()})
        if self.rng.random() < 0.15:
            stage[self.voice_key()] = self.voice()  # "ExternalVoice", "voice_overrides", ...
        return stage

    def call_stages(self) -> tuple[str, list[dict[str, Any]], bool]:
        """(call id, stages, whether the call is well formed)."""
        call_id = str(uuid.UUID(int=self.n + 1))
        stages = [self.stage(call_id, i) for i in range(self.rng.randint(1, 3))]
        well_formed = self.rng.random() < 0.8
        if not well_formed:
            self.rng.choice(stages)["voiceOverrides"] = self.malformed_voice()
        return call_id, stages, well_formed

    def listed_call(self) -> dict[str, Any]:
        call: dict[str, Any] = {"callId": str(uuid.UUID(int=self.n + 1)), "metadata": {"note": self.keep()}}
        place = self.rng.choice(("top", "agent", "medium", "malformed"))
        if place == "top":
            call[self.voice_key()] = self.voice()
        elif place == "agent":
            call["agent"] = self.nest({"callTemplate": {self.voice_key(): self.voice()}})
        elif place == "medium":
            call["medium"] = [{"webRtc": self.nest({self.voice_key(): self.voice()})}]
        else:
            call[self.voice_key()] = self.malformed_voice()
        return call


def planted_in(text: str | bytes) -> frozenset[str]:
    """Every planted secret and kept value that occurs in ``text``."""
    if isinstance(text, bytes):
        return frozenset(m.decode() for m in re.findall(PLANTED.pattern.encode(), text))
    return frozenset(PLANTED.findall(text))


def check(text: str | frozenset[str], example: Example, *, kept: bool = True) -> None:
    """``text`` or what ``planted_in`` found in it: none of the secrets, and the kept values."""
    found = text if isinstance(text, frozenset) else planted_in(text)
    assert not found.intersection(example.secrets), (example.n, sorted(found.intersection(example.secrets)))
    if kept:
        assert found.issuperset(example.kept), (example.n, sorted(set(example.kept) - found))


def examples() -> list[Example]:
    return [Example(seed) for seed in range(EXAMPLES)]


@pytest.fixture(scope="module")
def generated() -> list[tuple[Example, str, list[dict[str, Any]], bool]]:
    out = []
    for example in examples():
        call_id, stages, well_formed = example.call_stages()
        out.append((example, call_id, stages, well_formed))
    return out


def test_redact_page_hides_every_secret(generated) -> None:
    for example, _, stages, well_formed in generated:
        page = {"results": stages, "next": None}
        before = json.dumps(page)
        text = json.dumps(redact_page(page))
        assert json.dumps(page) == before  # never mutated
        check(text, example, kept=well_formed)
        assert REDACTED in text
        # Any shape of page: the rule does not depend on "results" being there.
        check(json.dumps(redact_page([{"odd": stages}])), example, kept=well_formed)


def test_redact_call_hides_every_secret() -> None:
    for example in examples():
        call = example.listed_call()
        text = json.dumps(redact_call(call))
        malformed = any(isinstance(v, (str, list)) for k, v in call.items() if k not in ("callId", "metadata", "medium", "agent"))
        check(text, example, kept=not malformed)


def test_transform_tables_hold_no_secret(generated) -> None:
    calls = [(call_id, stages) for _, call_id, stages, _ in generated]
    _assert_no_secret_in_tables(transform_calls(calls, "run-1", NOW), generated)


def _secrets_after_the_prompt(stage: dict[str, Any]) -> dict[str, Any]:
    """A clean voice first, then the prompt, then the rest with the stage's own voice moved into it."""
    rest = {k: v for k, v in stage.items() if k not in ("externalVoice", "systemPrompt")}
    return {"externalVoice": {"lmnt": {"voiceId": "clean"}}, "systemPrompt": stage["systemPrompt"],
            **rest, "moved": {"externalVoice": stage["externalVoice"]}}


@pytest.mark.parametrize("ensure_ascii, order", [(False, None), (True, None), (False, _secrets_after_the_prompt)])
def test_tables_from_received_bytes_hold_no_secret(generated, ensure_ascii: bool, order) -> None:
    """`replay` hands stages over as received bytes, whose redaction scans skip the prompt."""
    calls = [(call_id, [msgspec.Raw(json.dumps(order(s) if order else s, ensure_ascii=ensure_ascii,
                                               separators=(",", ":")).encode()) for s in stages])
             for _, call_id, stages, _ in generated]
    _assert_no_secret_in_tables(transform_calls(calls, "run-1", NOW), generated)


def _assert_no_secret_in_tables(result, generated) -> None:
    tables_text = {
        name: json.dumps(table.to_pylist(), default=str, ensure_ascii=False) for name, table in result.tables.items()
    }
    everything = planted_in("\n".join(tables_text.values()) + json.dumps(result.failures))
    failed = set(result.failures)
    for example, call_id, _, well_formed in generated:
        check(everything, example, kept=False)
        assert (call_id in failed) == (not well_formed), example.n
    # Ordinary values survive: the provider's voiceId in stage_voices, all of them in raw.
    raw = planted_in("\n".join(result.tables["call_stages"]["raw"].to_pylist()))
    for example, _, _, well_formed in generated:
        if well_formed:
            check(raw, example)


def test_raw_files_hold_no_secret(tmp_path: Path, generated) -> None:
    fetches = [
        CallFetch(call_id, "loaded", pages=[{"results": stages, "next": None}],
                  page_urls=[f"https://api.ultravox.ai/api/calls/{call_id}/stages"], fetched_at=NOW)
        for _, call_id, stages, _ in generated
    ]
    writer = RawWriter(tmp_path, "run-1")
    for start in range(0, len(fetches), 50):
        writer.write(fetches[start : start + 50])
    writer.close()
    compressed = (tmp_path / "run-1.jsonl.gz").read_bytes()
    text = planted_in(gzip.decompress(compressed).decode("utf-8"))
    in_compressed = planted_in(compressed)
    for example, _, _, well_formed in generated:
        check(text, example, kept=well_formed)
        assert not in_compressed.intersection(example.secrets), example.n
    bad: list[Any] = []
    replayed = list(read_landing_zone(tmp_path, bad.append))
    assert bad == [] and len(replayed) == len(fetches)

"""The simulated Ultravox API: deterministic synthetic data served on loopback.

Used by ``ultravox-stages demo``, ``ultravox-stages sandbox``, the tests and the
benchmarks. Three endpoints behave like the live service (see api/NOTES.md):

* ``GET /api/calls/{call_id}/stages`` — the endpoint this tool exports;
* ``GET /api/calls`` — call discovery (``fromDate``/``toDate`` inclusive, ``sort``);
* ``GET /api/deleted_calls`` — calls removed by retention or by users.

Everything is reproducible: :class:`SyntheticData` derives every call from
``(seed, call index)`` alone, so the same seed always serves the same bytes, and a
sandbox with 25,000 calls costs nothing until a call is asked for. Fault injection
(:class:`SandboxOptions`) is deterministic per URL and attempt, not per arrival
order, so concurrent clients see the same faults run after run.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

__all__ = ["Sandbox", "SandboxOptions", "SandboxProcess", "SandboxStats", "SyntheticData", "serve", "write_call_ids"]

# --------------------------------------------------------------------------- data

EPOCH = datetime(2025, 6, 2, tzinfo=UTC)  # fixed, so data never depends on "now"
SPAN_SECONDS = 10 * 86_400  # calls are spread over ten days
PROVIDERS = ("elevenLabs", "cartesia", "lmnt", "google", "inworld", "respeecher", "generic")
UNKNOWN_PROVIDERS = ("playHt", "acmeTts")  # playHt: legacy (until mid-2025); acmeTts: made up
END_BEHAVIORS = ("END_BEHAVIOR_UNSPECIFIED", "END_BEHAVIOR_HANG_UP_SOFT", "END_BEHAVIOR_HANG_UP_STRICT")
MODELS = ("fixie-ai/ultravox", "fixie-ai/ultravox-70B", "ultravox-v0.7", "fixie-ai/ultravox-v0.4.1-llama-3_1-8b")
MODEL_WEIGHTS = (50, 20, 25, 5)
LANGUAGE_HINTS = (None, "en", "en-US", "en-GB", "de", "ja", "es-MX", "fr", "pt-BR", "zh-Hans-CN", "ar")
VOICES = ("Mark", "Jessica", "Riya-Rao-English-Indian", "Emily-English", "Tanya-English", "Aaron-English", "Alex-Spanish")
END_REASONS = ("hangup", "agent_hangup", "timeout", "connection_error", "system_error")
# Every shape a protobuf Duration can take in JSON, edge values included.
EDGE_DURATIONS = (
    "30s", "1.500s", "0.000000001s", "-2s", "315576000000s", "-315576000000s",
    "0.250000s", "0s", "0.000001s", "-0.500s", "120.000000000s",
)
SENTENCES = (
    "You are a helpful, concise voice agent for a regional utility company.",
    "Always confirm the caller's account number before discussing billing details.",
    "If the caller sounds upset, acknowledge their frustration before continuing.",
    "Never read out full card numbers; only the last four digits.",
    "Speak in short sentences: this is a phone call, not an essay.",
    "When you do not know the answer, say so and offer to transfer the call.",
    "Use the lookupOrder tool whenever an order number is mentioned.",
    "Business hours are 8am to 6pm Monday through Friday, Central Time.",
    "Do not give medical, legal or financial advice.",
    "End the call politely once the caller's issue is resolved.",
)
SHORT_PROMPTS = (
    "You are a friendly receptionist for Acme Dental. Keep answers short.",
    "You are Maya, a support agent for a bike shop. Be upbeat.",
    "Collect the caller's name, callback number and the reason for calling.",
    "You are a survey bot. Ask the three questions in order, then thank the caller.",
    "Transfer stage: tell the caller you are connecting them to a human.",
)
UNICODE_PROMPTS = (
    "Réponds en français 🇫🇷 — sois bref, s’il te plaît.",
    "你是一个乐于助人的助手。请用中文回答，保持简短。",
    "أنت مساعد مفيد. أجب باللغة العربية باختصار.",
    "אתה עוזר מועיל. ענה בעברית בקצרה.",
    'Say "hello" then \'goodbye\'; files live in C:\\Users\\agent\\notes.txt\nLine two\ttabbed\r\nLine three',
    "Emoji 😀👍🏽👩‍👩‍👧‍👦 and a zero\u200bwidth space; ＦＵＬＬＷＩＤＴＨ; 日本語でお願いします。",
    "Line separator\u2028then paragraph separator\u2029done. Literal escapes: \\u0041 \\n {\"k\": [1, 2]}",
)
INACTIVITY_TEXTS = (
    "Are you still there?",
    "I haven't heard from you in a while.",
    "If you need more time, just say so.",
    "I'll end the call now. Goodbye!",
    "¿Sigue ahí? 🙂",
    "もしもし、聞こえますか？",
)


def _uuid(rng: random.Random) -> str:
    """A canonical lower-case version-4 UUID string from the given stream."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _timestamp(dt: datetime, rng: random.Random) -> tuple[datetime, str]:
    """RFC 3339 in the styles the API has been seen to use: 'Z' or '+00:00', with no
    fraction, milliseconds or microseconds. Returns the datetime truncated to what the
    string says, so sorting on it agrees with sorting on the parsed string."""
    style = rng.random()
    if style < 0.3:
        dt = dt.replace(microsecond=0)
        text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    elif style < 0.45:
        dt = dt.replace(microsecond=dt.microsecond // 1000 * 1000)
        text = dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{dt.microsecond // 1000:03d}"
    else:
        text = dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
    return dt, text + ("Z" if rng.random() < 0.6 else "+00:00")


def _proto_duration(seconds: float) -> str:
    """A non-negative duration as protobuf JSON with millisecond precision ("123.400s")."""
    millis = max(0, round(seconds * 1000))
    return f"{millis // 1000}.{millis % 1000:03d}s"


@dataclass(frozen=True)
class _CallHead:
    """What /api/calls needs about a call; cheap to compute (no stage contents)."""

    index: int
    call_id: str
    created: datetime
    created_text: str
    joined_text: str | None
    ended_text: str
    billed_duration: str
    end_reason: str
    stage_times: tuple[tuple[datetime, str], ...]
    agent_id: str | None
    metadata: dict[str, str]


class _LRU:
    """A small thread-safe LRU cache."""

    def __init__(self, maxsize: int) -> None:
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._maxsize = maxsize

    def get(self, key: Hashable) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)


class SyntheticData:
    """Deterministic synthetic calls and stages, generated lazily per call.

    Call ``i`` depends only on ``(seed, i)``: the ids of ``SyntheticData(100, s)``
    are a prefix of those of ``SyntheticData(1000, s)`` and their stages are equal.
    A few call indices are pinned so that even small data sets show the variety:
    within every block of 250 calls, calls 0–8 carry one of each external-voice
    provider (the seven known plus the two unknown), call 17 has a ~100 KB system
    prompt, call 123 has no stages and call 200 has 8–12 stages.
    """

    def __init__(self, n_calls: int = 500, seed: int = 0, deleted_fraction: float = 0.02) -> None:
        if n_calls < 0:
            raise ValueError("n_calls must be >= 0")
        self.n_calls = n_calls
        self.seed = seed
        ids = random.Random(f"uvx-sandbox:{seed}:ids")
        self.call_ids: list[str] = [_uuid(ids) for _ in range(n_calls)]
        self._index: dict[str, int] = {cid: i for i, cid in enumerate(self.call_ids)}
        gone = random.Random(f"uvx-sandbox:{seed}:deleted")
        n_deleted = round(n_calls * deleted_fraction)
        self.deleted_call_ids: list[str] = [cid for cid in (_uuid(gone) for _ in range(n_deleted)) if cid not in self._index]
        self._deleted_at: dict[str, str] = {
            cid: _timestamp(EPOCH + timedelta(seconds=gone.uniform(SPAN_SECONDS, 2 * SPAN_SECONDS)), gone)[1]
            for cid in self.deleted_call_ids
        }
        agents = random.Random(f"uvx-sandbox:{seed}:agents")
        self._agents = tuple(_uuid(agents) for _ in range(5))
        self._heads: dict[int, _CallHead] = {}
        self._heads_lock = threading.Lock()
        self._stage_cache = _LRU(4096)
        self._by_created: list[tuple[datetime, int]] | None = None

    # ------------------------------------------------------------------ public

    def stages_for(self, call_id: str) -> list[dict[str, Any]]:
        """The call's stages exactly as the API serves them (a fresh copy each time)."""
        return json.loads(json.dumps(self._stages(call_id)))

    def call_for(self, call_id: str) -> dict[str, Any]:
        """The call object as GET /api/calls serves it."""
        head = self._head(self._lookup(call_id))
        return {
            "callId": head.call_id,
            "clientVersion": None,
            "created": head.created_text,
            "joined": head.joined_text,
            "ended": head.ended_text,
            "endReason": head.end_reason,
            "billedDuration": head.billed_duration,
            "maxDuration": "3600s",
            "recordingEnabled": head.index % 3 == 0,
            "firstSpeaker": "FIRST_SPEAKER_AGENT",
            "shortSummary": None if not head.stage_times else "Caller asked about their order status.",
            "metadata": dict(head.metadata),
            "agentId": head.agent_id,
        }

    def deleted_at(self, call_id: str) -> str:
        """RFC 3339 time /api/deleted_calls reports for a deleted call id."""
        return self._deleted_at[call_id]

    # ------------------------------------------------------------------ internals

    def _lookup(self, call_id: str) -> int:
        index = self._index.get(call_id)
        if index is None:
            raise KeyError(call_id)
        return index

    def _stages(self, call_id: str) -> list[dict[str, Any]]:
        """The shared cached list; never hand it to callers (they may mutate it)."""
        cached = self._stage_cache.get(call_id)
        if cached is None:
            cached = self._make_stages(self._lookup(call_id))
            self._stage_cache.put(call_id, cached)
        return cached

    def _head(self, index: int) -> _CallHead:
        head = self._heads.get(index)
        if head is None:
            head = self._make_head(index)
            with self._heads_lock:
                self._heads[index] = head
        return head

    def _calls_by_created(self) -> list[tuple[datetime, int]]:
        if self._by_created is None:
            self._by_created = sorted((self._head(i).created, i) for i in range(self.n_calls))
        return self._by_created

    def _stage_count(self, index: int, rng: random.Random) -> int:
        slot = index % 250
        if slot == 123:
            return 0
        if slot == 200:
            return rng.randint(8, 12)
        r = rng.random()
        if r < 0.03 and slot >= 9:
            return 0
        for limit, count in ((0.50, 1), (0.75, 2), (0.88, 3)):
            if r < limit:
                return count
        return rng.randint(4, 7) if r < 0.975 else rng.randint(8, 12)

    def _make_head(self, index: int) -> _CallHead:
        rng = random.Random(f"uvx-sandbox:{self.seed}:{index}:head")
        n_stages = self._stage_count(index, rng)
        near_midnight = rng.random() < 0.06
        if near_midnight:  # starts shortly before 00:00 UTC; later stages fall on the next day
            day = EPOCH + timedelta(days=rng.randrange(10) + 1)
            created = day - timedelta(seconds=rng.uniform(20, 400))
        else:
            created = EPOCH + timedelta(seconds=rng.uniform(0, SPAN_SECONDS))
        created, created_text = _timestamp(created, rng)
        joined: datetime | None = None
        joined_text: str | None = None
        times: list[tuple[datetime, str]] = []
        if n_stages or rng.random() < 0.3:
            joined, joined_text = _timestamp(created + timedelta(seconds=rng.uniform(0.5, 8)), rng)
        moment = joined or created
        for k in range(n_stages):
            if k:
                gap = rng.uniform(120, 700) if near_midnight else rng.uniform(5, 240)
                moment = moment + timedelta(seconds=gap)
            times.append(_timestamp(moment + timedelta(milliseconds=rng.randint(1, 900)), rng))
        ended = (times[-1][0] if times else created) + timedelta(seconds=rng.uniform(5, 300))
        ended, ended_text = _timestamp(ended, rng)
        billed = _proto_duration((ended - joined).total_seconds()) if joined else "0s"
        end_reason = "unjoined" if joined is None else rng.choice(END_REASONS)
        agent_id = None if rng.random() < 0.4 else rng.choice(self._agents)
        metadata: dict[str, str] = {}
        if rng.random() < 0.6:
            metadata = {"campaign": rng.choice(("spring", "renewals", "support")), "crmId": f"C-{rng.randrange(10**6):06d}"}
        return _CallHead(
            index, self.call_ids[index], created, created_text, joined_text, ended_text, billed, end_reason,
            tuple(times), agent_id, metadata,
        )

    def _make_stages(self, index: int) -> list[dict[str, Any]]:
        head = self._head(index)
        rng = random.Random(f"uvx-sandbox:{self.seed}:{index}:stages")
        return [_make_stage(rng, head, k) for k in range(len(head.stage_times))]


# ---- one stage ---------------------------------------------------------------


def _make_stage(rng: random.Random, head: _CallHead, k: int) -> dict[str, Any]:
    slot = head.index % 250
    prompt = _big_prompt(rng) if slot == 17 and k == 0 else _system_prompt(rng)
    initial, latest = _token_counts(rng, prompt)
    stage: dict[str, Any] = {
        "callId": head.call_id,
        "callStageId": _uuid(rng),
        "created": head.stage_times[k][1],
    }
    messages = _inactivity_messages(rng)
    if messages or rng.random() < 0.8:  # an empty repeated field may be omitted entirely
        stage["inactivityMessages"] = messages
    stage["initialTokenCount"] = initial
    stage["languageHint"] = rng.choice(LANGUAGE_HINTS)
    stage["latestTokenCount"] = latest
    stage["model"] = rng.choices(MODELS, MODEL_WEIGHTS)[0]
    stage["systemPrompt"] = prompt
    stage["temperature"] = rng.choice((0.0, 0.0, 0.2, 0.4, 0.7, 1.0, round(rng.uniform(0, 1.5), 3)))
    stage["timeExceededMessage"] = None if rng.random() < 0.6 else "Our time is up for today — goodbye!"
    provider = PROVIDERS[slot] if k == 0 and slot < 7 else UNKNOWN_PROVIDERS[slot - 7] if k == 0 and slot < 9 else None
    if provider or rng.random() < 0.65:
        stage["externalVoice"] = _external_voice(rng, provider)
        stage["voice"] = None if rng.random() < 0.8 else rng.choice(VOICES)
    else:
        stage["voice"] = None if rng.random() < 0.15 else rng.choice(VOICES)
    override = rng.random()
    if override < 0.2:  # voiceOverrides: absent (most), null, or a provider object
        stage["voiceOverrides"] = None
    elif override < 0.4:
        stage["voiceOverrides"] = _external_voice(rng, None)
    stage["errorCount"] = _error_count(rng)
    stage["experimentalSettings"] = _experimental(rng)
    stage["initialState"] = _initial_state(rng)
    if rng.random() < 0.03:  # fields a newer API version might add
        stage["futureField"] = {"kind": "preview", "weights": [0.1, 0.25], "nested": {"a": None, "b": "β"}}
    if rng.random() < 0.02:
        stage["stageLabel"] = rng.choice(("intake", "transfer", "wrap-up"))
    return stage


def _paragraphs(rng: random.Random, target_bytes: int) -> str:
    parts: list[str] = []
    size = 0
    while size < target_bytes:
        sentence = rng.choice(SENTENCES)
        parts.append(sentence)
        size += len(sentence) + 1
    return " ".join(parts)


def _system_prompt(rng: random.Random) -> str | None:
    r = rng.random()
    if r < 0.1:
        return None
    if r < 0.62:
        return rng.choice(SHORT_PROMPTS)
    if r < 0.84:
        return _paragraphs(rng, rng.randint(1500, 6000))
    if r < 0.997:
        return rng.choice(UNICODE_PROMPTS)
    return _big_prompt(rng)


def _big_prompt(rng: random.Random) -> str:
    """A ~100 KB prompt (some customers paste whole knowledge bases), with unicode."""
    body = _paragraphs(rng, 101_000)
    return "# Knowledge base 📚\n" + body + "\n\n— 结束 —\nسؤال؟ \"quoted\" \\backslash\\"


def _token_counts(rng: random.Random, prompt: str | None) -> tuple[int | None, int | None]:
    r = rng.random()
    if r < 0.06:
        return None, None  # the stage never ran the model
    initial = len(prompt or "") // 4 + rng.randint(20, 400)
    if r < 0.08:
        return initial, None
    return initial, initial + rng.choice((0, rng.randint(1, 500), rng.randint(500, 20_000)))


def _error_count(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.85:
        return 0
    return rng.randint(1, 4) if r < 0.99 else rng.randint(20, 60)


def _duration(rng: random.Random) -> str:
    """Protobuf Duration JSON: 0, 3, 6 or 9 fractional digits, occasionally edge values."""
    if rng.random() < 0.2:
        return rng.choice(EDGE_DURATIONS)
    seconds = rng.randint(3, 120)
    digits = rng.choice((0, 0, 3, 6, 9))
    if digits == 0:
        return f"{seconds}s"
    return f"{seconds}.{rng.randrange(10**digits):0{digits}d}s"


def _inactivity_messages(rng: random.Random) -> list[dict[str, str]]:
    count = rng.choices((0, 1, 2, 3, 4, 5), (35, 25, 20, 10, 6, 4))[0]
    messages = []
    for _ in range(count):
        message = {"duration": _duration(rng), "message": rng.choice(INACTIVITY_TEXTS)}
        if rng.random() < 0.65:  # proto3 JSON omits the default enum value: often absent
            message["endBehavior"] = rng.choice(END_BEHAVIORS)
        messages.append(message)
    return messages


def _maybe(rng: random.Random, fields: dict[str, Any], keep: float = 0.7) -> dict[str, Any]:
    """Proto3 JSON omits unset fields: keep each optional field with probability keep."""
    return {k: v for k, v in fields.items() if rng.random() < keep}


def _secret(rng: random.Random, prefix: str, length: int = 32) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return prefix + "".join(rng.choice(alphabet) for _ in range(length))


def _external_voice(rng: random.Random, provider: str | None) -> dict[str, Any]:
    """A one-of: exactly one provider key, with that provider's real fields."""
    if provider is None:
        provider = rng.choice(PROVIDERS) if rng.random() < 0.95 else rng.choice(UNKNOWN_PROVIDERS)
    return {provider: _VOICE_BUILDERS[provider](rng)}


def _eleven_labs(rng: random.Random) -> dict[str, Any]:
    voice = {"voiceId": _secret(rng, "", 20)}
    voice |= _maybe(rng, {
        "model": rng.choice(("eleven_turbo_v2_5", "eleven_flash_v2_5", "eleven_multilingual_v2")),
        "speed": rng.choice((0.7, 0.9, 1.0, 1.1, 1.2)),
        "useSpeakerBoost": rng.random() < 0.5,
        "style": round(rng.random(), 2),
        "similarityBoost": round(rng.random(), 2),
        "stability": round(rng.random(), 2),
        "pronunciationDictionaries": [{"dictionaryId": _secret(rng, "pd_", 12), "versionId": _secret(rng, "v_", 8)}],
        "optimizeStreamingLatency": rng.randint(0, 4),
        "maxSampleRate": rng.choice((16000, 22050, 44100)),
        "enableSsmlParsing": rng.random() < 0.5,  # added to the API later
    }, 0.5)
    return voice


def _cartesia(rng: random.Random) -> dict[str, Any]:
    voice = {"voiceId": str(uuid.UUID(int=rng.getrandbits(128), version=4))}
    voice |= _maybe(rng, {
        "model": rng.choice(("sonic-2", "sonic-3", "sonic-english")),
        "speed": round(rng.uniform(-1, 1), 2),
        "emotion": "positivity:high",
        "emotions": ["curiosity", "positivity:low"],
        "generationConfig": _maybe(rng, {"volume": 1.2, "speed": 0.9, "emotion": "calm", "pronunciationDictId": "dict_1"}),
    }, 0.5)
    return voice


def _lmnt(rng: random.Random) -> dict[str, Any]:
    return {"voiceId": rng.choice(("lily", "morgan", "amy"))} | _maybe(
        rng, {"model": rng.choice(("blizzard", "aurora")), "speed": rng.choice((0.25, 1.0, 1.5, 2.0)), "conversational": True}
    )


def _google(rng: random.Random) -> dict[str, Any]:
    return {"voiceId": rng.choice(("en-US-Chirp3-HD-Charon", "de-DE-Chirp3-HD-Kore", "ja-JP-Chirp3-HD-Aoede"))} | _maybe(
        rng, {"speakingRate": rng.choice((0.25, 1.0, 1.25, 2.0))}
    )


def _inworld(rng: random.Random) -> dict[str, Any]:
    return {"voiceId": rng.choice(("Ashley", "Dennis", "Olivia"))} | _maybe(rng, {
        "modelId": rng.choice(("inworld-tts-1", "inworld-tts-1-max")),
        "speakingRate": rng.choice((0.5, 1.0, 1.5)),
        "temperature": round(rng.uniform(0, 2), 2),
        "applyTextNormalization": rng.random() < 0.5,
    })


def _respeecher(rng: random.Random) -> dict[str, Any]:
    return {"voiceId": rng.choice(("samantha", "vova", "olesia"))} | _maybe(rng, {
        "model": rng.choice(("/v1/public/tts/en-rt", "/v1/public/tts/ua-rt")),
        "seed": rng.randint(0, 2**31 - 1),
        "temperature": round(rng.uniform(0, 1.5), 2),
        "topK": rng.choice((-1, 40, 100)),
        "topP": round(rng.uniform(0.1, 1.0), 2),
        "minP": round(rng.uniform(0, 0.2), 3),
        "presencePenalty": round(rng.uniform(0, 2), 2),
        "repetitionPenalty": round(rng.uniform(1, 2), 2),
        "frequencyPenalty": round(rng.uniform(0, 2), 2),
    }, 0.5)


def _generic(rng: random.Random) -> dict[str, Any]:
    # Header values are third-party credentials: every value longer than 8 chars is a
    # random secret that appears nowhere else in the data (tests rely on that).
    headers = {"Authorization": _secret(rng, "Bearer sk-live-")}
    if rng.random() < 0.6:
        headers["X-Api-Key"] = _secret(rng, "xk_", 24)
    if rng.random() < 0.3:
        headers["X-Region"] = "eu-1"
    body: dict[str, Any] = {"text": "{text}", "voice": rng.choice(("nova", "alloy")), "speed": 1.0}
    if rng.random() < 0.3:
        body["api_key"] = _secret(rng, "sk-", 24)
    voice: dict[str, Any] = {"url": "https://tts.example.com/v1/speech", "headers": headers, "body": body}
    voice |= _maybe(rng, {
        "responseSampleRate": rng.choice((16000, 24000, 48000)),
        "responseWordsPerMinute": rng.choice((150, 180)),
        "responseMimeType": rng.choice(("audio/wav", "audio/l16", "application/jsonl")),
        "jsonAudioFieldPath": "data.audio",
        "jsonByteEncoding": rng.choice(("JSON_BYTE_ENCODING_BASE64", "JSON_BYTE_ENCODING_HEX")),
    }, 0.5)
    return voice


def _play_ht(rng: random.Random) -> dict[str, Any]:
    # The provider Ultravox dropped in mid-2025; old calls still carry it.
    return {
        "userId": _secret(rng, "u", 10),
        "voiceId": "s3://voice-cloning-zero-shot/abc/original/manifest.json",
        "model": "Play3.0-mini",
        "speed": 1.0,
        "quality": "premium",
        "temperature": 0.8,
        "emotion": "female_happy",
        "voiceGuidance": 3,
        "styleGuidance": 12,
        "textGuidance": 1,
        "voiceConversionModel": "v2",
    }


def _acme_tts(rng: random.Random) -> dict[str, Any]:
    # A made-up provider a future API version might add: unknown key, unknown fields.
    return {"voiceRef": f"acme://{rng.randrange(1000)}", "timbre": {"warmth": 0.7, "air": [1, 2]}, "streaming": True}


_VOICE_BUILDERS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "elevenLabs": _eleven_labs, "cartesia": _cartesia, "lmnt": _lmnt, "google": _google, "inworld": _inworld,
    "respeecher": _respeecher, "generic": _generic, "playHt": _play_ht, "acmeTts": _acme_tts,
}


def _experimental(rng: random.Random) -> dict[str, Any] | None:
    if rng.random() < 0.7:
        return None
    return _maybe(rng, {
        "vadTurnEndpointDelay": "0.384s",
        "enableBargeIn": rng.random() < 0.5,
        "llmProvider": {"name": "internal", "region": "us-east-1"},
        "transcriberHints": ["Ultravox", "Fixie"],
    }, 0.6)


def _initial_state(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.7:
        return {}
    return {"customerId": f"cust_{rng.randrange(10**5)}", "cart": [{"sku": "A-1", "qty": 2}], "step": rng.randint(0, 5),
            "flags": {"vip": rng.random() < 0.2}}


# --------------------------------------------------------------------------- options and stats

FAULT_KINDS = frozenset({"429", "500", "502", "503", "504", "reset", "truncated", "invalid_json"})
PageHook = Callable[[str, int, dict[str, Any]], object]


@dataclass
class SandboxOptions:
    """How the simulated API behaves. Defaults: a well-behaved, fast, keyed API."""

    api_key: str | None = "sandbox-key"  # None: no authentication check at all
    latency_ms: float = 0
    max_page_size: int = 50
    fault_rate: float = 0.0  # fraction of list requests answered with a transient fault
    fault_seed: int = 0
    faults: tuple[str, ...] = ("429", "500", "502", "503", "504", "reset", "truncated", "invalid_json")
    retry_after: str | None = "1"  # sent with 429/503 faults
    rate_limit_rps: float | None = None
    always_fail: frozenset[str] = frozenset()
    page_hook: PageHook | None = None
    next_base_url: str | None = None
    default_page_size: int = 10


class SandboxStats:
    """Thread-safe counters; read the attributes directly."""

    HEADER_HISTORY = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.by_status: dict[int, int] = {}  # 0 = connection reset without an answer
            self.throttled = 0
            self.stage_requests = 0
            self.in_flight = 0
            self.peak_in_flight = 0
            self._headers: deque[dict[str, str]] = deque(maxlen=self.HEADER_HISTORY)

    @property
    def received_headers(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self._headers)

    def begin(self, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self._headers.append(headers)

    def answered(self, status: int) -> None:
        """Counted before the answer is written, so a client that has read the answer
        always sees it counted."""
        with self._lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1
            if status == 429:
                self.throttled += 1

    def end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def count_stage_request(self) -> None:
        with self._lock:
            self.stage_requests += 1


# --------------------------------------------------------------------------- the application


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    mode: str = "full"  # "full" | "truncated" (half the body, then close) | "reset" (no answer)


def _json_reply(status: int, payload: object, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps(payload, ensure_ascii=False).encode(), headers or {})


def _not_found() -> _Reply:
    return _json_reply(404, {"detail": "Not found."})


class _TokenBucket:
    """Server-side rate limit over all requests (``rate_limit_rps`` = R): a bucket of R
    tokens (one second's worth) refilled at R per second; a request finding it empty
    gets 429 with ``Retry-After: 1``. That is how "R requests/s" limits usually behave,
    the live API's included: its 429 bodies are Django REST framework's, whose throttle
    admits R requests in any one-second window. So a client starting at full speed gets
    a second's worth through at once and meets the limit only when that burst is
    spent, with all its requests then in flight. The bucket is checked after the
    simulated latency, i.e. once the request has "arrived"."""

    def __init__(self, rps: float) -> None:
        self._rps = rps
        self._capacity = max(1.0, rps)
        self._tokens = self._capacity
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rps)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


def _encode_cursor(offset: int) -> str:
    # Opaque to clients (they must follow `next` as given): urlsafe base64 of the offset.
    return base64.urlsafe_b64encode(str(offset).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return int(text) if text.isdigit() else None


class _App:
    """Turns (path, headers) into a :class:`_Reply`; the HTTP handler only writes it."""

    def __init__(self, data: SyntheticData, options: SandboxOptions, stats: SandboxStats) -> None:
        unknown = set(options.faults) - FAULT_KINDS
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        self.data = data
        self.options = options
        self.stats = stats
        self._bucket = _TokenBucket(options.rate_limit_rps) if options.rate_limit_rps else None
        self._attempts: dict[str, int] = {}
        self._attempts_lock = threading.Lock()
        self._pages = _LRU(8192)
        self._listings = _LRU(64)

    def respond(self, target: str, headers: dict[str, str], origin: str) -> _Reply:
        if self.options.latency_ms > 0:
            time.sleep(self.options.latency_ms / 1000)
        if self._bucket is not None and not self._bucket.take():
            return _json_reply(429, {"detail": "Request was throttled. Expected available in 1 second."}, {"Retry-After": "1"})
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = [p for p in url.path.split("/") if p]
        route = self._route(parts)
        if route is None:
            return _not_found()
        if route == "stages":
            self.stats.count_stage_request()
        denied = self._check_auth(headers)
        if denied is not None:
            return denied
        fault = self._fault(target)
        if fault is not None:
            return fault
        base = (self.options.next_base_url or origin).rstrip("/")
        if route == "stages":
            return self._stages(parts[2], query, base)
        if route == "calls":
            return self._calls(query, base)
        return self._deleted(query, base)

    @staticmethod
    def _route(parts: list[str]) -> str | None:
        if len(parts) == 4 and parts[:2] == ["api", "calls"] and parts[3] == "stages":
            return "stages"
        if parts == ["api", "calls"]:
            return "calls"
        if parts == ["api", "deleted_calls"]:
            return "deleted"
        return None

    def _check_auth(self, headers: dict[str, str]) -> _Reply | None:
        # DRF style: 401 when no credentials at all, 403 when they are wrong.
        expected = self.options.api_key
        if expected is None:
            return None
        given = headers.get("x-api-key")
        if not given:
            return _json_reply(401, {"detail": "Authentication credentials were not provided."})
        if given != expected:
            return _json_reply(403, {"detail": "Invalid API key."})
        return None

    def _fault(self, target: str) -> _Reply | None:
        """Deterministic per (fault_seed, URL, attempt number), whatever the arrival order."""
        if self.options.fault_rate <= 0 or not self.options.faults:
            return None
        with self._attempts_lock:
            attempt = self._attempts.get(target, 0)
            self._attempts[target] = attempt + 1
        rng = random.Random(f"{self.options.fault_seed}:{target}:{attempt}")
        if rng.random() >= self.options.fault_rate:
            return None
        return self._fault_reply(rng.choice(self.options.faults))

    def _fault_reply(self, kind: str) -> _Reply:
        retry = {"Retry-After": self.options.retry_after} if self.options.retry_after is not None else {}
        if kind == "429":
            return _json_reply(429, {"detail": "Request was throttled."}, retry)
        if kind == "503":
            return _json_reply(503, {"detail": "Service temporarily unavailable."}, retry)
        if kind == "500":
            return _json_reply(500, {"detail": "A server error occurred."})
        if kind in ("502", "504"):  # gateways answer with HTML, not JSON
            html = f"<html><body><h1>{kind} Gateway error</h1></body></html>".encode()
            return _Reply(int(kind), html, {"Content-Type": "text/html"})
        if kind == "reset":
            return _Reply(0, mode="reset")
        body = json.dumps({"next": None, "previous": None, "results": [{"callId": "x"}] * 20, "total": 20}).encode()
        if kind == "truncated":
            return _Reply(200, body, mode="truncated")
        return _Reply(200, b'{"next": null, "results": [{"callId": <!-- proxy error -->')  # invalid_json

    def _page_params(self, query: dict[str, str]) -> tuple[int, int] | _Reply:
        offset = 0
        if query.get("cursor"):
            decoded = _decode_cursor(query["cursor"])
            if decoded is None:
                return _json_reply(400, {"detail": "Invalid cursor"})
            offset = decoded
        size = self.options.default_page_size
        raw = query.get("pageSize", "")
        if raw.isdigit() and int(raw) > 0:  # like DRF: an invalid pageSize means the default
            size = int(raw)
        return offset, min(size, self.options.max_page_size)

    @staticmethod
    def _links(base_path: str, keep: dict[str, str], offset: int, size: int, total: int) -> tuple[str | None, str | None]:
        def link(at: int) -> str:
            params = dict(keep)
            if at:
                params["cursor"] = _encode_cursor(at)
            params["pageSize"] = str(size)
            return f"{base_path}?{urlencode(params)}"

        following = link(offset + size) if offset + size < total else None
        previous = link(max(0, offset - size)) if offset > 0 else None
        return following, previous

    def _stages(self, call_id: str, query: dict[str, str], base: str) -> _Reply:
        if call_id in self.options.always_fail:
            return _json_reply(500, {"detail": "A server error occurred."})
        if call_id not in self.data._index:  # unknown, deleted or malformed id
            return _not_found()
        params = self._page_params(query)
        if isinstance(params, _Reply):
            return params
        offset, size = params
        hook = self.options.page_hook
        key = (call_id, offset, size, base)
        if hook is None:
            cached = self._pages.get(key)
            if cached is not None:
                return _Reply(200, cached)
        stages = self.data._stages(call_id)
        following, previous = self._links(f"{base}/api/calls/{quote(call_id)}/stages", {}, offset, size, len(stages))
        body = {"next": following, "previous": previous, "results": stages[offset : offset + size], "total": len(stages)}
        if hook is None:
            payload = json.dumps(body, ensure_ascii=False).encode()
            self._pages.put(key, payload)
            return _Reply(200, payload)
        return self._apply_hook(hook, call_id, offset // size, json.loads(json.dumps(body)))

    @staticmethod
    def _apply_hook(hook: PageHook, call_id: str, page_index: int, body: dict[str, Any]) -> _Reply:
        result = hook(call_id, page_index, body)  # gets a private copy: free to mutate
        if result is None:
            return _json_reply(200, body)
        if isinstance(result, dict):
            return _json_reply(200, result)
        if isinstance(result, bytes):
            return _Reply(200, result)
        if isinstance(result, tuple) and len(result) == 3:
            status, headers, raw = result
            return _Reply(int(status), bytes(raw), dict(headers or {}))
        raise TypeError(f"page_hook returned {type(result).__name__}")

    def _calls(self, query: dict[str, str], base: str) -> _Reply:
        params = self._page_params(query)
        if isinstance(params, _Reply):
            return params
        offset, size = params
        keep = {k: query[k] for k in ("fromDate", "toDate", "sort") if k in query}
        listing = self._call_listing(keep)
        if isinstance(listing, _Reply):
            return listing
        following, previous = self._links(f"{base}/api/calls", keep, offset, size, len(listing))
        results = [self.data.call_for(self.data.call_ids[i]) for i in listing[offset : offset + size]]
        return _json_reply(200, {"next": following, "previous": previous, "results": results, "total": len(listing)})

    def _call_listing(self, keep: dict[str, str]) -> list[int] | _Reply:
        key = tuple(sorted(keep.items()))
        cached = self._listings.get(key)
        if cached is not None:
            return cached
        by_created = self.data._calls_by_created()
        lo, hi = 0, len(by_created)
        try:  # dates are inclusive and refer to `created` in UTC
            if keep.get("fromDate"):
                start = datetime.combine(date.fromisoformat(keep["fromDate"]), datetime.min.time(), UTC)
                lo = bisect_left(by_created, (start, -1))
            if keep.get("toDate"):
                end = datetime.combine(date.fromisoformat(keep["toDate"]) + timedelta(days=1), datetime.min.time(), UTC)
                hi = bisect_left(by_created, (end, -1))
        except ValueError:
            return _json_reply(400, {"detail": "Enter a valid date (YYYY-MM-DD)."})
        sort = keep.get("sort", "-created")  # newest first unless asked otherwise
        if sort not in ("created", "-created"):
            return _json_reply(400, {"detail": f"Invalid sort {sort!r}: use created or -created."})
        indices = [i for _, i in by_created[lo:max(lo, hi)]]
        if sort == "-created":
            indices.reverse()
        self._listings.put(key, indices)
        return indices

    def _deleted(self, query: dict[str, str], base: str) -> _Reply:
        params = self._page_params(query)
        if isinstance(params, _Reply):
            return params
        offset, size = params
        ids = self.data.deleted_call_ids
        following, previous = self._links(f"{base}/api/deleted_calls", {}, offset, size, len(ids))
        results = [{"callId": cid, "deleted": self.data.deleted_at(cid)} for cid in ids[offset : offset + size]]
        return _json_reply(200, {"next": following, "previous": previous, "results": results, "total": len(ids)})


# --------------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: _App) -> None:
        self.app = app
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that hang up (BrokenPipe, ConnectionReset, timeouts) are normal here;
        # never print tracebacks to stderr.
        return

    def close_connections(self) -> None:
        with self.connections_lock:
            live = list(self.connections)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    server: _Server
    timeout = 120  # idle keep-alive connections are dropped after this

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on small answers
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return  # silent: never write to stderr

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        stats = self.server.app.stats
        headers = {k.lower(): v for k, v in self.headers.items()}
        stats.begin(headers)
        try:
            host = headers.get("host") or "%s:%s" % self.server.server_address[:2]
            try:
                reply = self.server.app.respond(self.path, headers, f"http://{host}")
            except Exception:  # a bug or a raising page_hook: answer like a real server would
                reply = _json_reply(500, {"detail": "A server error occurred."})
            stats.answered(0 if reply.mode == "reset" else reply.status)
            self._write(reply)
        finally:
            stats.end()

    def _write(self, reply: _Reply) -> None:
        if reply.mode == "reset":
            # Close without answering; linger 0 makes the close an RST.
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        self.send_response(reply.status)
        if not any(k.lower() == "content-type" for k in reply.headers):
            self.send_header("Content-Type", "application/json")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        # Truncated answers announce the full length, send half, then close.
        self.send_header("Content-Length", str(len(reply.body)))
        body = reply.body
        if reply.mode == "truncated":
            body = body[: len(body) // 2]
            self.close_connection = True
        # Head and body in one write (end_headers() would write the head alone): one
        # segment per answer, which keeps small keep-alive answers fast.
        self._headers_buffer.append(b"\r\n")
        head = b"".join(self._headers_buffer)
        self._headers_buffer = []
        self.wfile.write(head + body)


class Sandbox:
    """The simulated API in a background thread: ``with Sandbox(data) as box: box.base_url``."""

    def __init__(
        self, data: SyntheticData, options: SandboxOptions | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.data = data
        self.options = options or SandboxOptions()
        self.stats = SandboxStats()
        self._app = _App(data, self.options, self.stats)
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("sandbox not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Sandbox:
        if self._server is None:
            self._server = _Server(self._address, self._app)
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                            name="uvx-sandbox", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reset_stats(self) -> None:
        self.stats.reset()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SandboxProcess:
    """The simulated API as ``ultravox-stages sandbox`` in a child process, for
    measurements: an in-process :class:`Sandbox` shares the interpreter lock with the
    client it serves, so it slows the client down and is slowed down by it.

    ``with SandboxProcess(n_calls=1000, latency_ms=50) as box: box.base_url, box.call_ids``
    — started when entered (it waits until the server accepts connections) and
    stopped when left. Only the options the ``sandbox`` command has are available.
    """

    def __init__(
        self,
        n_calls: int = 500,
        seed: int = 0,
        api_key: str | None = "sandbox-key",
        latency_ms: float = 0.0,
        rate_limit_rps: float | None = None,
        host: str = "127.0.0.1",
        startup_seconds: float = 30.0,
    ) -> None:
        self.n_calls, self.seed, self.api_key = n_calls, seed, api_key
        self.latency_ms, self.rate_limit_rps = latency_ms, rate_limit_rps
        self.host, self.startup_seconds = host, startup_seconds
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self._proc is None:
            raise RuntimeError("sandbox not started")
        return f"http://{self.host}:{self.port}"

    @cached_property
    def call_ids(self) -> list[str]:
        """The served call IDs (derived from (seed, index) alone, like the child's)."""
        return SyntheticData(n_calls=self.n_calls, seed=self.seed).call_ids

    def start(self) -> SandboxProcess:
        for _ in range(3):  # the free port can be taken before the child binds it
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
            args = [sys.executable, "-m", "pipeline", "sandbox", "--host", self.host, "--port", str(self.port),
                    "--calls", str(self.n_calls), "--seed", str(self.seed), "--latency-ms", str(self.latency_ms)]
            args += ["--no-auth"] if self.api_key is None else ["--api-key", self.api_key]
            if self.rate_limit_rps:
                args += ["--rate-limit", str(self.rate_limit_rps)]
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError("the sandbox process did not start")

    def _wait_ready(self) -> bool:
        assert self._proc is not None and self.port is not None
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(data: SyntheticData, options: SandboxOptions, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve in the foreground until interrupted (KeyboardInterrupt propagates). Prints nothing."""
    server = _Server((host, port), _App(data, options, SandboxStats()))
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.close_connections()
        server.server_close()


def write_call_ids(data: SyntheticData, path: Path) -> None:
    """The served call ids, one per line (the format ``run --calls-file`` reads)."""
    Path(path).write_text("".join(f"{cid}\n" for cid in data.call_ids), encoding="utf-8")

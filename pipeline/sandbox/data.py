"""Deterministic synthetic Ultravox calls and stages (no I/O but :func:`write_call_ids`).

:class:`SyntheticData` derives every call from ``(seed, call index)`` alone, so the same
seed always serves the same bytes, and 25,000 calls cost nothing until one is asked for.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any
from pipeline.raw import RawWriter
from pipeline.records import CallFetch

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


class LRUCache:
    """A small thread-safe LRU cache bounded by entries and by the bytes ``weigh``
    says each value holds; a value heavier than an eighth of the byte bound is not kept."""

    def __init__(self, maxsize: int, max_bytes: int | None = None, weigh: Callable[[Any], int] = len) -> None:
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._weigh = weigh
        self.nbytes = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        weight = self._weigh(value) if self._max_bytes is not None else 0
        if self._max_bytes is not None and weight > self._max_bytes // 8:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            self._items[key] = (value, weight)
            self.nbytes += weight
            while len(self._items) > self._maxsize or (self._max_bytes is not None and self.nbytes > self._max_bytes):
                self.nbytes -= self._items.popitem(last=False)[1][1]


class SyntheticData:
    """Deterministic synthetic calls and stages, generated lazily per call.

    Call ``i`` depends only on ``(seed, i)``: the ids of ``SyntheticData(100, s)``
    are a prefix of those of ``SyntheticData(1000, s)`` and their stages are equal.
    A few call indices are pinned so that even small data sets show the variety:
    within every block of 250 calls, calls 0–8 carry one of each external-voice
    provider (the seven known plus the two unknown), call 17 has a ~100 KB system
    prompt, call 123 has no stages and call 200 has 8–12 stages.

    ``big_prompts`` gives about a quarter of the stages a ~100 KB system prompt and
    about 1% of the calls a ~1 MB one; ``huge_prompt_calls`` calls (chosen from the
    seed, among calls with stages) carry one 60 MB prompt. Both are built only when
    their call is asked for and are never cached whole.
    """

    def __init__(
        self, n_calls: int = 500, seed: int = 0, deleted_fraction: float = 0.02,
        big_prompts: bool = False, huge_prompt_calls: int = 0,
    ) -> None:
        if n_calls < 0:
            raise ValueError("n_calls must be >= 0")
        if huge_prompt_calls < 0:
            raise ValueError("huge_prompt_calls must be >= 0")
        self.n_calls = n_calls
        self.seed = seed
        self.big_prompts = big_prompts
        self.huge_prompt_calls = huge_prompt_calls
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
        self._stage_cache = LRUCache(4096, STAGE_CACHE_BYTES, _stages_weight)
        self._by_created: list[tuple[datetime, int]] | None = None
        self._huge_indices: frozenset[int] | None = None
        self.listed_before: datetime | None = None  # calls created at or after it are not listed yet

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

    def has_call(self, call_id: str) -> bool:
        """Whether the stages endpoint serves this id (deleted and unknown ids are 404)."""
        return call_id in self._index

    def stage_count(self, call_id: str) -> int:
        """How many stages the call has (cheap: no stage contents are built)."""
        return len(self._head(self._lookup(call_id)).stage_times)

    def stage_ids_for(self, call_id: str) -> list[str]:
        """The call's ``callStageId`` values in order."""
        return [stage["callStageId"] for stage in self._stages(call_id)]

    def index_of(self, call_id: str) -> int:
        """The call's position in ``call_ids`` (KeyError for ids the sandbox does not serve)."""
        return self._lookup(call_id)

    def created_of(self, call_id: str) -> datetime:
        """The call's ``created`` as a datetime (exactly what its RFC 3339 string says)."""
        return self._head(self._lookup(call_id)).created

    def shared_stages(self, call_id: str) -> list[dict[str, Any]]:
        """The call's cached stage list itself, for read-only use (``stages_for`` copies)."""
        return self._stages(call_id)

    def calls_by_created(self) -> list[tuple[datetime, int]]:
        """``(created, index)`` of the listed calls, oldest first; ``listed_before`` hides
        the calls not created yet, which is how tests let time pass between runs."""
        if self._by_created is None:
            self._by_created = sorted((self._head(i).created, i) for i in range(self.n_calls))
        if self.listed_before is None:
            return self._by_created
        return [pair for pair in self._by_created if pair[0] < self.listed_before]

    def mark_deleted(self, call_id: str, at: str) -> None:
        """List the call in /api/deleted_calls with the RFC 3339 time ``at``; its stages stay served,
        like a call removed upstream after an exporter loaded it."""
        if call_id not in self._deleted_at:
            self.deleted_call_ids.append(call_id)
        self._deleted_at[call_id] = at

    def huge_prompt_call_ids(self) -> list[str]:
        """The calls carrying a 60 MB system prompt (see ``huge_prompt_calls``)."""
        return [self.call_ids[i] for i in sorted(self._huge_prompt_indices())]

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
        stages = [_make_stage(rng, head, k) for k in range(len(head.stage_times))]
        if self.big_prompts:
            self._enlarge_prompts(index, stages)
        if stages and index in self._huge_prompt_indices():
            _set_prompt(stages[0], _huge_prompt(random.Random(f"uvx-sandbox:{self.seed}:{index}:huge")))
        return stages

    def _enlarge_prompts(self, index: int, stages: list[dict[str, Any]]) -> None:
        # Separate streams: the stages themselves are the same as without big_prompts.
        if stages and random.Random(f"uvx-sandbox:{self.seed}:{index}:mb").random() < 0.01:
            _set_prompt(stages[0], _prose(random.Random(f"uvx-sandbox:{self.seed}:{index}:mb:text"), 1_000_000))
        for k, stage in enumerate(stages):
            rng = random.Random(f"uvx-sandbox:{self.seed}:{index}:{k}:big")
            if rng.random() < 0.25 and len(stage.get("systemPrompt") or "") < 100_000:
                _set_prompt(stage, _prose(rng, 100_000))

    def _huge_prompt_indices(self) -> frozenset[int]:
        if self._huge_indices is None:
            order = list(range(self.n_calls))
            random.Random(f"uvx-sandbox:{self.seed}:huge-calls").shuffle(order)
            with_stages = (i for i in order if self._head(i).stage_times)
            self._huge_indices = frozenset(islice(with_stages, self.huge_prompt_calls))
        return self._huge_indices


STAGE_CACHE_BYTES = 32 * 1024 * 1024
PAGE_CACHE_BYTES = 32 * 1024 * 1024
HUGE_PROMPT_BYTES = 60 * 1024 * 1024


def _stages_weight(stages: list[dict[str, Any]]) -> int:
    """Rough bytes a cached stage list holds: its prompts (one emoji makes a str 4 bytes a
    character) plus a flat cost per stage."""
    return sum(sys.getsizeof(s.get("systemPrompt") or "") + 2_000 for s in stages)


def _set_prompt(stage: dict[str, Any], prompt: str) -> None:
    """Replace the system prompt, moving the token counts by the same amount."""
    delta = (len(prompt) - len(stage.get("systemPrompt") or "")) // 4
    stage["systemPrompt"] = prompt
    for name in ("initialTokenCount", "latestTokenCount"):
        if stage.get(name) is not None:
            stage[name] = max(0, stage[name] + delta)


def _prose(rng: random.Random, target_bytes: int, title: str = "# Agent handbook 📘") -> str:
    """A knowledge-base style prompt of about target_bytes: titled sections of sentences."""
    sections: list[str] = [title]
    size = len(sections[0])
    number = 0
    while size < target_bytes:
        number += 1
        section = f"## Section {number}\n" + _paragraphs(rng, min(8_000, target_bytes - size))
        sections.append(section)
        size += len(section.encode()) + 2
    return "\n\n".join(sections)


def _long_prose(rng: random.Random, target_bytes: int, block_bytes: int) -> str:
    """About target_bytes of ASCII prose as numbered volumes of one block (cheap to build).
    ASCII on purpose: one non-Latin-1 character would make Python hold it at 2-4 bytes a character."""
    block = _prose(rng, block_bytes, "# Agent handbook")
    parts, size, number = [], 0, 0
    while size < target_bytes:
        number += 1
        part = f"\n\n# Volume {number}\n\n" + block
        parts.append(part)
        size += len(part.encode())
    return "".join(parts).lstrip("\n")


def _huge_prompt(rng: random.Random) -> str:
    """A 60 MB prompt."""
    return _long_prose(rng, HUGE_PROMPT_BYTES, 1_000_000)


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


def write_call_ids(data: SyntheticData, path: Path) -> None:
    """The served call ids, one per line (the format ``run --calls-file`` reads)."""
    Path(path).write_text("".join(f"{cid}\n" for cid in data.call_ids), encoding="utf-8")


def write_landing_zone(directory: Path, calls: Iterable[tuple[str, list[dict[str, Any]]]], run_id: str = "landed") -> None:
    """Calls' stages as ``run --raw-dir`` lands them (one page per call), for replays without a run."""
    writer = RawWriter(Path(directory), run_id)
    fetches: list[CallFetch] = []
    for call_id, stages in calls:
        page = {"next": None, "previous": None, "results": stages, "total": len(stages)}
        fetches.append(CallFetch(call_id, "loaded", pages=[page],
                                 page_urls=[f"https://api.ultravox.ai/api/calls/{call_id}/stages?pageSize=100"]))
        if len(fetches) == 1000:
            writer.write(fetches)
            fetches = []
    writer.write(fetches)
    writer.close()

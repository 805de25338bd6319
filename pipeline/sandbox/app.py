"""The simulated API as an application: (target, headers) in, a :class:`Reply` out.

Routing, authentication, pagination, fault injection, hostile modes and the rate limit
live here, with no I/O. :class:`SandboxApp` answers through ``httpx.MockTransport(app.handler)``
for sync and async clients with no socket; ``pipeline.sandbox.server`` writes the same
replies on a real socket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx

from pipeline.sandbox.hostile import FAULT_KINDS, HOSTILE_KINDS
from pipeline.sandbox.data import PAGE_CACHE_BYTES, LRUCache, SyntheticData, _generic, _long_prose, _uuid

PLANTED_SECRET_PREFIX = "uvx-planted-secret-"
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
    hostile: tuple[str, ...] = ()  # HOSTILE_KINDS handed out among a share of the calls
    hostile_share: float = 0.05  # fraction of calls, chosen from fault_seed and the call id
    hostile_calls: dict[str, str] = field(default_factory=dict)  # call id → kind; wins over the share
    slow_body_interval: float = 1.0  # seconds between the bytes of a slow_body answer


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
class Reply:
    """One answer of the simulated API, whatever transport delivers it."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    mode: str = "full"  # "full" | "truncated" (half the body, then close) | "reset" (no answer) | "slow"
    pace: float = 0.0  # "slow": seconds between body bytes

    def head_fields(self) -> list[tuple[str, str]]:
        """The header fields as sent: a JSON Content-Type unless set, and the full
        Content-Length even when the body is cut short (that is what a truncation is)."""
        fields = list(self.headers.items())
        if not any(name.lower() == "content-type" for name, _ in fields):
            fields.insert(0, ("Content-Type", "application/json"))
        fields.append(("Content-Length", str(len(self.body))))
        return fields

    def sent_body(self) -> bytes:
        """The bytes that actually go out: half of them for a truncated answer."""
        return self.body[: len(self.body) // 2] if self.mode == "truncated" else self.body


class ReplyStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A reply's body for httpx, with truncation and slow bodies emulated."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def _chunks(self) -> list[bytes]:
        body = self.reply.sent_body()
        if self.reply.mode == "slow":
            return [body[at : at + 1] for at in range(len(body))]
        return [body] if body else []

    def _cut_short(self) -> None:
        if self.reply.mode == "truncated":
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    def __iter__(self) -> Iterator[bytes]:
        for at, chunk in enumerate(self._chunks()):
            if at and self.reply.mode == "slow":
                time.sleep(self.reply.pace)
            yield chunk
        self._cut_short()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for at, chunk in enumerate(self._chunks()):
            if at and self.reply.mode == "slow":
                await asyncio.sleep(self.reply.pace)
            yield chunk
        self._cut_short()


def _json_reply(status: int, payload: object, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(payload, ensure_ascii=False).encode(), headers or {})


def _not_found() -> Reply:
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


# --------------------------------------------------------------------------- hostile modes

_NEEDS_STAGES = frozenset({"deep_voice", "lone_surrogate", "reused_stage_id", "secret_shapes"})
DEEP_NESTING_LEVELS = 100_000
DEEP_VOICE_LEVELS = 600
HUGE_PAGES = 400
HUGE_PAGE_BYTES = 2_000_000
LONE_SURROGATE = "\ud800"
# Each is unparseable in its own way; {base} keeps the sandbox origin where the defect is elsewhere.
INVALID_NEXT_TEMPLATES = (
    "http://[::1{path}?{query}",
    "http://xn--{path}?{query}",
    "{base}{path}\x00?{query}",
    "{base}{path}\t?{query}",
)
CREDENTIAL_FIELDS = ("authorizationHeader", "privateKeyPem", "clientSecretValue", "apiKey", "token")


def _encode_hostile(page: object) -> bytes:
    """JSON with any lone surrogate written as the escape \\ud800 (UTF-8 cannot carry it)."""
    raw = json.dumps(page, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return raw.replace(LONE_SURROGATE.encode("utf-8", "surrogatepass"), b"\\ud800")


def _deep_nesting_body() -> bytes:
    nested = b"[" * DEEP_NESTING_LEVELS + b"]" * DEEP_NESTING_LEVELS
    return b'{"next": null, "previous": null, "results": [' + nested + b'], "total": 1}'


def _not_gzip(rng: random.Random, page: bytes) -> bytes:
    """Either the plain page (a proxy that lies about the encoding) or a gzip header on raw text."""
    if rng.random() < 0.5:
        return page
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + page[:200]


def _plant_deep_voice(stage: dict[str, Any], rng: random.Random) -> None:
    voice = _generic(rng)
    nested: list[Any] = ["{text}"]
    for _ in range(DEEP_VOICE_LEVELS - 1):
        nested = [nested]
    voice["body"] = nested
    stage["externalVoice"] = {"generic": voice}


def _plant_lone_surrogates(stage: dict[str, Any]) -> None:
    stage["systemPrompt"] = (stage.get("systemPrompt") or "") + f" Half an emoji: {LONE_SURROGATE} (sic)."
    stage["voice"] = f"Jessica{LONE_SURROGATE}"
    stage["initialState"] = {**(stage.get("initialState") or {}), f"note{LONE_SURROGATE}": f"x{LONE_SURROGATE}y"}


class _Markers:
    """Hands out numbered planted secrets and remembers them."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.issued: list[str] = []

    def __call__(self) -> str:
        marker = f"{PLANTED_SECRET_PREFIX}{self.index}-{len(self.issued)}"
        self.issued.append(marker)
        return marker


def _credential_value(name: str, marker: str) -> str:
    if name == "privateKeyPem":
        return f"-----BEGIN PRIVATE KEY-----\n{marker}\n-----END PRIVATE KEY-----\n"
    return f"Bearer {marker}" if name == "authorizationHeader" else marker


def _bury(rng: random.Random, name: str, value: str, lists_first: bool) -> Any:
    """{name: value} wrapped in 1–5 levels of dicts and lists (a list among them when lists_first)."""
    node: Any = {name: value}
    for level in range(rng.randint(1, 5)):
        use_list = lists_first if level == 0 else rng.random() < 0.5
        node = [{"note": "padding"}, node] if use_list else {f"level{level}": node}
    return node


def _plant_secret_shapes(stages: list[dict[str, Any]], index: int, rng: random.Random) -> list[str]:
    """Every credential shape an exporter must redact; returns the markers planted."""
    mark = _Markers(index)
    body: dict[str, Any] = {"text": "{text}", "fallbacks": [{"url": "https://backup.example.com/tts",
                                                             "headers": {"X-Api-Key": mark()}}]}
    for k, name in enumerate(CREDENTIAL_FIELDS):
        body[f"extra{k}"] = _bury(rng, name, _credential_value(name, mark()), lists_first=k % 2 == 0)
    generic = {
        "url": "https://tts.example.com/v1/speech",
        "Headers": {"Authorization": f"Bearer {mark()}"},
        "HEADERS": {"X-Api-Key": mark()},
        "headers": [{"name": "Authorization", "value": f"Bearer {mark()}"}, ["X-Api-Key", mark()]],
        "request": {"method": "POST", "headers": {"Authorization": f"Bearer {mark()}", "Accept": "audio/wav"}},
        "body": body,
    }
    unknown = {"voiceRef": "acme://7", "transport": {"http": {"headers": {"X-Acme-Key": mark()}}},
               "auth": _bury(rng, "token", mark(), lists_first=True)}
    stages[0]["externalVoice"] = {"generic": generic}
    # voiceOverrides must be an object; a list is what a broken client would send.
    stages[0]["voiceOverrides"] = [{"generic": {"headers": {"Authorization": f"Bearer {mark()}"}}}, f"apiKey={mark()}"]
    if len(stages) > 1:
        stages[-1]["externalVoice"] = {"acmeTts": unknown}
    else:  # one stage: a malformed one-of holding both providers
        stages[0]["externalVoice"]["acmeTts"] = unknown
    return mark.issued


def _listed_secret(index: int) -> str:
    return f"{PLANTED_SECRET_PREFIX}{index}-listed"


def _listed_secret_voice(index: int) -> dict[str, Any]:
    return {"generic": {"url": "https://tts.example.com/v1/speech",
                        "headers": {"Authorization": f"Bearer {_listed_secret(index)}"}}}


class _Hostile:
    """Which calls misbehave (from fault_seed and the call id alone) and how."""

    def __init__(self, data: SyntheticData, options: SandboxOptions) -> None:
        self.data = data
        self.options = options
        self.kinds = tuple(dict.fromkeys(options.hostile))
        self._check()
        self.plants_listing = "secret_shapes" in self.kinds or "secret_shapes" in options.hostile_calls.values()
        self._picked: dict[str, str | None] = {}

    def _check(self) -> None:
        unknown = (set(self.kinds) | set(self.options.hostile_calls.values())) - HOSTILE_KINDS
        if unknown:
            raise ValueError(f"unknown hostile kinds: {sorted(unknown)}")
        if not 0 <= self.options.hostile_share <= 1:
            raise ValueError("hostile_share must be between 0 and 1")
        for call_id, kind in self.options.hostile_calls.items():
            if not self.data.has_call(call_id):
                raise ValueError(f"hostile_calls: {call_id} is not a served call")
            if kind in _NEEDS_STAGES and not self.data.stage_count(call_id):
                raise ValueError(f"hostile_calls: {call_id} has no stages to make {kind}")

    def _rng(self, call_id: str, purpose: str) -> random.Random:
        return random.Random(f"uvx-hostile:{self.options.fault_seed}:{call_id}:{purpose}")

    def kind(self, call_id: str) -> str | None:
        if call_id not in self._picked:
            self._picked[call_id] = self._choose(call_id)
        return self._picked[call_id]

    def _choose(self, call_id: str) -> str | None:
        explicit = self.options.hostile_calls.get(call_id)
        if explicit is not None:
            return explicit
        if not self.kinds or not self.data.has_call(call_id):
            return None
        rng = self._rng(call_id, "pick")
        if rng.random() >= self.options.hostile_share:
            return None
        kind = rng.choice(self.kinds)
        if kind in _NEEDS_STAGES and not self.data.stage_count(call_id):
            return None
        return kind

    def picked(self) -> dict[str, str]:
        if not self.kinds and not self.options.hostile_calls:
            return {}
        return {cid: kind for cid in self.data.call_ids if (kind := self.kind(cid)) is not None}

    def served_stages(self, call_id: str, kind: str | None) -> list[dict[str, Any]]:
        """The call's stages as served (a fresh copy), with the kind's changes to their contents."""
        stages = self.data.stages_for(call_id)
        if kind == "deep_voice":
            _plant_deep_voice(stages[0], self._rng(call_id, "voice"))
        elif kind == "lone_surrogate":
            _plant_lone_surrogates(stages[0])
        elif kind == "reused_stage_id":
            donor = self.donor_stage_id(call_id)
            if donor is not None:
                stages[0]["callStageId"] = donor
        elif kind == "secret_shapes":
            _plant_secret_shapes(stages, self.data.index_of(call_id), self._rng(call_id, "secrets"))
        return stages

    def planted(self, call_id: str) -> list[str]:
        stages = self.data.stages_for(call_id)
        index = self.data.index_of(call_id)
        return _plant_secret_shapes(stages, index, self._rng(call_id, "secrets")) + [_listed_secret(index)]

    def donor_stage_id(self, call_id: str) -> str | None:
        """A stage id of another call with stages, preferably one that is not hostile itself."""
        rng = self._rng(call_id, "donor")
        ids, n = self.data.call_ids, self.data.n_calls
        start = rng.randrange(n)
        fallback = None
        for step in range(n):
            other = ids[(start + step) % n]
            if other == call_id or not self.data.stage_count(other):
                continue
            if self.kind(other) is None:
                fallback = other
                break
            fallback = fallback or other
        if fallback is None:
            return None
        donor_ids = self.data.stage_ids_for(fallback)
        return donor_ids[rng.randrange(len(donor_ids))]

    def invalid_next(self, call_id: str, base: str, size: int) -> str:
        template = self._rng(call_id, "next").choice(INVALID_NEXT_TEMPLATES)
        query = urlencode({"cursor": _encode_cursor(size), "pageSize": str(size)})
        return template.format(base=base, path=f"/api/calls/{quote(call_id)}/stages", query=query)

    def not_gzip(self, call_id: str, page: bytes) -> bytes:
        return _not_gzip(self._rng(call_id, "gzip"), page)

    def huge_stage_id(self, call_id: str, k: int) -> str:
        return _uuid(self._rng(call_id, f"huge:{k}:id"))

    def huge_stage(self, call_id: str, k: int) -> dict[str, Any]:
        """Stage k of a huge_pages call: built on request, never kept."""
        created_at = self.data.created_of(call_id)
        prompt = _long_prose(self._rng(call_id, f"huge:{k}"), HUGE_PAGE_BYTES, 64_000)
        created = (created_at + timedelta(seconds=k + 1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        tokens = len(prompt) // 4
        return {
            "callId": call_id, "callStageId": self.huge_stage_id(call_id, k), "created": created, "errorCount": 0,
            "experimentalSettings": None, "initialState": {}, "initialTokenCount": tokens, "languageHint": "en",
            "latestTokenCount": tokens + 120, "model": "fixie-ai/ultravox", "systemPrompt": prompt, "temperature": 0.4,
            "timeExceededMessage": None, "voice": "Mark",
        }


def planted_secrets(data: SyntheticData, options: SandboxOptions) -> set[str]:
    """Every planted secret a sandbox with these options serves (each starts with
    PLANTED_SECRET_PREFIX): none may reach an exporter's output."""
    hostile = _Hostile(data, options)
    return {m for cid, kind in hostile.picked().items() if kind == "secret_shapes" for m in hostile.planted(cid)}


class SandboxApp:
    """Turns (target, headers) into a :class:`Reply`; a transport only delivers it.

    ``httpx.Client(transport=httpx.MockTransport(SandboxApp(data).handler))`` talks to it
    with no socket; :class:`~pipeline.sandbox.server.Sandbox` serves it on loopback.
    """

    def __init__(self, data: SyntheticData, options: SandboxOptions | None = None,
                 stats: SandboxStats | None = None) -> None:
        options = options or SandboxOptions()
        unknown = set(options.faults) - FAULT_KINDS
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        self.data = data
        self.options = options
        self.stats = stats or SandboxStats()
        self._bucket = _TokenBucket(options.rate_limit_rps) if options.rate_limit_rps else None
        self._attempts: dict[str, int] = {}
        self._attempts_lock = threading.Lock()
        self._pages = LRUCache(8192, PAGE_CACHE_BYTES)
        self._listings = LRUCache(64)
        self.hostile = _Hostile(data, options)

    def answer(self, target: str, headers: dict[str, str], origin: str) -> Reply:
        """``respond`` as a server sees it: a bug or a raising page_hook becomes a 500, and
        the status is counted before the reply is delivered (so a client that has read it
        always sees it counted). ``headers`` have lower-case names."""
        try:
            reply = self.respond(target, headers, origin)
        except Exception:
            reply = _json_reply(500, {"detail": "A server error occurred."})
        self.stats.answered(0 if reply.mode == "reset" else reply.status)
        return reply

    def handler(self, request: httpx.Request) -> httpx.Response:
        """An ``httpx.MockTransport`` handler (sync and async clients). Socket-level
        replies are emulated: ``reset`` raises ``httpx.ReadError``, ``truncated`` raises
        ``httpx.RemoteProtocolError`` after half the body, ``slow`` sleeps between bytes."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.stats.begin(headers)
        try:
            origin = f"{request.url.scheme}://{request.url.netloc.decode('ascii')}"
            reply = self.answer(request.url.raw_path.decode("ascii"), headers, origin)
        finally:
            self.stats.end()
        if reply.mode == "reset":
            raise httpx.ReadError("connection reset by peer", request=request)
        return httpx.Response(reply.status, headers=reply.head_fields(), stream=ReplyStream(reply), request=request)

    def hostile_kind(self, call_id: str) -> str | None:
        """The hostile kind this sandbox gives the call, or None for a normal call."""
        return self.hostile.kind(call_id)

    def hostile_calls(self) -> dict[str, str]:
        """Every misbehaving call id → its kind (explicit ones and those picked by share)."""
        return self.hostile.picked()

    def served_stages(self, call_id: str) -> list[dict[str, Any]]:
        """The call's stages as this sandbox serves them, hostile changes included (a
        lone surrogate is the str "\\ud800"). Transport kinds serve ``stages_for``;
        huge_pages calls have no such list (use :meth:`served_stage_ids`)."""
        kind = self.hostile_kind(call_id)
        if kind == "huge_pages":
            raise ValueError("a huge_pages call is about 800 MB of stages: use served_stage_ids")
        return self.hostile.served_stages(call_id, kind)

    def served_stage_ids(self, call_id: str) -> list[str]:
        """The ``callStageId`` values served for the call, in order."""
        if self.hostile_kind(call_id) == "huge_pages":
            return [self.hostile.huge_stage_id(call_id, k) for k in range(HUGE_PAGES)]
        return [stage["callStageId"] for stage in self.served_stages(call_id)]

    def respond(self, target: str, headers: dict[str, str], origin: str) -> Reply:
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
        kind = None
        if route == "stages":
            self.stats.count_stage_request()
            kind = self.hostile.kind(parts[2])
        denied = self._check_auth(headers, echo=kind == "echo_key")
        if denied is not None:
            return denied
        fault = self._fault(target)
        if fault is not None:
            return fault
        base = (self.options.next_base_url or origin).rstrip("/")
        if route == "stages":
            return self._stages(parts[2], query, base, kind, headers)
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

    def _check_auth(self, headers: dict[str, str], echo: bool = False) -> Reply | None:
        # DRF style: 401 when no credentials at all, 403 when they are wrong.
        expected = self.options.api_key
        if expected is None:
            return None
        given = headers.get("x-api-key")
        if not given:
            detail = "Authentication credentials were not provided."
            if echo:  # echo_key: repeats whatever credential it did get
                detail += f" Received X-API-Key {given!r}, Authorization {headers.get('authorization')!r}."
            return _json_reply(401, {"detail": detail})
        if given != expected:
            return _json_reply(403, {"detail": f"Invalid API key {given}." if echo else "Invalid API key."})
        return None

    def _fault(self, target: str) -> Reply | None:
        """Deterministic per (fault_seed, URL, attempt number), whatever the arrival order."""
        if self.options.fault_rate <= 0 or not self.options.faults:
            return None
        with self._attempts_lock:
            attempt = self._attempts.get(target, 0)
            self._attempts[target] = attempt + 1
        rng = random.Random(f"{self.options.fault_seed}:{target}:{attempt}")
        if rng.random() >= self.options.fault_rate:
            return None
        return self._fault_reply(rng.choice(self.options.faults), attempt)

    def _fault_reply(self, kind: str, attempt: int = 0) -> Reply:
        retry = {"Retry-After": self.options.retry_after} if self.options.retry_after is not None else {}
        if kind == "429":
            return _json_reply(429, {"detail": "Request was throttled."}, retry)
        if kind == "503":
            return _json_reply(503, {"detail": "Service temporarily unavailable."}, retry)
        if kind == "500":
            return _json_reply(500, {"detail": "A server error occurred."})
        if kind in ("502", "504"):  # gateways answer with HTML, not JSON
            html = f"<html><body><h1>{kind} Gateway error</h1></body></html>".encode()
            return Reply(int(kind), html, {"Content-Type": "text/html"})
        if kind == "reset":
            return Reply(0, mode="reset")
        body = json.dumps({"next": None, "previous": None, "results": [{"callId": "x"}] * 20, "total": 20}).encode()
        if kind == "truncated":
            return Reply(200, body, mode="truncated")
        # invalid_json: a proxy's error page spliced in; its request id differs on every attempt.
        return Reply(200, b'{"next": null, "results": [{"callId": <!-- proxy error, request %d -->' % attempt)

    def _page_params(self, query: dict[str, str]) -> tuple[int, int] | Reply:
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

    def _stages(self, call_id: str, query: dict[str, str], base: str, kind: str | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        if call_id in self.options.always_fail:
            return _json_reply(500, {"detail": "A server error occurred."})
        if not self.data.has_call(call_id):  # unknown, deleted or malformed id
            return _not_found()
        params = self._page_params(query)
        if isinstance(params, Reply):
            return params
        offset, size = params
        if kind is not None:
            return self._hostile_stages(kind, call_id, offset, size, base, headers or {})
        hook = self.options.page_hook
        key = (call_id, offset, size, base)
        if hook is None:
            cached = self._pages.get(key)
            if cached is not None:
                return Reply(200, cached)
        stages = self.data.shared_stages(call_id)
        following, previous = self._links(f"{base}/api/calls/{quote(call_id)}/stages", {}, offset, size, len(stages))
        body = {"next": following, "previous": previous, "results": stages[offset : offset + size], "total": len(stages)}
        if hook is None:
            payload = json.dumps(body, ensure_ascii=False).encode()
            self._pages.put(key, payload)
            return Reply(200, payload)
        return self._apply_hook(hook, call_id, offset // size, json.loads(json.dumps(body)))

    def _hostile_stages(self, kind: str, call_id: str, offset: int, size: int, base: str,
                        headers: dict[str, str]) -> Reply:
        """A hostile call's page (page_hook is not consulted for these calls)."""
        if kind == "echo_key":
            return _json_reply(500, {"detail": f"Invalid request for key {headers.get('x-api-key', '')}"})
        if kind == "deep_nesting":
            return Reply(200, _deep_nesting_body())
        path = f"{base}/api/calls/{quote(call_id)}/stages"
        if kind == "huge_pages":  # one ~2 MB stage per page, whatever pageSize asked for
            following, previous = self._links(path, {}, offset, 1, HUGE_PAGES)
            results = [self.hostile.huge_stage(call_id, offset)] if offset < HUGE_PAGES else []
            page = {"next": following, "previous": previous, "results": results, "total": HUGE_PAGES}
            return Reply(200, _encode_hostile(page))
        stages = self.hostile.served_stages(call_id, kind)
        following, previous = self._links(path, {}, offset, size, len(stages))
        if kind == "invalid_next" and offset == 0:
            following = self.hostile.invalid_next(call_id, base, size)
        body = _encode_hostile({"next": following, "previous": previous, "results": stages[offset : offset + size],
                                "total": len(stages)})
        if kind == "corrupt_gzip":
            return Reply(200, self.hostile.not_gzip(call_id, body), {"Content-Encoding": "gzip"})
        if kind == "slow_body":
            return Reply(200, body, mode="slow", pace=self.options.slow_body_interval)
        return Reply(200, body)

    @staticmethod
    def _apply_hook(hook: PageHook, call_id: str, page_index: int, body: dict[str, Any]) -> Reply:
        result = hook(call_id, page_index, body)  # gets a private copy: free to mutate
        if result is None:
            return _json_reply(200, body)
        if isinstance(result, dict):
            return _json_reply(200, result)
        if isinstance(result, bytes):
            return Reply(200, result)
        if isinstance(result, tuple) and len(result) == 3:
            status, headers, raw = result
            return Reply(int(status), bytes(raw), dict(headers or {}))
        raise TypeError(f"page_hook returned {type(result).__name__}")

    def _calls(self, query: dict[str, str], base: str) -> Reply:
        params = self._page_params(query)
        if isinstance(params, Reply):
            return params
        offset, size = params
        keep = {k: query[k] for k in ("fromDate", "toDate", "sort") if k in query}
        listing = self._call_listing(keep)
        if isinstance(listing, Reply):
            return listing
        following, previous = self._links(f"{base}/api/calls", keep, offset, size, len(listing))
        results = [self._listed_call(i) for i in listing[offset : offset + size]]
        return _json_reply(200, {"next": following, "previous": previous, "results": results, "total": len(listing)})

    def _listed_call(self, index: int) -> dict[str, Any]:
        call_id = self.data.call_ids[index]
        call = self.data.call_for(call_id)
        if self.hostile.plants_listing and self.hostile.kind(call_id) == "secret_shapes":
            call["externalVoice"] = _listed_secret_voice(index)
        return call

    def _call_listing(self, keep: dict[str, str]) -> list[int] | Reply:
        key = (tuple(sorted(keep.items())), self.data.listed_before)  # tests move listed_before between runs
        cached = self._listings.get(key)
        if cached is not None:
            return cached
        by_created = self.data.calls_by_created()
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

    def _deleted(self, query: dict[str, str], base: str) -> Reply:
        params = self._page_params(query)
        if isinstance(params, Reply):
            return params
        offset, size = params
        ids = self.data.deleted_call_ids
        following, previous = self._links(f"{base}/api/deleted_calls", {}, offset, size, len(ids))
        results = [{"callId": cid, "deleted": self.data.deleted_at(cid)} for cid in ids[offset : offset + size]]
        return _json_reply(200, {"next": following, "previous": previous, "results": results, "total": len(ids)})

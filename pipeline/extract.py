"""Extract: page ``GET /api/calls/{id}/stages`` for many calls at once, with retries.

Flow control, outermost first:

* ``settings.concurrency`` worker tasks each take the next call ID and page it.
* :class:`RateLimiter` spaces requests to at most ``max_rps`` per second (Ultravox
  allows 200/s per key; the default stays below it).
* :class:`AdaptiveLimit` bounds requests in flight, AIMD-style: it grows by one per
  success until the first 429 (slow start), then by one per window of successes, and
  halves on a 429 (at most once per cool-down, never below 1).
* Each request is retried by tenacity under the one policy in :mod:`pipeline.http`.

401/403 stops everything at once: no new request is started after it is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import tenacity

from pipeline.config import Settings
from pipeline.errors import (
    AuthError,
    CallError,
    OriginError,
    StagesError,
    PaginationError,
    TransientError,
    UnreachableError,
)
from pipeline.http import (
    WaitPolicy,
    build_client,
    check_base_url,
    classify,
    decode_json,
    describe,
    is_transient,
    origin,
    read_body,
    safe_url,
)
from pipeline.records import CallFetch, utcnow


CONNECTIONS_PER_CLIENT = 4


class RunAborted(Exception):
    """Raised inside workers once the run is stopping (auth failure)."""


class RateLimiter:
    """Token bucket with a small burst: start times spaced 1/rps apart."""

    def __init__(self, rps: float, burst: int = 8):
        self.interval = 1.0 / rps
        self.burst = burst
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            start = max(self._next, now - self.burst * self.interval)
            self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


class AdaptiveLimit:
    """AIMD bound on requests in flight (see module docstring)."""

    def __init__(self, maximum: int, initial: int = 4, cooldown_seconds: float = 1.0):
        self.maximum = maximum
        self.limit = min(initial, maximum)
        self.cooldown = cooldown_seconds
        self.in_flight = 0
        self.peak = 0
        self.cuts = 0
        self._slow_start = True
        self._successes = 0
        self._last_cut = -1e9
        self._cond = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    async def release(self, throttled: bool) -> None:
        async with self._cond:
            self.in_flight -= 1
            if throttled:
                self._slow_start = False
                now = time.monotonic()
                if now - self._last_cut >= self.cooldown:
                    self.limit = max(1, self.limit // 2)
                    self._last_cut = now
                    self._successes = 0
                    self.cuts += 1
            else:
                self._successes += 1
                if self._slow_start or self._successes >= self.limit:
                    self.limit = min(self.maximum, self.limit + 1)
                    self._successes = 0
            self._cond.notify_all()


class RetryBudgetSpent(tenacity.stop.stop_base):
    """Stop retrying once the call has used its retry budget (over all its pages)."""

    def __init__(self, fetch: CallFetch, budget: int):
        self.fetch = fetch
        self.budget = budget

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.fetch.retries >= self.budget


@dataclass
class ExtractStats:
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    answered: int = 0  # responses received at all (any status)


@dataclass
class Extractor:
    settings: Settings
    clients: list[httpx.AsyncClient]
    base_url: httpx.URL
    stats: ExtractStats = field(default_factory=ExtractStats)
    stopping: bool = False

    def __post_init__(self) -> None:
        self.origin = origin(self.base_url)
        self.rate = RateLimiter(self.settings.max_rps)
        self.limit = AdaptiveLimit(self.settings.concurrency)
        self._turn = 0

    def _client(self) -> httpx.AsyncClient:
        self._turn += 1
        return self.clients[self._turn % len(self.clients)]

    def first_page_url(self, call_id: str) -> str:
        base = str(self.base_url).rstrip("/")
        return f"{base}/api/calls/{call_id}/stages?pageSize={self.settings.page_size}"

    async def _request(self, url: str, fetch: CallFetch) -> tuple[str, Any]:
        if self.stopping:
            raise RunAborted()
        await self.rate.acquire()
        await self.limit.acquire()
        throttled = False
        try:
            if self.stopping:
                raise RunAborted()
            self.stats.requests += 1
            fetch.requests += 1
            async with self._client().stream("GET", url) as response:
                self.stats.answered += 1
                body = await read_body(response, self.settings.max_response_bytes)
            kind = classify(response.status_code, response.headers, body, url, self.settings)
            if kind == "not_found":
                return kind, None
            return kind, decode_json(body)
        except TransientError as exc:
            throttled = exc.status == 429
            self.stats.throttled += throttled
            raise
        except AuthError:
            self.stopping = True
            raise
        finally:
            await self.limit.release(throttled)

    async def get_page(self, url: str, fetch: CallFetch) -> tuple[str, Any]:
        def count_retry(_: tenacity.RetryCallState) -> None:
            fetch.retries += 1
            self.stats.retries += 1

        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_any(
                tenacity.stop_after_attempt(self.settings.max_attempts),
                RetryBudgetSpent(fetch, self.settings.call_retry_budget),
            ),
            wait=WaitPolicy(self.settings),
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=count_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._request(url, fetch)
        raise AssertionError("unreachable")  # pragma: no cover

    async def fetch_call(self, call_id: str) -> CallFetch:
        """Page one call. Call-level problems become a ``failed`` CallFetch."""
        fetch = CallFetch(call_id, "loaded")
        try:
            await self._page_through(fetch)
        except (CallError, httpx.TransportError) as exc:
            if isinstance(exc, httpx.ConnectError) and self.stats.answered == 0:
                self.stopping = True
                raise UnreachableError(
                    f"cannot reach the API at {safe_url(self.base_url)} ({describe(exc)}); "
                    "check --base-url and the network"
                ) from None
            fetch.status, fetch.error = "failed", describe(exc)
            fetch.pages, fetch.page_urls = [], []
        fetch.fetched_at = utcnow()
        return fetch

    async def _page_through(self, fetch: CallFetch) -> None:
        url: str | None = self.first_page_url(fetch.call_id)
        seen: set[str] = set()
        rows = 0
        while url is not None:
            if len(fetch.pages) >= self.settings.max_pages:
                raise PaginationError(f"more than {self.settings.max_pages} pages (max_pages); stopped paging")
            kind, page = await self.get_page(url, fetch)
            if kind == "not_found":
                if fetch.pages:
                    raise CallError(f"page {len(fetch.pages) + 1} answered 404 while paging")
                fetch.status = "not_found"
                return
            if not isinstance(page, dict) or not isinstance(page.get("results"), list):
                raise PaginationError("unexpected page shape: 'results' is not a list")
            fetch.pages.append(page)
            fetch.page_urls.append(url)
            rows += len(page["results"])
            url = self._next_url(url, page.get("next"), seen)
        total = fetch.pages[-1].get("total") if fetch.pages else None
        if isinstance(total, int) and total != rows:
            fetch.total_mismatch = (total, rows)

    async def list_all(self, path: str, params: dict[str, str]) -> list[Any]:
        """Every item of a paginated list endpoint (``/api/calls``, ``/api/deleted_calls``)
        under the same retries and guards (origin, cursor loop, page cap) as stages."""
        accounting = CallFetch(path, "loaded")
        query = urllib.parse.urlencode(params | {"pageSize": str(self.settings.page_size)})
        url: str | None = f"{str(self.base_url).rstrip('/')}{path}?{query}"
        seen: set[str] = set()
        items: list[Any] = []
        pages = 0
        while url is not None:
            if pages >= self.settings.max_pages:
                raise PaginationError(f"more than {self.settings.max_pages} pages (max_pages); stopped paging")
            kind, page = await self.get_page(url, accounting)
            if kind == "not_found":
                raise CallError(f"{path} answered 404")
            if not isinstance(page, dict) or not isinstance(page.get("results"), list):
                raise PaginationError("unexpected page shape: 'results' is not a list")
            pages += 1
            items.extend(page["results"])
            url = self._next_url(url, page.get("next"), seen)
        return items

    def _next_url(self, current: str, next_link: object, seen: set[str]) -> str | None:
        # Paging ends on null, a missing key or "" (seen from some DRF setups).
        if next_link is None or next_link == "":
            return None
        if not isinstance(next_link, str):
            raise PaginationError("unexpected page shape: 'next' is not a string")
        # `next` is followed exactly as given (joined only if it were relative).
        target = httpx.URL(current).join(next_link)
        if origin(target) != self.origin:
            raise OriginError(
                f"next link points to another host ({target.host}); not followed, API key not sent"
            )
        cursor = target.params.get("cursor") or str(target)
        if cursor in seen or str(target) == current:
            raise PaginationError("next link repeats a cursor already seen for this call; stopped paging")
        seen.add(cursor)
        return str(target)


async def list_endpoint(
    settings: Settings,
    api_key: str | None,
    path: str,
    params: dict[str, str],
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[list[Any], ExtractStats]:
    """All items of one list endpoint; a failure after retries is a run-level error."""
    base_url = check_base_url(settings.base_url, settings.allow_insecure_http)
    async with build_client(settings, api_key, transport) as client:
        extractor = Extractor(settings, [client], base_url)
        try:
            return await extractor.list_all(path, params), extractor.stats
        except (CallError, httpx.TransportError) as exc:
            if isinstance(exc, httpx.ConnectError) and extractor.stats.answered == 0:
                raise UnreachableError(
                    f"cannot reach the API at {safe_url(base_url)} ({describe(exc)}); check --base-url and the network"
                ) from None
            raise StagesError(f"listing {path} failed: {describe(exc)}; nothing was exported, run again") from None


async def extract_calls(
    call_ids: Iterable[str],
    settings: Settings,
    api_key: str | None,
    sink: Callable[[CallFetch], Awaitable[None]],
    extractor_ready: Callable[[Extractor], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ExtractStats:
    """Fetch every call, handing each finished CallFetch to ``sink`` (in completion order)."""
    base_url = check_base_url(settings.base_url, settings.allow_insecure_http)
    pending = iter(call_ids)
    # Several small connection pools instead of one big one: httpx's pool bookkeeping
    # grows with its connection count, and with 32–64 requests in flight one shared
    # pool was several times slower on 2 cores (PERFORMANCE.md; measured in bench/).
    shards = max(1, settings.concurrency // CONNECTIONS_PER_CLIENT)
    per_client = -(-settings.concurrency // shards)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(build_client(settings, api_key, transport, per_client))
            for _ in range(shards)
        ]
        extractor = Extractor(settings, clients, base_url)
        if extractor_ready:
            extractor_ready(extractor)

        async def worker() -> None:
            for call_id in pending:
                if extractor.stopping:
                    return
                try:
                    fetch = await extractor.fetch_call(call_id)
                except RunAborted:
                    return
                await sink(fetch)

        workers = [asyncio.create_task(worker()) for _ in range(settings.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return extractor.stats

"""Extract: page ``GET /api/calls/{id}/stages`` for many calls at once, with retries.

Flow control, outermost first:

* ``settings.concurrency`` worker tasks each take the next call ID and page it.
* :class:`InFlightLimit` bounds requests in flight: a slow start from 4 to
  ``concurrency``.
* :class:`AdaptiveRate` paces request starts: at most ``max_rps`` per second (a hard
  cap; Ultravox allows 200/s per key), and below the server's own rate limit once a
  429 shows where it is (rate-based AIMD, Retry-After honoured).
* Each request is retried by tenacity under the one policy in :mod:`pipeline.http`.

401/403 stops everything at once: no new request is started after it is seen.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.parse
from collections import deque
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
    ApiSession,
    WaitPolicy,
    classify,
    decode_json,
    describe,
    is_transient,
    origin,
    read_body,
    safe_url,
)
from pipeline.records import CallFetch, utcnow



class RunAborted(Exception):
    """Raised inside workers once the run is stopping (auth failure)."""


@dataclass
class _Check:
    """A 429 being checked: is it the server's limit, or a lone one?"""

    started: float
    rate_before: float
    overrun: float  # answers per second just before it: the pace that met the 429
    retry_after: float | None
    answers: int = 1
    throttled: int = 1


class AdaptiveRate:
    """Requests started per second: a token bucket whose rate follows the server's rate
    limit (rate-based AIMD), never above ``cap`` (--max-rps, a hard user cap).

    The server limits a *rate* (Ultravox: 200 requests/s per key) and, like most rate
    limiters, first lets a burst through (up to a second's worth), so the client paces
    its request starts and adapts that pace to what the server admits. Rates are
    measured over the last second, but never from before the last decrease.

    * The rate starts at the cap; the in-flight limit does the slow start.
    * A decrease sets the rate to ``backoff`` × the rate at which the server admitted
      requests (answered anything but 429), or × the current rate if that is lower,
      and ``ref`` to the level it came from. A 429 to a request started before the
      last decrease (or check) says nothing new and changes nothing.
    * A 429 at or above ``ref`` is the limit again: decrease at once. So is a 429 when
      at least ``SUSTAINED`` answers, and ≥ ``SUSTAINED_SHARE`` of them, were 429.
    * Any other 429 (the first one, or one below the known limit) is checked: the rate
      halves at once while up to ``CHECK`` more answers come in. Overrunning a server's
      burst shows up as a wave of 429s from the requests already in flight; halving
      stops feeding it. If ≥ ``BURST_SHARE`` of those answers are 429, it was the
      limit: the halved rate stays and becomes ``ref``, and grows back quickly towards
      the pace that met the limit (halving the gap every ``REGROW_HALF_LIFE``) until
      the next 429 measures the server properly. Otherwise it was a lone 429 (a proxy,
      a blip, a fault) and the rate goes back to what it was: isolated 429s never
      compound into a crawl.
    * After a decrease, once the 429's Retry-After has passed (the throttled request
      itself waits it, under the retry policy), the rate grows by ``probe`` × its new
      value per second (additive increase): it settles just under the limit with an
      occasional 429, and follows the limit up if it rises.

    Everything takes time from ``clock`` (tests inject a fake one).
    """

    WINDOW = 1.0
    CHECK = 10
    BURST_SHARE = 0.3
    SUSTAINED, SUSTAINED_SHARE = 5, 0.1
    MIN_ADMITTED = 4  # admitted answers needed to measure the server's rate
    REGROW_HALF_LIFE = 2.0  # seconds to halve the gap to the pace that overran a burst

    def __init__(
        self,
        cap: float,
        *,
        backoff: float = 0.9,
        probe: float = 0.05,
        floor: float = 1.0,
        burst: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cap = cap
        self.rate = cap
        self.ref = math.inf
        self.backoff = backoff
        self.probe = probe
        self.floor = min(floor, cap)
        self.burst = burst
        self.clock = clock
        self.cuts = 0  # decreases (a check that finds a lone 429 is not one)
        self._last_start = -math.inf  # of the last request (the token bucket as a schedule)
        self._answers: deque[tuple[float, bool]] = deque()  # (time, was 429) within WINDOW
        self._first: float | None = None  # first request start
        self._last_cut = -math.inf  # last decrease or check start
        self._measured_from = -math.inf  # last decrease
        self._check: _Check | None = None
        self._step = 0.0  # additive increase, requests/s per second
        self._aim = 0.0  # fast regrowth towards this rate after a burst was overrun
        self._hold_until = -math.inf
        self._grown_at = -math.inf

    # -- pacing

    def wait_time(self) -> float:
        """Seconds until the next request may start; 0 means one starts now (and is
        counted). Nothing is booked ahead, so a decrease also slows requests that are
        already waiting."""
        now = self.clock()
        if self._first is None:
            self._first = now
        self._grow(now)
        interval = 1.0 / self.rate
        start = max(self._last_start + interval, now - self.burst * interval)
        if start > now + 1e-9:
            return start - now
        self._last_start = start
        return 0.0

    async def acquire(self) -> None:
        while (delay := self.wait_time()) > 0:
            await asyncio.sleep(delay)

    # -- feedback

    def admitted(self) -> None:
        """An answer other than 429 arrived."""
        self._answer(self.clock(), False)

    def throttled(self, started_at: float, retry_after: float | None = None) -> None:
        """A 429 arrived for a request started at ``started_at`` (same clock)."""
        now = self.clock()
        self._answer(now, True)
        if started_at < self._last_cut or self._check is not None:
            return  # in flight at the last decrease, or counted by the running check
        self._grow(now)
        admitted, limited, span = self._window(now)
        answers = admitted + limited
        if self.rate >= self.ref or (limited >= self.SUSTAINED and limited >= self.SUSTAINED_SHARE * answers):
            server = admitted / span if admitted >= self.MIN_ADMITTED else self.rate
            self._decrease(now, self.backoff * min(self.rate, server), retry_after)
            return
        overrun = answers / span if span > 0 else self.rate
        self._check = _Check(now, self.rate, overrun, retry_after)
        self._set_rate(now, 0.5 * min(self.rate, overrun))

    def _answer(self, now: float, throttled: bool) -> None:
        self._answers.append((now, throttled))
        while self._answers[0][0] < now - self.WINDOW:
            self._answers.popleft()
        check = self._check
        if check is None:
            return
        check.answers += 1
        check.throttled += throttled
        # Settled as soon as the outcome is certain: enough 429s, or too many answers.
        needed = math.ceil(self.BURST_SHARE * (self.CHECK + 1))
        burst = check.throttled >= needed
        if not burst and check.answers - check.throttled <= self.CHECK + 1 - needed:
            return
        self._check = None
        if burst:
            # The halved rate stays and becomes the known limit (a 429 at or above it
            # is measured at once); the rate regrows towards the pace that overran.
            self._decrease(now, self.rate, check.retry_after, aim=check.overrun, ref=self.rate)
        else:
            self.rate = check.rate_before  # a lone 429: not the limit

    def _window(self, now: float) -> tuple[int, int, float]:
        """Admitted answers, 429s and the span they cover: the last WINDOW, but not
        from before the first request or the last decrease."""
        first = self._first if self._first is not None else now
        since = max(now - self.WINDOW, self._measured_from, first)
        admitted = limited = 0
        for at, throttled in reversed(self._answers):
            if at < since:
                break
            limited += throttled
            admitted += not throttled
        return admitted, limited, now - since

    def _decrease(
        self, now: float, rate: float, retry_after: float | None, aim: float = 0.0, ref: float | None = None
    ) -> None:
        self._set_rate(now, rate)
        self.ref = self.rate / self.backoff if ref is None else ref
        self._step = max(self.probe * self.rate, 0.1)
        self._aim = aim
        self._measured_from = now
        self._hold_until = now + (retry_after or 0.0)
        self._grown_at = now
        self.cuts += 1

    def _set_rate(self, now: float, rate: float) -> None:
        self.rate = min(self.cap, max(self.floor, rate))
        self._last_cut = now
        self._last_start = max(self._last_start, now - 1.0 / self.rate)  # no saved-up burst

    def _grow(self, now: float) -> None:
        if self._step == 0.0 or self._check is not None or self.rate >= self.cap:
            return
        begin = max(self._grown_at, self._hold_until)
        if now <= begin:
            return
        grown = self.rate + self._step * (now - begin)
        if self.rate < self._aim:
            gap = (self._aim - self.rate) * 0.5 ** ((now - begin) / self.REGROW_HALF_LIFE)
            grown = max(grown, self._aim - gap)
        self.rate = min(self.cap, grown)
        self._grown_at = now


class InFlightLimit:
    """Requests in flight at most: ``maximum`` (--concurrency), reached by a slow start
    from ``initial``, one more per finished request, so connections are opened a few at
    a time rather than all at once. Throttling is the rate's business (AdaptiveRate):
    halving the requests in flight on a 429 as well bought nothing under a rate limit,
    and under a lone 429 it would cut a high-latency run's throughput for seconds."""

    def __init__(self, maximum: int, initial: int = 4):
        self.maximum = maximum
        self.limit = min(initial, maximum)
        self.in_flight = 0
        self.peak = 0
        self._slots = asyncio.Semaphore(self.limit)

    async def acquire(self) -> None:
        await self._slots.acquire()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self._slots.release()
        if self.limit < self.maximum:
            self.limit += 1
            self._slots.release()


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
    session: ApiSession
    stats: ExtractStats = field(default_factory=ExtractStats)
    stopping: bool = False

    def __post_init__(self) -> None:
        self.base_url = self.session.base_url
        self.origin = origin(self.base_url)
        self.rate = AdaptiveRate(self.settings.max_rps)
        self.limit = InFlightLimit(self.settings.concurrency)

    def first_page_url(self, call_id: str) -> str:
        base = str(self.base_url).rstrip("/")
        return f"{base}/api/calls/{call_id}/stages?pageSize={self.settings.page_size}"

    async def _request(self, url: str, fetch: CallFetch) -> tuple[str, Any]:
        if self.stopping:
            raise RunAborted()
        # The in-flight slot first, the rate last: a request let through by the rate
        # must start then, not wait for a slot and go out later in a bunch.
        await self.limit.acquire()
        try:
            await self.rate.acquire()
        except BaseException:
            self.limit.release()
            raise
        throttled = False
        answered = False
        started = self.rate.clock()
        try:
            if self.stopping:
                raise RunAborted()
            self.stats.requests += 1
            fetch.requests += 1
            async with self.session.stream(url) as response:
                self.stats.answered += 1
                answered = True
                body = await read_body(response, self.settings.max_response_bytes)
            kind = classify(response.status_code, response.headers, body, url, self.settings)
            if kind == "not_found":
                return kind, None
            return kind, decode_json(body)
        except TransientError as exc:
            throttled = exc.status == 429
            if throttled:
                self.stats.throttled += 1
                self.rate.throttled(started, exc.retry_after)
            raise
        except AuthError:
            self.stopping = True
            raise
        finally:
            if answered and not throttled:
                self.rate.admitted()
            self.limit.release()

    async def get_page(self, url: str, fetch: CallFetch) -> tuple[str, Any]:
        # Most pages succeed at once: tenacity (the one retry policy) takes over only
        # from a first failure it would retry, which it then sees as its first attempt.
        try:
            return await self._request(url, fetch)
        except Exception as exc:  # noqa: BLE001 - re-raised below, or by tenacity
            if not is_transient(exc):
                raise
            first_failure: Exception | None = exc

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
                if first_failure is not None:
                    failure, first_failure = first_failure, None
                    raise failure
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
    async with ApiSession(settings, api_key, transport=transport) as session:
        extractor = Extractor(settings, session)
        try:
            return await extractor.list_all(path, params), extractor.stats
        except (CallError, httpx.TransportError) as exc:
            if isinstance(exc, httpx.ConnectError) and extractor.stats.answered == 0:
                raise UnreachableError(
                    f"cannot reach the API at {safe_url(session.base_url)} ({describe(exc)}); "
                    "check --base-url and the network"
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
    pending = iter(call_ids)
    # A connection pool per request in flight (see ApiSession).
    async with ApiSession(settings, api_key, pools=settings.concurrency, transport=transport) as session:
        extractor = Extractor(settings, session)
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

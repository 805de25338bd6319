"""Extract: page ``GET /api/calls/{id}/stages`` for many calls at once, with retries.

Flow control, outermost first:

* ``settings.concurrency`` worker tasks each take the next call ID and page it.
* :class:`~pipeline.rate.InFlightLimit` bounds requests in flight: a slow start from 4
  to ``concurrency``.
* :class:`~pipeline.rate.AdaptiveRate` paces request starts: at most ``max_rps`` per
  second (a hard cap), and below the server's own rate limit once a 429 shows where it is.
* Each request is retried by tenacity under the one policy in :mod:`pipeline.http`;
  pages are followed by :class:`~pipeline.pagination.NextLinkPaginator`.

401/403 stops everything at once: no new request is started after it is seen. So does
an outage: ``outage_calls`` calls in a row failing on connection errors, timeouts or
5xx (after their retries) stop the run, and the calls not finished are left untouched.

Whatever goes wrong with one call (a hostile body, an invalid ``next`` link, an
exception nobody foresaw) fails that call alone: :meth:`Extractor.fetch_call` is the
one boundary.
"""

from __future__ import annotations

from collections import Counter

import asyncio
import contextlib
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import tenacity

from pipeline.config import Settings
from pipeline.errors import AuthError, CallError, StagesError, TransientError, UnreachableError
from pipeline.http import (
    DeadlineExceeded,
    InvalidJSONError,
    WaitPolicy,
    api_client,
    check_base_url,
    classify,
    decode_json,
    describe,
    is_outage,
    is_transient,
    origin,
    safe_url,
)
from pipeline.pagination import NextLinkPaginator
from pipeline.rate import AdaptiveRate, InFlightLimit
from pipeline.records import CallFetch, ExtractStats, utcnow

#: Errors that end the run rather than the call: never turned into a failed call.
RUN_LEVEL = (AuthError, UnreachableError)


#: Attempts answered with the identical invalid JSON body before the call fails.
SAME_BAD_BODY_ATTEMPTS = 3


class RunAborted(Exception):
    """Raised inside workers once the run is stopping (auth failure, outage)."""


class RetryBudgetSpent(tenacity.stop.stop_base):
    """Stop retrying once the call has used its retry budget (over all its pages)."""

    def __init__(self, fetch: CallFetch, budget: int):
        self.fetch = fetch
        self.budget = budget

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.fetch.retries >= self.budget


@dataclass
class Extractor:
    settings: Settings
    client: httpx.AsyncClient
    stats: ExtractStats = field(default_factory=ExtractStats)
    stopping: bool = False

    def __post_init__(self) -> None:
        self.base_url = check_base_url(self.settings.base_url, self.settings.allow_insecure_http)
        self.origin = origin(self.base_url)
        self.rate = AdaptiveRate(self.settings.max_rps)
        self.limit = InFlightLimit(self.settings.concurrency)
        self._stopped = asyncio.Event()
        #: Calls in a row that failed on an outage (connection, timeout, 5xx), and the last reason.
        self.outage_streak = 0
        self.outage: str | None = None

    def stop(self) -> None:
        """No new request from now on; retries waiting for their backoff give up at once."""
        self.stopping = True
        self._stopped.set()

    async def _backoff(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    def first_page_url(self, call_id: str) -> str:
        base = str(self.base_url).rstrip("/")
        return f"{base}/api/calls/{call_id}/stages?pageSize={self.settings.page_size}"

    async def _request(self, url: str, fetch: CallFetch, pager: NextLinkPaginator) -> tuple[str, Any, int]:
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
            deadline = self.settings.request_deadline_seconds
            try:
                async with asyncio.timeout(deadline):
                    async with self.client.stream("GET", url) as response:
                        self.stats.answered += 1
                        answered = True
                        body = await pager.read(response, self.settings.max_response_bytes)
            except TimeoutError:
                raise DeadlineExceeded(f"request deadline exceeded ({deadline:g}s, request_deadline_seconds)") from None
            key_sent = "X-API-Key" in response.request.headers
            kind = classify(response.status_code, response.headers, body, url, self.settings, key_sent)
            if kind == "not_found":
                return kind, None, 0
            return kind, decode_json(body), len(body)
        except TransientError as exc:
            throttled = exc.status == 429
            if throttled:
                self.stats.throttled += 1
                self.rate.throttled(started, exc.retry_after)
            raise
        except AuthError:
            self.stop()
            raise
        finally:
            if answered and not throttled:
                self.rate.admitted()
            self.limit.release()

    async def get_page(self, fetch: CallFetch, pager: NextLinkPaginator) -> tuple[str, Any, int]:
        """The page at ``pager.url``: its kind ("ok", "not_found"), JSON and size, retried."""
        bad_bodies: Counter[str] = Counter()
        url = pager.url
        assert url is not None

        async def attempt() -> tuple[str, Any, int]:
            try:
                return await self._request(url, fetch, pager)
            except InvalidJSONError as exc:
                # The very same bytes failing again and again: the server's answer, not a cut stream.
                bad_bodies[exc.digest] += 1
                if bad_bodies[exc.digest] >= SAME_BAD_BODY_ATTEMPTS:
                    raise CallError(f"{exc} (the same body {SAME_BAD_BODY_ATTEMPTS} times)") from None
                raise

        # Most pages succeed at once: tenacity (the one retry policy) takes over only
        # from a first failure it would retry, which it then sees as its first attempt.
        try:
            return await attempt()
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
            sleep=self._backoff,
            reraise=True,
        )
        async for try_ in retrying:
            with try_:
                if first_failure is not None:
                    failure, first_failure = first_failure, None
                    raise failure
                return await attempt()
        raise AssertionError("unreachable")  # pragma: no cover

    async def fetch_call(self, call_id: str) -> CallFetch:
        """Page one call. Anything but a run-level error becomes a ``failed`` CallFetch."""
        fetch = CallFetch(call_id, "loaded")
        try:
            await self._page_through(fetch)
        except (*RUN_LEVEL, RunAborted):
            raise
        except Exception as exc:  # noqa: BLE001 - the one per-call failure boundary
            if isinstance(exc, httpx.ConnectError) and self.stats.answered == 0:
                self.stop()
                raise UnreachableError(
                    f"cannot reach the API at {safe_url(self.base_url)} ({describe(exc)}); "
                    "check --base-url and the network"
                ) from None
            fetch.status, fetch.error = "failed", describe(exc)
            fetch.pages, fetch.page_urls, fetch.nbytes = [], [], 0
            self._count_outage(exc)
        else:
            self.outage_streak = 0
        fetch.fetched_at = utcnow()
        return fetch

    def _count_outage(self, exc: Exception) -> None:
        if not is_outage(exc):
            self.outage_streak = 0
            return
        self.outage_streak += 1
        if self.outage_streak >= self.settings.outage_calls and self.outage is None:
            self.outage = describe(exc)
            self.stop()

    async def _page_through(self, fetch: CallFetch) -> None:
        settings = self.settings
        pager = NextLinkPaginator(
            self.first_page_url(fetch.call_id), self.origin, settings.max_pages, settings.max_call_bytes
        )
        rows = 0
        while pager.url is not None:
            url = pager.url
            kind, page, nbytes = await self.get_page(fetch, pager)
            if kind == "not_found":
                if pager.pages:
                    raise CallError(f"page {pager.pages + 1} answered 404 while paging")
                fetch.status = "not_found"
                return
            rows += len(pager.advance(page, nbytes))
            fetch.pages.append(page)
            fetch.page_urls.append(url)
        fetch.nbytes = pager.nbytes
        total = fetch.pages[-1].get("total") if fetch.pages else None
        if isinstance(total, int) and total != rows:
            fetch.total_mismatch = (total, rows)

    async def list_all(self, path: str, params: dict[str, str]) -> list[Any]:
        """Every item of a paginated list endpoint (``/api/calls``, ``/api/deleted_calls``)
        under the same retries and guards as stages (max_call_bytes aside: not one call)."""
        query = urllib.parse.urlencode(params | {"pageSize": str(self.settings.page_size)})
        first_url = f"{str(self.base_url).rstrip('/')}{path}?{query}"
        pager = NextLinkPaginator(first_url, self.origin, self.settings.max_pages)
        accounting = CallFetch(path, "loaded")
        items: list[Any] = []
        while not pager.finished:
            kind, page, nbytes = await self.get_page(accounting, pager)
            if kind == "not_found":
                raise CallError(f"{path} answered 404")
            items.extend(pager.advance(page, nbytes))
        return items


async def list_endpoint(
    settings: Settings,
    api_key: str | None,
    path: str,
    params: dict[str, str],
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[list[Any], ExtractStats]:
    """All items of one list endpoint; a failure after retries is a run-level error."""
    async with api_client(settings, api_key, transport) as client:
        extractor = Extractor(settings, client)
        try:
            return await extractor.list_all(path, params), extractor.stats
        except RUN_LEVEL:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the listing is one line
            if isinstance(exc, httpx.ConnectError) and extractor.stats.answered == 0:
                raise UnreachableError(
                    f"cannot reach the API at {safe_url(extractor.base_url)} ({describe(exc)}); "
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
    """Fetch every call, handing each finished CallFetch to ``sink`` (in completion order).

    Raises UnreachableError once the API stopped answering (``outage_calls`` failed
    calls in a row); the calls not finished by then are never handed to ``sink``."""
    pending = iter(call_ids)
    aborted = 0
    async with api_client(settings, api_key, transport) as client:
        extractor = Extractor(settings, client)
        if extractor_ready:
            extractor_ready(extractor)

        async def worker() -> None:
            nonlocal aborted
            while not extractor.stopping:
                call_id = next(pending, None)
                if call_id is None:
                    return
                try:
                    fetch = await extractor.fetch_call(call_id)
                except RunAborted:
                    aborted += 1
                    return
                await sink(fetch)

        workers = [asyncio.create_task(worker()) for _ in range(settings.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if extractor.outage is not None:
            left = aborted + sum(1 for _ in pending)
            raise UnreachableError(
                f"the API at {safe_url(extractor.base_url)} stopped answering ({extractor.outage}; "
                f"{settings.outage_calls} calls in a row failed); {left} calls were left for the next run"
            )
        return extractor.stats

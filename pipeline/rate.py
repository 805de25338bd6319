"""Flow control for extract: how many requests may be in flight, and how fast they start."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Check:
    """A 429 below the known limit being checked: the server's limit, or a lone one?"""

    rate_before: float
    retry_after: float | None
    answers: int = 1
    throttled: int = 1


#: Requests/s Ultravox documents per API key: the rate starts here (or at a lower cap).
KEY_LIMIT = 200.0


class AdaptiveRate:
    """Requests started per second: a token bucket whose rate follows the server's rate
    limit, never above ``cap`` (--max-rps, a hard user cap).

    Rate limiters (Ultravox: 200 requests/s per key) let a window's worth through at
    once, then admit requests at the limit; Retry-After says how long the window is.

    * The rate starts at ``start`` (the documented per-key limit) or the cap if lower;
      the in-flight limit does the slow start. Until the first 429 each answer raises
      it towards the cap, doubling it every ``ramp`` seconds at full pace: a server's
      burst then runs out at a pace not far above its limit, so few requests are in
      flight to be answered 429 (a fixed cost: those requests were sent before any
      answer could tell).
    * The first 429 measures the limit: the answers admitted since the first one,
      divided by that span plus the Retry-After window (the burst the server let
      through); a later 429 below the known limit uses the last second instead. With
      fewer than ``MIN_ADMITTED`` answers, half the rate. The rate drops at once to
      ``backoff`` × that.
      If fewer than ``BURST_SHARE`` of the next ``CHECK`` answers (those of the requests
      already in flight) are 429 too, it was a lone 429 (a proxy, a fault) and the rate
      goes back: isolated 429s never compound into a crawl.
    * A 429 at or above the known limit is the limit again: the rate drops to
      ``backoff`` × the rate the server admitted since the last decrease (its bucket was
      empty then and is now, so tokens saved up in between do not inflate it).
      ``SUSTAINED`` 429s making up at least ``SUSTAINED_SHARE`` of the last second's
      answers mean the limit moved down: ``backoff`` × what the last second admitted.
    * A 429 to a request started before the last change says nothing new.
    * Once the 429's Retry-After has passed, the rate grows by ``probe`` × its new value
      per second up to the cap: it settles just under the limit and follows it if it rises.

    Everything takes time from ``clock`` (tests inject a fake one).
    """

    WINDOW = 1.0
    CHECK = 10
    BURST_SHARE = 0.3
    SUSTAINED, SUSTAINED_SHARE = 5, 0.1
    MIN_ADMITTED = 4  # admitted answers needed to measure the server's rate

    def __init__(
        self,
        cap: float,
        *,
        backoff: float = 0.95,
        probe: float = 0.05,
        floor: float = 1.0,
        burst: int = 8,
        start: float = KEY_LIMIT,
        ramp: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cap, self.rate, self.ref = cap, min(cap, start), math.inf
        self.ramp = ramp
        self.backoff, self.probe, self.floor, self.burst = backoff, probe, min(floor, cap), burst
        self.clock = clock
        self.cuts = 0  # decreases (a check that finds a lone 429 is not one)
        self._last_start = -math.inf  # of the last request (the token bucket as a schedule)
        self._answers: deque[tuple[float, bool]] = deque()  # (time, was 429) within WINDOW
        self._first: float | None = None  # first answer
        self._admitted = 0  # answers other than 429 since then
        self._admitted_before = 0  # of them, before the last decrease
        self._changed_at = -math.inf  # last decrease or check start
        self._measured_from = -math.inf  # last decrease: rates are measured from here on
        self._check: _Check | None = None
        self._step = 0.0  # additive increase, requests/s per second
        self._grow_from = math.inf  # growth starts here (after Retry-After) and moves on with it

    # -- pacing

    def wait_time(self) -> float:
        """Seconds until the next request may start; 0 means one starts now (and is
        counted). Nothing is booked ahead, so a decrease also slows requests that are
        already waiting."""
        now = self.clock()
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
        if self.ref == math.inf and self._check is None and self.rate < self.cap:  # the ramp
            self.rate = min(self.cap, self.rate * 2 ** (1 / (self.rate * self.ramp)))

    def throttled(self, started_at: float, retry_after: float | None = None) -> None:
        """A 429 arrived for a request started at ``started_at`` (same clock)."""
        now = self.clock()
        stale = started_at < self._changed_at  # in flight at the last change: says nothing new
        self._answer(now, True, counted=not stale)
        if stale or self._check is not None:
            return
        self._grow(now)
        admitted, limited, span = self._window(now)
        sustained = limited >= self.SUSTAINED and limited >= self.SUSTAINED_SHARE * (admitted + limited)
        if self.rate >= self.ref or sustained:
            if not sustained:  # the bucket was empty at the last decrease: all admitted since is the limit's
                admitted, span = self._admitted - self._admitted_before, now - self._measured_from
            server = admitted / span if admitted >= self.MIN_ADMITTED and span > 0 else self.rate
            self._decrease(now, self.backoff * min(self.rate, server), retry_after)
            return
        if self.ref == math.inf:  # the first 429: all admitted so far is the burst plus the limit since
            admitted = self._admitted
            span = now - (self._first if self._first is not None else now) + (retry_after or self.WINDOW)
        # Too few answers to measure anything: halve while checking.
        limit = admitted / span if admitted >= self.MIN_ADMITTED and span > 0 else self.rate / 2
        self._check = _Check(self.rate, retry_after)
        self._set_rate(now, self.backoff * min(self.rate, limit))

    def _answer(self, now: float, throttled: bool, counted: bool = True) -> None:
        if self._first is None:
            self._first = now
        self._admitted += not throttled
        if counted:
            self._answers.append((now, throttled))
        while self._answers and self._answers[0][0] < now - self.WINDOW:
            self._answers.popleft()
        check = self._check
        if check is None:
            return
        check.answers += 1
        check.throttled += throttled
        # Settled as soon as the outcome is certain: enough 429s, or too many answers.
        needed = math.ceil(self.BURST_SHARE * (self.CHECK + 1))
        is_limit = check.throttled >= needed
        if not is_limit and check.answers - check.throttled <= self.CHECK + 1 - needed:
            return
        self._check = None
        if is_limit:  # the measured rate stays, and is the known limit from now on
            self._decrease(now, self.rate, check.retry_after)
        else:
            self.rate = check.rate_before  # a lone 429: not the limit

    def _window(self, now: float) -> tuple[int, int, float]:
        """Admitted answers, 429s and the span they cover: the last WINDOW, but not
        from before the first answer or the last decrease (stale 429s left out)."""
        since = max(now - self.WINDOW, self._measured_from, self._first if self._first is not None else now)
        admitted = limited = 0
        for at, throttled in reversed(self._answers):
            if at < since:
                break
            limited += throttled
            admitted += not throttled
        return admitted, limited, now - since

    def _decrease(self, now: float, rate: float, retry_after: float | None) -> None:
        self._set_rate(now, rate)
        self.ref = self.rate / self.backoff
        self._measured_from, self._admitted_before = now, self._admitted
        self._step = max(self.probe * self.rate, 0.1)
        self._grow_from = now + (retry_after or 0.0)
        self.cuts += 1

    def _set_rate(self, now: float, rate: float) -> None:
        self.rate = min(self.cap, max(self.floor, rate))
        self._changed_at = now
        self._last_start = max(self._last_start, now - 1.0 / self.rate)  # no saved-up burst

    def _grow(self, now: float) -> None:
        if self._check is not None or self.rate >= self.cap or now <= self._grow_from:
            return
        self.rate = min(self.cap, self.rate + self._step * (now - self._grow_from))
        self._grow_from = now


class InFlightLimit:
    """Requests in flight at most: ``maximum`` (--concurrency), reached by a slow start
    from ``initial``, one more per finished request, so connections are opened a few at
    a time rather than all at once. Throttling is the rate's business (AdaptiveRate)."""

    def __init__(self, maximum: int, initial: int = 4):
        self.maximum = maximum
        self.limit = min(initial, maximum)
        self.in_flight = 0
        self._slots = asyncio.Semaphore(self.limit)

    async def acquire(self) -> None:
        await self._slots.acquire()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._slots.release()
        if self.limit < self.maximum:
            self.limit += 1
            self._slots.release()

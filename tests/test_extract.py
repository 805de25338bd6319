"""Extractor against httpx.MockTransport: paging, retries, guards, auth stop, concurrency."""

import asyncio
import json
import math

import httpx
import pytest

from pipeline.config import Settings
from pipeline.errors import AuthError
import pipeline.extract as extract_module
from pipeline.extract import AdaptiveRate, InFlightLimit, extract_calls

BASE = "https://api.test"
FAST = dict(
    base_url=BASE, concurrency=4, page_size=2, max_rps=10_000, backoff_initial_seconds=0.001,
    backoff_max_seconds=0.005, retry_after_min_seconds=0.001, retry_after_max_seconds=0.01, max_attempts=4,
)
C1, C2, C3 = (f"00000000-0000-4000-8000-00000000000{i}" for i in (1, 2, 3))


def stages(call_id, n):
    return [{"callId": call_id, "callStageId": f"{call_id[:-4]}{i:04d}", "errorCount": 0} for i in range(n)]


def paged(request, call_id, n, page_size=2):
    offset = int(request.url.params.get("cursor", 0))
    rows = stages(call_id, n)[offset : offset + page_size]
    nxt = f"{BASE}/api/calls/{call_id}/stages?cursor={offset + page_size}&pageSize={page_size}" if offset + page_size < n else None
    return httpx.Response(200, json={"next": nxt, "previous": None, "results": rows, "total": n})


def run(handler, call_ids, key="k", **overrides):
    settings = Settings(**(FAST | overrides))
    out = {}

    async def sink(fetch):
        out[fetch.call_id] = fetch

    stats = asyncio.run(extract_calls(call_ids, settings, key, sink, transport=httpx.MockTransport(handler)))
    return out, stats


def call_of(request):
    return request.url.path.split("/")[3]


def test_pages_followed_until_null_with_page_size_and_key():
    seen = []

    def handler(request):
        seen.append((str(request.url), request.headers.get("x-api-key")))
        return paged(request, call_of(request), 5)

    out, stats = run(handler, [C1])
    fetch = out[C1]
    assert fetch.status == "loaded" and [s["callStageId"] for s in fetch.stages()] == [s["callStageId"] for s in stages(C1, 5)]
    assert len(fetch.pages) == 3 and stats.requests == 3
    assert seen[0][0] == f"{BASE}/api/calls/{C1}/stages?pageSize=2"
    assert seen[1][0] == f"{BASE}/api/calls/{C1}/stages?cursor=2&pageSize=2"  # `next` exactly as given
    assert {k for _, k in seen} == {"k"}


def test_404_is_not_found():
    out, _ = run(lambda r: httpx.Response(404, json={"detail": "Not found."}), [C1])
    assert out[C1].status == "not_found" and out[C1].error is None


def test_transient_faults_are_retried_with_retry_after():
    attempts = {"n": 0}

    def handler(request):
        attempts["n"] += 1
        if attempts["n"] == 1:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"detail": "slow down"})
        if attempts["n"] == 2:
            return httpx.Response(503, text="<html>")
        if attempts["n"] == 3:
            return httpx.Response(200, content=b'{"next": null, "results": [')  # truncated JSON
        if attempts["n"] == 4:
            raise httpx.ConnectError("reset")
        return paged(request, C1, 1)

    # The first answers were real responses, so a later connection error is transient.
    out, stats = run(handler, [C1], max_attempts=6)
    assert out[C1].status == "loaded" and out[C1].retries == 4 and stats.retries == 4
    assert stats.throttled == 1


def test_always_500_fails_that_call_only():
    def handler(request):
        if call_of(request) == C2:
            return httpx.Response(500, json={"detail": "boom"})
        return paged(request, call_of(request), 3)

    out, _ = run(handler, [C1, C2, C3])
    assert out[C1].status == out[C3].status == "loaded"
    assert out[C2].status == "failed" and "HTTP 500" in out[C2].error and out[C2].pages == []
    assert out[C2].requests == 4  # max_attempts


def test_retry_budget_per_call():
    out, _ = run(lambda r: httpx.Response(502), [C1], max_attempts=50, call_retry_budget=3)
    assert out[C1].status == "failed" and out[C1].retries == 3


def test_auth_failure_stops_the_run_at_once():
    requests = []

    def handler(request):
        requests.append(request)
        return httpx.Response(403, json={"detail": "Invalid API key"})

    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(50)]
    with pytest.raises(AuthError):
        run(handler, ids, concurrency=1)
    assert len(requests) == 1


def test_auth_failure_with_many_in_flight_starts_no_new_requests():
    requests = []

    async def handler(request):
        requests.append(request)
        await asyncio.sleep(0.01)
        return httpx.Response(401, json={"detail": "Authentication credentials were not provided."})

    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(200)]
    with pytest.raises(AuthError):
        run(handler, ids, concurrency=8)
    assert len(requests) <= 8  # only those already in flight


@pytest.mark.parametrize(
    "page, reason",
    [
        ({"next": None, "results": {"a": 1}}, "'results' is not a list"),
        ({"next": None}, "'results' is not a list"),
        ([1, 2], "'results' is not a list"),
        ({"next": 5, "results": []}, "'next' is not a string"),
    ],
)
def test_bad_page_shapes_fail_the_call(page, reason):
    out, _ = run(lambda r: httpx.Response(200, json=page), [C1])
    assert out[C1].status == "failed" and reason in out[C1].error


def test_next_repeating_a_cursor_fails_without_looping():
    def handler(request):
        return httpx.Response(200, json={"next": f"{BASE}/api/calls/{C1}/stages?cursor=abc", "results": stages(C1, 1)})

    out, stats = run(handler, [C1])
    assert out[C1].status == "failed" and "repeats a cursor" in out[C1].error
    assert stats.requests == 2


def test_next_to_another_origin_is_never_followed():
    hosts = []

    def handler(request):
        hosts.append((request.url.host, request.headers.get("x-api-key")))
        return httpx.Response(200, json={"next": "https://evil.test/steal?cursor=1", "results": stages(C1, 1)})

    out, _ = run(handler, [C1])
    assert out[C1].status == "failed" and "evil.test" in out[C1].error
    assert hosts == [("api.test", "k")]


def test_empty_next_and_missing_next_end_paging():
    out, _ = run(lambda r: httpx.Response(200, json={"next": "", "results": stages(call_of(r), 2)}), [C1])
    assert out[C1].status == "loaded" and len(out[C1].stages()) == 2
    out, _ = run(lambda r: httpx.Response(200, json={"results": []}), [C1])
    assert out[C1].status == "loaded" and out[C1].stages() == []


def test_page_cap():
    def handler(request):
        n = int(request.url.params.get("cursor", 0)) + 1
        return httpx.Response(200, json={"next": f"{BASE}/api/calls/{C1}/stages?cursor={n}", "results": []})

    out, stats = run(handler, [C1], max_pages=5)
    assert out[C1].status == "failed" and "more than 5 pages" in out[C1].error and stats.requests == 5


def test_total_mismatch_is_recorded():
    out, _ = run(lambda r: httpx.Response(200, json={"next": None, "results": stages(C1, 2), "total": 3}), [C1])
    assert out[C1].status == "loaded" and out[C1].total_mismatch == (3, 2)


def test_response_size_cap():
    big = json.dumps({"next": None, "results": [{"x": "y" * 5000}]})
    out, _ = run(lambda r: httpx.Response(200, content=big.encode()), [C1], max_response_bytes=1000)
    assert out[C1].status == "failed" and "cap" in out[C1].error


def test_404_after_first_page_fails():
    def handler(request):
        if "cursor" in request.url.params:
            return httpx.Response(404)
        return httpx.Response(200, json={"next": f"{BASE}/api/calls/{C1}/stages?cursor=1", "results": stages(C1, 1)})

    out, _ = run(handler, [C1])
    assert out[C1].status == "failed" and "404" in out[C1].error


def test_many_calls_in_flight():
    in_flight = {"now": 0, "peak": 0}

    async def handler(request):
        in_flight["now"] += 1
        in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
        await asyncio.sleep(0.005)
        in_flight["now"] -= 1
        return paged(request, call_of(request), 1)

    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(200)]
    out, _ = run(handler, ids, concurrency=16)
    assert len(out) == 200 and all(f.status == "loaded" for f in out.values())
    assert in_flight["peak"] >= 8  # not one call at a time


def test_in_flight_slow_start_from_4_to_concurrency():
    async def scenario():
        limit = InFlightLimit(maximum=32, initial=4)
        for _ in range(4):
            await limit.acquire()
        assert limit.in_flight == 4 and not limit._slots._value  # a fifth waits
        for _ in range(40):  # each finished request opens one more slot, up to 32
            limit.release()
            await limit.acquire()
        assert limit.limit == 32 and limit.in_flight == 4 and limit._slots._value == 28

    asyncio.run(scenario())


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def answers(rate, clock, seconds, per_second, throttled_every=0, started_at=None):
    """``per_second`` answers a second for ``seconds``; every ``throttled_every``-th is a
    429 to a request started at ``started_at`` (default: just before it)."""
    for i in range(round(seconds * per_second)):
        clock.now += 1 / per_second
        if throttled_every and i % throttled_every == throttled_every - 1:
            rate.throttled(started_at=clock.now - 0.01 if started_at is None else started_at)
        else:
            rate.admitted()


def test_rate_paces_starts_at_the_cap_with_a_small_burst():
    clock = Clock()
    rate = AdaptiveRate(10, burst=2, clock=clock)
    assert [rate.wait_time() for _ in range(3)] == [0, 0, 0]  # the first and `burst` more
    assert rate.wait_time() == pytest.approx(0.1)  # then 1/rate apart
    clock.now += 0.1
    assert rate.wait_time() == 0 and rate.wait_time() == pytest.approx(0.1)
    rate._decrease(clock.now, 5, retry_after=None)  # a decrease also slows those waiting
    assert rate.wait_time() == pytest.approx(0.2)
    clock.now += 10  # idle: the burst again
    assert [rate.wait_time() for _ in range(3)] == [0, 0, 0] and rate.wait_time() > 0


def test_a_lone_429_is_checked_then_undone():
    clock = Clock()
    rate = AdaptiveRate(150, clock=clock)
    rate.wait_time()
    answers(rate, clock, 1, 100)
    rate.throttled(started_at=clock.now - 0.05, retry_after=0.05)
    assert rate.rate == pytest.approx(50, rel=0.02)  # halved (what was actually sent: 100/s) while checked
    answers(rate, clock, 0.12, 100)  # the next 12 answers: no other 429
    assert rate.rate == 150 and rate.cuts == 0 and rate.ref == math.inf


def test_random_429s_do_not_compound_into_a_crawl():
    clock = Clock()
    rate = AdaptiveRate(150, clock=clock)
    rate.wait_time()
    answers(rate, clock, 30, 150, throttled_every=40)  # 2.5% of the answers, spread out
    assert rate.rate == 150 and rate.cuts == 0


def test_a_wave_of_429s_is_the_limit():
    clock = Clock()
    rate = AdaptiveRate(1000, clock=clock)
    rate.wait_time()
    answers(rate, clock, 1, 300)  # the server's burst: everything admitted
    wave = clock.now - 0.05  # requests in flight when the server's burst ran out
    rate.throttled(started_at=wave, retry_after=1)
    assert rate.rate == pytest.approx(150, rel=0.01)  # half the pace that met the 429
    answers(rate, clock, 0.04, 300, throttled_every=2, started_at=wave)  # half of them are 429
    assert rate.cuts == 1 and rate.rate == rate.ref == pytest.approx(150, rel=0.01)
    rate.throttled(started_at=clock.now - 0.5)  # in flight before the decrease: no news
    assert rate.rate == pytest.approx(150, rel=0.01) and rate.cuts == 1


def test_429_at_the_known_limit_decreases_to_what_the_server_admits():
    clock = Clock()
    rate = AdaptiveRate(1000, clock=clock)
    rate.wait_time()
    answers(rate, clock, 1, 300)
    wave = clock.now - 0.05
    rate.throttled(started_at=wave, retry_after=1)
    answers(rate, clock, 0.04, 300, throttled_every=2, started_at=wave)
    assert rate.rate == rate.ref == pytest.approx(150, rel=0.01)
    answers(rate, clock, 0.5, 100)  # the server admits 100/s
    rate.throttled(started_at=clock.now - 0.01, retry_after=1)  # at the known limit: at once
    assert rate.cuts == 2 and rate.rate == pytest.approx(90, rel=0.03)  # 0.9 × what was admitted
    assert rate.ref == pytest.approx(100, rel=0.03)


def test_probe_waits_for_retry_after_then_grows_additively_up_to_the_cap():
    clock = Clock()
    rate = AdaptiveRate(120, clock=clock)
    rate.wait_time()
    answers(rate, clock, 1, 100)
    rate._decrease(clock.now, 80, retry_after=1)  # as a 429 at the known limit would
    start = clock.now
    clock.now = start + 1  # Retry-After: no probing yet
    rate.wait_time()
    assert rate.rate == 80
    clock.now = start + 3  # then +5% of 80 per second
    rate.wait_time()
    assert rate.rate == pytest.approx(88)
    clock.now = start + 100
    rate.wait_time()
    assert rate.rate == 120  # never above the cap (--max-rps)


def test_sustained_429s_below_the_known_limit_decrease_too():
    clock = Clock()
    rate = AdaptiveRate(200, clock=clock)
    rate.wait_time()
    answers(rate, clock, 1, 100)
    rate._decrease(clock.now, 100, retry_after=None)  # ref 111
    answers(rate, clock, 1, 100, throttled_every=5)  # 20% of answers: the limit moved down
    assert rate.cuts >= 2 and rate.rate < 90


def test_429s_reach_the_rate_and_other_answers_count_as_admitted():
    seen = []

    class Recording(AdaptiveRate):
        def admitted(self):
            seen.append("ok")
            super().admitted()

        def throttled(self, started_at, retry_after=None):
            seen.append(("429", started_at <= self.clock(), retry_after))
            super().throttled(started_at, retry_after)

    calls = {"n": 0}

    def handler(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"detail": "slow down"})
        if calls["n"] == 2:
            return httpx.Response(404, json={"detail": "Not found."})
        return paged(request, call_of(request), 1)

    original = extract_module.AdaptiveRate
    extract_module.AdaptiveRate = Recording
    try:
        out, stats = run(handler, [C1, C2], concurrency=1)
    finally:
        extract_module.AdaptiveRate = original
    assert stats.throttled == 1 and seen == [("429", True, 0.001), "ok", "ok"]

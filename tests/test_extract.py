"""Extractor against httpx.MockTransport: paging, retries, guards, auth stop, concurrency."""

import asyncio
import json

import httpx
import pytest

from pipeline.config import Settings
from pipeline.errors import AuthError
import pipeline.extract as extract_module
from pipeline.extract import extract_calls
from pipeline.rate import AdaptiveRate

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
        await asyncio.sleep(0.05)  # at the starting rate (200/s), 10 requests in flight
        in_flight["now"] -= 1
        return paged(request, call_of(request), 1)

    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(100)]
    out, _ = run(handler, ids, concurrency=16)
    assert len(out) == 100 and all(f.status == "loaded" for f in out.values())
    assert in_flight["peak"] >= 8  # not one call at a time


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

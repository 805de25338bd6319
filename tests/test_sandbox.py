"""The simulated Ultravox API: data variety, determinism, HTTP behaviour and faults.

The application is tested in-process through ``httpx.MockTransport``; what needs a socket
(resets, concurrency, stopping, the child process) through a real ``Sandbox``."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

from pipeline.sandbox import Sandbox, SandboxApp, SandboxOptions, SyntheticData, write_call_ids

KEY = "sandbox-test-key"
DURATION = re.compile(r"^-?(?:0|[1-9][0-9]{0,11})(?:\.[0-9]{1,9})?s$")
KNOWN_PROVIDERS = {"elevenLabs", "cartesia", "lmnt", "google", "inworld", "respeecher", "generic"}


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return SyntheticData(n_calls=500, seed=0)


@pytest.fixture(scope="module")
def all_stages(data: SyntheticData) -> dict[str, list[dict]]:
    return {cid: data.stages_for(cid) for cid in data.call_ids}


APP_URL = "http://sandbox.test"  # reached through MockTransport, never resolved


@pytest.fixture(scope="module")
def app(data: SyntheticData) -> SandboxApp:
    return SandboxApp(data, SandboxOptions(api_key=KEY))


@pytest.fixture(scope="module")
def box(app: SandboxApp) -> SandboxApp:
    """Stands where a running sandbox used to: tests address it as APP_URL."""
    return app


def _app_client(app: SandboxApp, **kwargs) -> httpx.Client:
    return httpx.Client(mounts={APP_URL: httpx.MockTransport(app.handler)}, timeout=10, **kwargs)


@pytest.fixture
def client(app: SandboxApp) -> Iterator[httpx.Client]:
    """Keyed; APP_URL goes to the in-process app, 127.0.0.1 to real sandboxes."""
    with _app_client(app, headers={"X-API-Key": KEY}) as c:
        yield c


def _sandbox(n_calls: int = 30, seed: int = 1, **options) -> Sandbox:
    options.setdefault("api_key", KEY)
    return Sandbox(SyntheticData(n_calls=n_calls, seed=seed), SandboxOptions(**options))


def _follow(client: httpx.Client, url: str, **params) -> tuple[list[dict], list[dict]]:
    """All pages from url, following `next` exactly as given: (results, pages)."""
    pages = []
    response = client.get(url, params=params)
    while True:
        assert response.status_code == 200, response.text
        pages.append(response.json())
        if pages[-1]["next"] is None:
            break
        response = client.get(pages[-1]["next"])
    return [item for page in pages for item in page["results"]], pages


def _parse(ts: str) -> datetime:
    assert ts.endswith(("Z", "+00:00")), ts
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- data


def test_deterministic_and_prefix_stable() -> None:
    a, b = SyntheticData(n_calls=40, seed=3), SyntheticData(n_calls=40, seed=3)
    assert a.call_ids == b.call_ids and a.deleted_call_ids == b.deleted_call_ids
    assert all(a.stages_for(c) == b.stages_for(c) and a.call_for(c) == b.call_for(c) for c in a.call_ids)
    bigger = SyntheticData(n_calls=80, seed=3)
    assert bigger.call_ids[:40] == a.call_ids
    assert bigger.stages_for(a.call_ids[7]) == a.stages_for(a.call_ids[7])
    assert SyntheticData(n_calls=40, seed=4).call_ids != a.call_ids


def test_stages_for_returns_copies_and_unknown_raises(data: SyntheticData) -> None:
    cid = next(c for c in data.call_ids if data.stages_for(c))
    first = data.stages_for(cid)
    first[0]["model"] = "mutated"
    assert data.stages_for(cid)[0]["model"] != "mutated"
    with pytest.raises(KeyError):
        data.stages_for(str(uuid.uuid4()))
    with pytest.raises(KeyError):
        data.stages_for(data.deleted_call_ids[0])
    with pytest.raises(KeyError):
        data.call_for("not-a-uuid")


def test_public_accessors(data: SyntheticData) -> None:
    cid = next(c for c in data.call_ids if len(data.stages_for(c)) >= 3)
    assert data.has_call(cid) and not data.has_call(data.deleted_call_ids[0]) and not data.has_call("x")
    assert data.stage_count(cid) == len(data.stages_for(cid))
    assert data.stage_ids_for(cid) == [s["callStageId"] for s in data.stages_for(cid)]
    with pytest.raises(KeyError):
        data.stage_count(data.deleted_call_ids[0])


def test_caches_are_bounded_by_bytes() -> None:
    from pipeline.sandbox.data import LRUCache

    cache = LRUCache(100, max_bytes=1000)
    for i in range(20):
        cache.put(i, b"x" * 100)
    assert cache.nbytes <= 1000 and cache.get(19) == b"x" * 100 and cache.get(0) is None
    cache.put("heavy", b"x" * 200)  # more than an eighth of the bound: never kept
    assert cache.get("heavy") is None and cache.get(19) is not None
    cache.put(19, b"y" * 10)
    assert cache.get(19) == b"y" * 10 and cache.nbytes <= 1000


def test_ids_canonical_unique_and_consistent(data: SyntheticData, all_stages: dict[str, list[dict]]) -> None:
    assert len(set(data.call_ids)) == 500
    assert all(str(uuid.UUID(c)) == c for c in data.call_ids)
    assert data.deleted_call_ids and not set(data.deleted_call_ids) & set(data.call_ids)
    stage_ids = [s["callStageId"] for stages in all_stages.values() for s in stages]
    assert len(stage_ids) == len(set(stage_ids)) and all(str(uuid.UUID(s)) == s for s in stage_ids)
    for cid, stages in all_stages.items():
        assert all(s["callId"] == cid for s in stages)
        times = [_parse(s["created"]) for s in stages]
        assert times == sorted(times)


def test_variety_across_500_calls(all_stages: dict[str, list[dict]]) -> None:
    stages = [s for ss in all_stages.values() for s in ss]
    counts = Counter(len(ss) for ss in all_stages.values())
    assert counts[0] >= 5 and sum(n for k, n in counts.items() if k >= 8) >= 3
    assert max(counts) <= 12 and counts[1] > counts[3]
    required = {"callId", "callStageId", "created", "errorCount", "experimentalSettings", "initialState",
                "initialTokenCount", "latestTokenCount", "temperature"}
    assert all(required <= s.keys() for s in stages)
    optional = {"inactivityMessages", "languageHint", "model", "systemPrompt", "timeExceededMessage", "voice",
                "externalVoice", "voiceOverrides"}
    assert optional <= {k for s in stages for k in s}
    # Timestamps: both UTC spellings, with and without fractions, some calls across midnight.
    created = [s["created"] for s in stages]
    assert any(t.endswith("Z") for t in created) and any(t.endswith("+00:00") for t in created)
    assert any("." not in t for t in created) and any(re.search(r"\.\d{6}", t) for t in created)
    assert any(len({_parse(s["created"]).date() for s in ss}) > 1 for ss in all_stages.values())
    days = {_parse(t).date() for t in created}
    assert len(days) >= 9
    # Token counts: null sometimes, latest >= initial otherwise.
    assert any(s["initialTokenCount"] is None for s in stages)
    assert all(s["latestTokenCount"] >= s["initialTokenCount"] for s in stages
               if s["initialTokenCount"] is not None and s["latestTokenCount"] is not None)
    assert any(s["errorCount"] > 0 for s in stages) and Counter(s["errorCount"] == 0 for s in stages)[True] > len(stages) / 2
    assert {None, "en", "en-US", "de", "ja"} <= {s.get("languageHint") for s in stages}
    assert {"fixie-ai/ultravox", "fixie-ai/ultravox-70B", "ultravox-v0.7"} <= {s.get("model") for s in stages}
    # System prompts: null, short, few KB, ~100 KB, unicode and escapes.
    prompts = [s.get("systemPrompt") for s in stages]
    assert None in prompts
    sizes = [len(p.encode()) for p in prompts if p]
    assert max(sizes) >= 100_000 and any(2_000 <= n <= 8_000 for n in sizes)
    text = "".join(p for p in prompts if p and len(p) < 10_000)
    for needle in ("😀", "你", "א", "ع", '"', "\\", "\n", "\u2028"):
        assert needle in text, needle
    assert any(s.get("timeExceededMessage") for s in stages) and any(s.get("voice") for s in stages)
    assert any(s.get("experimentalSettings") for s in stages) and any(s["experimentalSettings"] is None for s in stages)
    assert any(s["initialState"] == {} for s in stages) and any(s["initialState"] for s in stages)
    assert any("futureField" in s for s in stages)


def test_inactivity_message_variety(all_stages: dict[str, list[dict]]) -> None:
    stages = [s for ss in all_stages.values() for s in ss]
    messages = [m for s in stages for m in s.get("inactivityMessages") or []]
    assert {len(s.get("inactivityMessages") or []) for s in stages} == set(range(6))
    assert any("inactivityMessages" not in s for s in stages)
    assert all(DURATION.match(m["duration"]) for m in messages)
    durations = {m["duration"] for m in messages}
    for odd in ("0.000000001s", "-2s", "315576000000s", "1.500s", "0.250000s", "30s"):
        assert odd in durations, odd
    assert any(re.fullmatch(r"\d+\.\d{9}s", d) for d in durations)
    behaviours = Counter(m.get("endBehavior", "<absent>") for m in messages)
    assert {"<absent>", "END_BEHAVIOR_UNSPECIFIED", "END_BEHAVIOR_HANG_UP_SOFT", "END_BEHAVIOR_HANG_UP_STRICT"} <= behaviours.keys()


def test_voice_variety(all_stages: dict[str, list[dict]]) -> None:
    stages = [s for ss in all_stages.values() for s in ss]
    external = [s["externalVoice"] for s in stages if s.get("externalVoice")]
    assert all(len(v) == 1 for v in external)  # a one-of: exactly one provider key
    providers = Counter(next(iter(v)) for v in external)
    assert KNOWN_PROVIDERS | {"playHt", "acmeTts"} <= providers.keys()
    overrides = [s.get("voiceOverrides", "<absent>") for s in stages]
    assert "<absent>" in overrides and None in overrides and any(isinstance(o, dict) for o in overrides)
    generic = [v["generic"] for v in external if "generic" in v]
    assert all({"url", "headers", "body"} <= g.keys() for g in generic)
    assert all(g["headers"]["Authorization"].startswith("Bearer sk-live-") for g in generic)
    assert any("X-Api-Key" in g["headers"] for g in generic) and any("api_key" in g["body"] for g in generic)
    eleven = [v["elevenLabs"] for v in external if "elevenLabs" in v]
    assert any("enableSsmlParsing" in e for e in eleven) and any("pronunciationDictionaries" in e for e in eleven)
    assert any("modelId" in v["inworld"] for v in external if "inworld" in v)
    assert any("speakingRate" in v["google"] for v in external if "google" in v)


def test_small_data_sets_still_show_every_provider() -> None:
    small = SyntheticData(n_calls=10, seed=42)
    providers = {next(iter(s["externalVoice"])) for c in small.call_ids for s in small.stages_for(c) if s.get("externalVoice")}
    assert KNOWN_PROVIDERS | {"playHt", "acmeTts"} <= providers


def test_call_objects(data: SyntheticData) -> None:
    calls = [data.call_for(c) for c in data.call_ids]
    keys = {"callId", "created", "joined", "ended", "endReason", "billedDuration", "metadata", "agentId"}
    assert all(keys <= c.keys() for c in calls)
    assert all(DURATION.match(c["billedDuration"]) for c in calls)
    assert any(c["agentId"] is None for c in calls) and any(c["agentId"] for c in calls)
    assert any(c["metadata"] for c in calls) and all(isinstance(c["metadata"], dict) for c in calls)
    for c in calls[:100]:
        stages = data.stages_for(c["callId"])
        if stages:
            assert _parse(c["created"]) <= _parse(stages[0]["created"]) <= _parse(c["ended"])


def test_write_call_ids(tmp_path, data: SyntheticData) -> None:
    path = tmp_path / "ids.txt"
    write_call_ids(data, path)
    assert path.read_text().splitlines() == data.call_ids


# --------------------------------------------------------------------------- HTTP


def test_pagination_matches_stages_for(box: SandboxApp, client: httpx.Client, data: SyntheticData) -> None:
    many = [c for c in data.call_ids if len(data.stages_for(c)) >= 8][:3]
    few = [c for c in data.call_ids if 0 <= len(data.stages_for(c)) <= 2][:5]
    for cid in many + few:
        expected = data.stages_for(cid)
        results, pages = _follow(client, f"{APP_URL}/api/calls/{cid}/stages", pageSize=3)
        assert results == expected
        assert all(p["total"] == len(expected) for p in pages)
        assert len(pages) == max(1, -(-len(expected) // 3))
        assert pages[0]["previous"] is None
        if len(pages) > 1:
            assert pages[1]["previous"] and pages[0]["next"].startswith(f"{APP_URL}/api/calls/{cid}/stages?cursor=")
            assert "pageSize=3" in pages[0]["next"]
    # Default page size 10 when pageSize is absent; the server caps it at max_page_size.
    cid = many[0]
    assert len(client.get(f"{APP_URL}/api/calls/{cid}/stages").json()["results"]) == min(10, len(data.stages_for(cid)))
    with _sandbox(n_calls=300, seed=0, max_page_size=2) as capped:
        cid = next(c for c in capped.data.call_ids if len(capped.data.stages_for(c)) >= 5)
        page = client.get(f"{capped.base_url}/api/calls/{cid}/stages", params={"pageSize": 100}).json()
        assert len(page["results"]) == 2 and "pageSize=2" in page["next"]
        assert _follow(client, f"{capped.base_url}/api/calls/{cid}/stages", pageSize=100)[0] == capped.data.stages_for(cid)


def test_bad_cursor_is_400(box: SandboxApp, client: httpx.Client, data: SyntheticData) -> None:
    r = client.get(f"{APP_URL}/api/calls/{data.call_ids[0]}/stages", params={"cursor": "!!not-base64"})
    assert r.status_code == 400 and "detail" in r.json()


def test_auth_401_403_and_no_auth(app: SandboxApp, data: SyntheticData) -> None:
    url = f"{APP_URL}/api/calls/{data.call_ids[0]}/stages"
    with _app_client(app) as bare:
        missing = bare.get(url)
        assert missing.status_code == 401 and missing.json() == {"detail": "Authentication credentials were not provided."}
        wrong = bare.get(url, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 403 and wrong.json() == {"detail": "Invalid API key."}
        for path in ("/api/calls", "/api/deleted_calls"):
            assert bare.get(APP_URL + path).status_code == 401
    with _sandbox(n_calls=3, api_key=None) as open_box:
        assert httpx.get(f"{open_box.base_url}/api/calls/{open_box.data.call_ids[0]}/stages").status_code == 200


def test_404s(box: SandboxApp, client: httpx.Client, data: SyntheticData) -> None:
    for cid in (str(uuid.uuid4()), "not-a-uuid", data.call_ids[0].upper(), data.deleted_call_ids[0]):
        r = client.get(f"{APP_URL}/api/calls/{cid}/stages")
        assert r.status_code == 404 and r.json() == {"detail": "Not found."}, cid
    for path in ("/", "/api", "/api/calls/x/messages", "/api/calls/a/b/stages"):
        r = client.get(APP_URL + path)
        assert r.status_code == 404 and r.json()["detail"]


def test_stats_and_headers(client: httpx.Client) -> None:
    with _sandbox(n_calls=5) as sb:
        for cid in sb.data.call_ids:
            client.get(f"{sb.base_url}/api/calls/{cid}/stages", headers={"X-Custom": "v"})
        httpx.get(f"{sb.base_url}/api/calls")
        client.get(f"{sb.base_url}/nowhere")
        stats = sb.stats
        assert stats.requests == 7 and stats.stage_requests == 5
        assert stats.by_status == {200: 5, 401: 1, 404: 1}
        assert stats.peak_in_flight >= 1
        headers = stats.received_headers
        assert len(headers) == 7 and headers[0]["x-api-key"] == KEY and headers[0]["x-custom"] == "v"
        assert "x-api-key" not in headers[5]
        sb.reset_stats()
        assert sb.stats.requests == 0 and sb.stats.by_status == {} and sb.stats.received_headers == []


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("kind", ["429", "500", "502", "503", "504"])
def test_status_faults(kind: str, client: httpx.Client) -> None:
    with _sandbox(n_calls=3, fault_rate=1.0, faults=(kind,), retry_after="2") as sb:
        for path in (f"/api/calls/{sb.data.call_ids[0]}/stages", "/api/calls", "/api/deleted_calls"):
            r = client.get(sb.base_url + path)
            assert r.status_code == int(kind)
            assert r.headers.get("retry-after") == ("2" if kind in ("429", "503") else None)
        assert sb.stats.by_status == {int(kind): 3}
        assert sb.stats.throttled == (3 if kind == "429" else 0)


def test_reset_truncated_and_invalid_json_faults(client: httpx.Client, capfd) -> None:
    with _sandbox(n_calls=3, fault_rate=1.0, faults=("reset",)) as sb:
        with pytest.raises(httpx.TransportError):
            client.get(f"{sb.base_url}/api/calls/{sb.data.call_ids[0]}/stages")
        assert sb.stats.by_status == {0: 1}
    with _sandbox(n_calls=3, fault_rate=1.0, faults=("truncated",)) as sb:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(f"{sb.base_url}/api/calls/{sb.data.call_ids[0]}/stages")
    with _sandbox(n_calls=3, fault_rate=1.0, faults=("invalid_json",)) as sb:
        r = client.get(f"{sb.base_url}/api/calls/{sb.data.call_ids[0]}/stages")
        assert r.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.content)
    # The server never writes to stderr, not even for clients that vanish.
    assert capfd.readouterr().err == ""


def test_faults_are_deterministic_and_partial(client: httpx.Client) -> None:
    def statuses() -> list[int]:
        with _sandbox(n_calls=60, fault_rate=0.3, fault_seed=5, faults=("500", "503")) as sb:
            return [client.get(f"{sb.base_url}/api/calls/{c}/stages").status_code for c in sb.data.call_ids]

    first = statuses()
    assert first == statuses()
    assert 5 <= sum(s != 200 for s in first) <= 35
    # A retried URL is a new attempt: it eventually succeeds.
    with _sandbox(n_calls=1, fault_rate=0.5, faults=("500",)) as sb:
        url = f"{sb.base_url}/api/calls/{sb.data.call_ids[0]}/stages"
        assert 200 in {client.get(url).status_code for _ in range(20)}


def test_rate_limit(client: httpx.Client) -> None:
    with _sandbox(n_calls=3, rate_limit_rps=5) as sb:
        responses = [client.get(f"{sb.base_url}/api/calls") for _ in range(25)]
        throttled = [r for r in responses if r.status_code == 429]
        assert throttled and all(r.headers["retry-after"] == "1" for r in throttled)
        assert sum(r.status_code == 200 for r in responses) >= 5
        assert sb.stats.throttled == len(throttled)


def test_always_fail(client: httpx.Client) -> None:
    data = SyntheticData(n_calls=4, seed=2)
    bad = data.call_ids[1]
    with Sandbox(data, SandboxOptions(api_key=KEY, always_fail=frozenset([bad]))) as sb:
        assert [client.get(f"{sb.base_url}/api/calls/{bad}/stages").status_code for _ in range(3)] == [500] * 3
        assert client.get(f"{sb.base_url}/api/calls/{data.call_ids[0]}/stages").status_code == 200


def test_page_hook(client: httpx.Client) -> None:
    seen: list[tuple[str, int]] = []
    data = SyntheticData(n_calls=300, seed=0)
    multi = next(c for c in data.call_ids if len(data.stages_for(c)) >= 4)
    others = [c for c in data.call_ids if data.stages_for(c) and c != multi][:4]
    modes = dict(zip(others, ["mutate", "dict", "bytes", "tuple"]))

    def hook(call_id: str, page_index: int, body: dict) -> object:
        seen.append((call_id, page_index))
        mode = modes.get(call_id)
        if mode == "mutate":
            body["results"][0]["model"] = "hooked"  # mutate in place, return None
            return None
        if mode == "dict":
            return {"next": None, "results": "nope"}
        if mode == "bytes":
            return b"<html>502</html>"
        if mode == "tuple":
            return 418, {"X-Why": "teapot"}, b'{"detail": "short and stout"}'
        return None

    with Sandbox(data, SandboxOptions(api_key=KEY, page_hook=hook)) as sb:
        results, _ = _follow(client, f"{sb.base_url}/api/calls/{multi}/stages", pageSize=2)
        assert results == data.stages_for(multi)
        assert [p for c, p in seen if c == multi] == list(range(-(-len(results) // 2)))
        get = lambda c: client.get(f"{sb.base_url}/api/calls/{c}/stages")  # noqa: E731
        mutated, as_dict, as_bytes, as_tuple = (get(c) for c in others)
        assert mutated.json()["results"][0]["model"] == "hooked"
        assert data.stages_for(others[0])[0]["model"] != "hooked"  # the hook got a private copy
        assert get(others[0]).json()["results"][0]["model"] == "hooked"
        assert as_dict.json() == {"next": None, "results": "nope"}
        assert as_bytes.status_code == 200 and as_bytes.content == b"<html>502</html>"
        assert as_tuple.status_code == 418 and as_tuple.headers["x-why"] == "teapot"


def test_next_base_url(client: httpx.Client) -> None:
    with _sandbox(n_calls=300, seed=0, next_base_url="http://127.0.0.1:9") as sb:
        cid = next(c for c in sb.data.call_ids if len(sb.data.stages_for(c)) >= 3)
        page = client.get(f"{sb.base_url}/api/calls/{cid}/stages", params={"pageSize": 1}).json()
        assert page["next"].startswith(f"http://127.0.0.1:9/api/calls/{cid}/stages?cursor=")
        assert client.get(f"{sb.base_url}/api/calls", params={"pageSize": 1}).json()["next"].startswith("http://127.0.0.1:9/")


# --------------------------------------------------------------------------- other endpoints


def test_calls_listing_dates_inclusive_and_sort(box: SandboxApp, client: httpx.Client, data: SyntheticData) -> None:
    calls = [data.call_for(c) for c in data.call_ids]
    day = sorted({_parse(c["created"]).date() for c in calls})[3]
    url = f"{APP_URL}/api/calls"
    one_day, pages = _follow(client, url, fromDate=day.isoformat(), toDate=day.isoformat(), sort="created", pageSize=17)
    expected = sorted((c for c in calls if _parse(c["created"]).date() == day), key=lambda c: _parse(c["created"]))
    assert one_day == expected and pages[0]["total"] == len(expected) and len(pages) > 1
    assert all("fromDate=" in p["next"] and "sort=created" in p["next"] for p in pages[:-1])
    newest_first, _ = _follow(client, url, sort="-created", pageSize=50)
    assert len(newest_first) == 500
    times = [_parse(c["created"]) for c in newest_first]
    assert times == sorted(times, reverse=True)
    assert {c["callId"] for c in newest_first} == set(data.call_ids)
    after = client.get(url, params={"fromDate": "2030-01-01"}).json()
    assert after["results"] == [] and after["total"] == 0 and after["next"] is None
    assert client.get(url, params={"fromDate": "June 3rd"}).status_code == 400
    assert client.get(url, params={"sort": "endReason"}).status_code == 400


def test_deleted_calls(box: SandboxApp, client: httpx.Client, data: SyntheticData) -> None:
    results, pages = _follow(client, f"{APP_URL}/api/deleted_calls", pageSize=4)
    assert [r["callId"] for r in results] == data.deleted_call_ids and pages[0]["total"] == len(data.deleted_call_ids)
    assert all(_parse(r["deleted"]).tzinfo is not None for r in results)
    assert all(client.get(f"{APP_URL}/api/calls/{c}/stages").status_code == 404 for c in data.deleted_call_ids)


def test_unicode_and_large_prompt_bytes_round_trip(box: SandboxApp, client: httpx.Client, all_stages) -> None:
    cid = max(all_stages, key=lambda c: max((len(s.get("systemPrompt") or "") for s in all_stages[c]), default=0))
    r = client.get(f"{APP_URL}/api/calls/{cid}/stages", params={"pageSize": 50})
    assert r.headers["content-type"].startswith("application/json")
    assert int(r.headers["content-length"]) == len(r.content) > 100_000
    assert r.json()["results"] == all_stages[cid]


def test_keep_alive_and_concurrency() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with _sandbox(n_calls=200, seed=6, latency_ms=20) as sb:
        with httpx.Client(headers={"X-API-Key": KEY}, limits=httpx.Limits(max_connections=16)) as c:
            with ThreadPoolExecutor(16) as pool:
                codes = list(pool.map(lambda cid: c.get(f"{sb.base_url}/api/calls/{cid}/stages").status_code, sb.data.call_ids))
        assert codes == [200] * 200
        assert sb.stats.peak_in_flight >= 8


def test_stop_is_idempotent_and_frees_the_port() -> None:
    sb = _sandbox(n_calls=2).start()
    url = sb.base_url
    sb.stop()
    sb.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)


def test_sandbox_process_serves_the_same_data_and_stops(client: httpx.Client) -> None:
    from pipeline.sandbox import SandboxProcess

    with SandboxProcess(n_calls=5, seed=3, api_key=KEY, rate_limit_rps=1000) as box:
        assert box.call_ids == SyntheticData(n_calls=5, seed=3).call_ids
        call_id = box.call_ids[1]
        r = client.get(f"{box.base_url}/api/calls/{call_id}/stages")
        assert r.status_code == 200
        assert r.json()["results"] == SyntheticData(n_calls=5, seed=3).stages_for(call_id)[:10]
        wrong = client.get(f"{box.base_url}/api/calls/{call_id}/stages", headers={"X-API-Key": "wrong"})
        assert wrong.status_code == 403
        url = box.base_url
        process = box.process
    assert process is not None and process.poll() is not None  # stopped on leaving
    with pytest.raises(httpx.TransportError):
        client.get(f"{url}/api/calls/{call_id}/stages")


def _stages_url(data: SyntheticData, k: int = 0) -> str:
    return f"{APP_URL}/api/calls/{data.call_ids[k]}/stages"


def test_the_app_answers_sync_and_async_clients_without_a_socket(data: SyntheticData) -> None:
    app = SandboxApp(data, SandboxOptions(api_key=KEY))
    with httpx.Client(transport=httpx.MockTransport(app.handler), headers={"X-API-Key": KEY}) as sync:
        page = sync.get(_stages_url(data, 1), params={"pageSize": 1}).json()
    assert page["results"] == data.stages_for(data.call_ids[1])[:1]

    async def fetch_all() -> list[int]:
        transport = httpx.MockTransport(app.handler)
        async with httpx.AsyncClient(transport=transport, headers={"X-API-Key": KEY}) as client:
            answers = await asyncio.gather(*(client.get(_stages_url(data, k)) for k in range(20)))
        return [r.status_code for r in answers]

    assert asyncio.run(fetch_all()) == [200] * 20
    assert app.stats.requests == 21 and app.stats.by_status == {200: 21} and app.stats.in_flight == 0
    assert app.stats.received_headers[-1]["x-api-key"] == KEY
    assert app.stats.stage_requests == 21


def test_socket_faults_are_emulated_in_process() -> None:
    data = SyntheticData(n_calls=3, seed=1)

    def client_for(kind: str) -> httpx.Client:
        app = SandboxApp(data, SandboxOptions(api_key=KEY, fault_rate=1.0, faults=(kind,)))
        return httpx.Client(transport=httpx.MockTransport(app.handler), headers={"X-API-Key": KEY})

    with client_for("reset") as c, pytest.raises(httpx.ReadError):
        c.get(_stages_url(data))
    with client_for("truncated") as c, pytest.raises(httpx.RemoteProtocolError):
        c.get(_stages_url(data))
    with client_for("invalid_json") as c:
        first, second = c.get(_stages_url(data)), c.get(_stages_url(data))
    assert first.status_code == second.status_code == 200
    assert first.content != second.content  # a proxy page with a new request id: worth retrying
    for answer in (first, second):
        with pytest.raises(json.JSONDecodeError):
            json.loads(answer.content)


def test_slow_bodies_arrive_whole_and_in_single_bytes_in_process() -> None:
    data = SyntheticData(n_calls=40, seed=2)
    cid = next(c for c in data.call_ids if data.stage_count(c))
    app = SandboxApp(data, SandboxOptions(api_key=KEY, hostile_calls={cid: "slow_body"}, slow_body_interval=0.0))
    with httpx.Client(transport=httpx.MockTransport(app.handler), headers={"X-API-Key": KEY}) as c:
        with c.stream("GET", f"{APP_URL}/api/calls/{cid}/stages", params={"pageSize": 1}) as r:
            chunks = list(r.iter_raw())
    assert len(chunks) > 100 and {len(chunk) for chunk in chunks} == {1}
    assert json.loads(b"".join(chunks))["results"][0]["callStageId"] == data.stage_ids_for(cid)[0]


def test_a_raising_page_hook_is_a_500_in_process(data: SyntheticData) -> None:
    def hook(call_id: str, page_index: int, body: dict) -> object:
        raise RuntimeError("hook bug")

    app = SandboxApp(data, SandboxOptions(api_key=KEY, page_hook=hook))
    with httpx.Client(transport=httpx.MockTransport(app.handler), headers={"X-API-Key": KEY}) as c:
        r = c.get(_stages_url(data))
    assert r.status_code == 500 and r.json() == {"detail": "A server error occurred."}
    assert app.stats.by_status == {500: 1}


def test_listed_before_hides_calls_not_created_yet_and_mark_deleted_lists_them() -> None:
    data = SyntheticData(n_calls=50, seed=3)
    ordered = sorted(data.call_ids, key=data.created_of)
    data.listed_before = data.created_of(ordered[40])
    app = SandboxApp(data, SandboxOptions(api_key=KEY))
    with httpx.Client(transport=httpx.MockTransport(app.handler), headers={"X-API-Key": KEY}) as c:
        listed = c.get(f"{APP_URL}/api/calls", params={"pageSize": 50, "sort": "created"}).json()
        assert [call["callId"] for call in listed["results"]] == ordered[:40]
        data.listed_before = None
        assert c.get(f"{APP_URL}/api/calls", params={"pageSize": 50}).json()["total"] == 50
        data.mark_deleted(ordered[0], "2025-06-20T00:00:00Z")
        data.mark_deleted(ordered[0], "2025-06-21T00:00:00Z")
        gone = c.get(f"{APP_URL}/api/deleted_calls", params={"pageSize": 50}).json()["results"]
    assert gone.count({"callId": ordered[0], "deleted": "2025-06-21T00:00:00Z"}) == 1
    assert data.has_call(ordered[0])  # deleted upstream after it was loaded: still served

"""Hostile modes of the simulated API: each kind answers exactly as documented, only for
the calls it picks, the same way every run, and never holds up stopping the sandbox."""

from __future__ import annotations

import gc
import gzip
import json
import re
import select
import socket
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import eventually
from pipeline.sandbox import (
    HOSTILE_KIND_DOCS,
    HOSTILE_KINDS,
    PLANTED_SECRET_PREFIX,
    Sandbox,
    SandboxApp,
    SandboxOptions,
    SandboxProcess,
    SyntheticData,
    planted_secrets,
)

KEY = "hostile-test-key-3b9f"
MARKER = re.compile(re.escape(PLANTED_SECRET_PREFIX) + r"[0-9]+-[0-9a-z]+")


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(headers={"X-API-Key": KEY}, timeout=30) as c:
        yield c


def _data(n_calls: int = 40, seed: int = 5, **kw: Any) -> SyntheticData:
    return SyntheticData(n_calls=n_calls, seed=seed, **kw)


def _with_stages(data: SyntheticData, at_least: int = 1) -> list[str]:
    return [c for c in data.call_ids if data.stage_count(c) >= at_least]


def _stages_url(box: Sandbox, call_id: str) -> str:
    return f"{box.base_url}/api/calls/{call_id}/stages"


def _raw(client: httpx.Client, url: str, **params: Any) -> tuple[httpx.Response, bytes]:
    """The answer and its body exactly as sent (no content decoding)."""
    with client.stream("GET", url, params=params) as response:
        return response, b"".join(response.iter_raw())


def _depth(body: bytes) -> int:
    """Deepest JSON nesting in body (brackets inside strings are skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _paths(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every (path, value) in a JSON tree; list positions appear as ints in the path."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*path, i))


# --------------------------------------------------------------------------- the table


def test_every_kind_is_documented_and_unknown_ones_are_refused() -> None:
    assert HOSTILE_KINDS == {"invalid_next", "corrupt_gzip", "deep_nesting", "deep_voice", "lone_surrogate",
                             "slow_body", "reused_stage_id", "echo_key", "secret_shapes", "huge_pages"}
    assert set(HOSTILE_KIND_DOCS) == HOSTILE_KINDS and all(HOSTILE_KIND_DOCS.values())
    data = _data(130)  # call 123 of every 250 has no stages
    empty = next(c for c in data.call_ids if data.stage_count(c) == 0)
    bad_options = [
        SandboxOptions(hostile=("slow_body", "nonsense")),
        SandboxOptions(hostile_calls={data.call_ids[0]: "nonsense"}),
        SandboxOptions(hostile_calls={"00000000-0000-4000-8000-000000000000": "echo_key"}),
        SandboxOptions(hostile_calls={empty: "deep_voice"}),
        SandboxOptions(hostile=("echo_key",), hostile_share=1.5),
    ]
    for options in bad_options:
        with pytest.raises(ValueError):
            Sandbox(data, options)


# --------------------------------------------------------------------------- each kind


def test_invalid_next_uses_all_four_unparseable_forms_on_the_first_page_only(client: httpx.Client) -> None:
    data = _data(n_calls=60)
    with Sandbox(data, SandboxOptions(api_key=KEY, hostile=("invalid_next",), hostile_share=1.0)) as box:
        forms = set()
        for cid in data.call_ids:
            _, body = _raw(client, _stages_url(box, cid), pageSize=2)
            link = json.loads(body)["next"]
            path = f"/api/calls/{cid}/stages"
            if link.startswith(f"http://[::1{path}?"):
                forms.add("ipv6")
            elif link.startswith(f"http://xn--{path}?"):
                forms.add("idna")
            elif link.startswith(f"{box.base_url}{path}\x00?"):
                forms.add("nul")
                assert b"\\u0000" in body  # the NUL travels as a JSON escape
            elif link.startswith(f"{box.base_url}{path}\t?"):
                forms.add("tab")
                assert b"\\t?" in body
            else:
                pytest.fail(f"unexpected next link {link!r}")
            assert "cursor=" in link and "pageSize=2" in link
        assert forms == {"ipv6", "idna", "nul", "tab"}
        # Later pages link normally.
        cid = next(c for c in data.call_ids if data.stage_count(c) >= 5)
        second = client.get(_stages_url(box, cid), params={"pageSize": 2, "cursor": "Mg"}).json()
        assert second["next"].startswith(f"{box.base_url}/api/calls/{cid}/stages?cursor=")
        assert second["results"] == data.stages_for(cid)[2:4]


def test_corrupt_gzip_announces_gzip_and_sends_something_else(client: httpx.Client) -> None:
    data = _data()
    targets = _with_stages(data)[:8]
    with Sandbox(data, SandboxOptions(api_key=KEY, hostile_calls=dict.fromkeys(targets, "corrupt_gzip"))) as box:
        for cid in targets:
            response, body = _raw(client, _stages_url(box, cid))
            assert response.status_code == 200 and response.headers["content-encoding"] == "gzip"
            assert int(response.headers["content-length"]) == len(body) > 0
            with pytest.raises((OSError, EOFError, zlib.error)):
                gzip.decompress(body)
            with pytest.raises(httpx.DecodingError):
                client.get(_stages_url(box, cid))
        # Both lies occur: the plain page, and a gzip header over text that is not deflate.
        bodies = [_raw(client, _stages_url(box, cid))[1] for cid in targets]
        assert any(b.startswith(b"\x1f\x8b") for b in bodies) and any(b.startswith(b"{") for b in bodies)


def test_deep_nesting_is_really_100k_levels(client: httpx.Client) -> None:
    data = _data()
    cid = data.call_ids[3]
    with Sandbox(data, SandboxOptions(api_key=KEY, hostile_calls={cid: "deep_nesting"})) as box:
        response, body = _raw(client, _stages_url(box, cid))
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    assert body.startswith(b'{"next": null, "previous": null, "results": [')
    assert body.count(b"[") == body.count(b"]") == 100_001
    assert _depth(body) == 100_002  # the page object, results, then 100,000 nested lists


def test_deep_voice_holds_600_nested_lists_in_a_normal_page(client: httpx.Client) -> None:
    data = _data()
    cid = _with_stages(data, 2)[0]
    with Sandbox(data, SandboxOptions(api_key=KEY, hostile_calls={cid: "deep_voice"})) as box:
        page = client.get(_stages_url(box, cid), params={"pageSize": 50}).json()
        assert box.served_stages(cid) == page["results"]
    expected = data.stages_for(cid)
    first = page["results"][0]
    body = first["externalVoice"]["generic"]["body"]
    levels = 0
    while isinstance(body, list):
        assert len(body) == 1
        levels, body = levels + 1, body[0]
    assert levels == 600 and body == "{text}"
    assert list(first["externalVoice"]) == ["generic"] and "url" in first["externalVoice"]["generic"]
    assert {k: v for k, v in first.items() if k != "externalVoice"} == {
        k: v for k, v in expected[0].items() if k != "externalVoice"}
    assert page["results"][1:] == expected[1:] and page["total"] == len(expected)


def test_lone_surrogate_is_sent_as_the_six_character_escape(client: httpx.Client) -> None:
    data = _data()
    cid = _with_stages(data)[1]
    with Sandbox(data, SandboxOptions(api_key=KEY, hostile_calls={cid: "lone_surrogate"})) as box:
        _, body = _raw(client, _stages_url(box, cid), pageSize=50)
        served = box.served_stages(cid)
    body.decode("utf-8")  # everything else is valid UTF-8
    lone = re.findall(rb"\\ud800(?!\\ud[c-f])", body)
    assert len(lone) == 4  # systemPrompt, voice, an initialState key and its value
    first = json.loads(body)["results"][0]
    assert "\ud800" in first["systemPrompt"] and first["voice"] == "Jessica\ud800"
    assert first["initialState"]["note\ud800"] == "x\ud800y"
    assert first["systemPrompt"].startswith(data.stages_for(cid)[0]["systemPrompt"] or "")
    assert json.loads(body)["results"] == served


def _read_head(sock: socket.socket) -> tuple[dict[str, str], bytes]:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the headers"
        buffer += chunk
    head, rest = buffer.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200")
    return {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}, rest


def _open_slow(box: Sandbox, call_id: str) -> tuple[socket.socket, dict[str, str], bytes]:
    host, port = box.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    request = f"GET /api/calls/{call_id}/stages HTTP/1.1\r\nHost: {host}:{port}\r\nX-API-Key: {KEY}\r\n\r\n"
    sock.sendall(request.encode())
    headers, body = _read_head(sock)
    if not body:
        body = sock.recv(65536)
    return sock, headers, body


def test_slow_body_trickles_one_byte_at_a_time() -> None:
    data = _data()
    cid = _with_stages(data)[0]
    options = SandboxOptions(api_key=KEY, hostile_calls={cid: "slow_body"}, slow_body_interval=60)
    with Sandbox(data, options) as box:
        sock, headers, first = _open_slow(box, cid)
        with sock:
            assert int(headers["content-length"]) > 100
            assert first == b"{"  # one byte, and with a minute's pacing nothing else yet
            assert select.select([sock], [], [], 0.3)[0] == []
        # The server notices the hang-up and ends the answer without waiting for the next byte.
        assert eventually(lambda: box.stats.in_flight == 0)
    # With fast pacing the full page arrives, and it is the normal page.
    fast = SandboxOptions(api_key=KEY, hostile_calls={cid: "slow_body"}, slow_body_interval=0.0001)
    with Sandbox(data, fast) as box:
        page = httpx.get(_stages_url(box, cid), headers={"X-API-Key": KEY}, timeout=60).json()
    assert page["results"] == data.stages_for(cid)[:10]


def test_stopping_with_a_slow_body_in_flight_returns_promptly() -> None:
    data = _data()
    cid = _with_stages(data)[0]
    box = Sandbox(data, SandboxOptions(api_key=KEY, hostile_calls={cid: "slow_body"}, slow_body_interval=60)).start()
    sock, headers, first = _open_slow(box, cid)
    with sock:
        assert len(first) == 1
        stopper = threading.Thread(target=box.stop, daemon=True)
        stopper.start()
        stopper.join(timeout=15)
        assert not stopper.is_alive(), "Sandbox.stop() hung on a slow body"
        received = first
        while chunk := sock.recv(65536):  # the server hangs up instead of trickling on
            received += chunk
        assert len(received) < int(headers["content-length"])
    assert eventually(lambda: box.stats.in_flight == 0), "the slow answer kept going after stop()"


def test_reused_stage_id_repeats_another_calls_stage(client: httpx.Client) -> None:
    data = _data(n_calls=80)
    options = SandboxOptions(api_key=KEY, hostile=("reused_stage_id",), hostile_share=0.15)
    with Sandbox(data, options) as box:
        victims = box.hostile_calls()
        assert victims and set(victims.values()) == {"reused_stage_id"}
        owners = {sid: cid for cid in data.call_ids for sid in data.stage_ids_for(cid)}
        for cid in victims:
            served = client.get(_stages_url(box, cid), params={"pageSize": 50}).json()["results"]
            expected = data.stages_for(cid)
            reused = served[0]["callStageId"]
            donor = owners[reused]
            assert donor != cid and donor not in victims and reused != expected[0]["callStageId"]
            assert served[1:] == expected[1:] and served[0]["callId"] == cid
            # The donor serves that same id under its own call id.
            donor_page = client.get(_stages_url(box, donor), params={"pageSize": 50}).json()["results"]
            assert reused in [s["callStageId"] for s in donor_page]
            assert box.served_stage_ids(cid) == [s["callStageId"] for s in served]


def test_echo_key_echoes_the_key_it_received(client: httpx.Client) -> None:
    data = _data()
    cid, normal = data.call_ids[2], data.call_ids[4]
    with Sandbox(data, SandboxOptions(api_key=KEY, hostile_calls={cid: "echo_key"})) as box:
        r = client.get(_stages_url(box, cid))
        assert r.status_code == 500 and r.json() == {"detail": f"Invalid request for key {KEY}"}
        assert client.get(_stages_url(box, cid)).status_code == 500  # every attempt: transient forever
        wrong = httpx.get(_stages_url(box, cid), headers={"X-API-Key": "uvx-wrong-key-77"})
        assert wrong.status_code == 403 and "uvx-wrong-key-77" in wrong.json()["detail"]
        bearer = httpx.get(_stages_url(box, cid), headers={"Authorization": "Bearer uvx-bearer-88"})
        assert bearer.status_code == 401 and "uvx-bearer-88" in bearer.json()["detail"]
        # Other calls keep the usual bodies.
        assert httpx.get(_stages_url(box, normal), headers={"X-API-Key": "x"}).json() == {"detail": "Invalid API key."}
        assert client.get(_stages_url(box, normal)).status_code == 200


def test_secret_shapes_hide_planted_secrets_everywhere(client: httpx.Client) -> None:
    data = _data(n_calls=60)
    multi, single = _with_stages(data, 2)[0], next(c for c in data.call_ids if data.stage_count(c) == 1)
    options = SandboxOptions(api_key=KEY, hostile_calls={multi: "secret_shapes", single: "secret_shapes"})
    planted = planted_secrets(data, options)
    with Sandbox(data, options) as box:
        found: set[str] = set()
        for cid in (multi, single):
            _, body = _raw(client, _stages_url(box, cid), pageSize=50)
            found |= set(MARKER.findall(body.decode()))
            stages = json.loads(body)["results"]
            _assert_every_shape(stages)
        listed = {c["callId"]: c for page in _listing_pages(client, box) for c in page}
        found |= {m for c in listed.values() for m in MARKER.findall(json.dumps(c))}
    for cid in (multi, single):
        authorization = listed[cid]["externalVoice"]["generic"]["headers"]["Authorization"]
        assert MARKER.search(authorization)
    assert all("externalVoice" not in c for cid, c in listed.items() if cid not in (multi, single))
    assert found == planted and len(planted) > 20
    assert all(m.startswith(PLANTED_SECRET_PREFIX) for m in planted)


def _listing_pages(client: httpx.Client, box: Sandbox) -> Iterator[list[dict]]:
    url = f"{box.base_url}/api/calls?pageSize=50"
    while url:
        page = client.get(url).json()
        yield page["results"]
        url = page["next"]


def _assert_every_shape(stages: list[dict]) -> None:
    first = stages[0]
    generic = first["externalVoice"]["generic"]
    assert MARKER.search(generic["Headers"]["Authorization"]) and MARKER.search(generic["HEADERS"]["X-Api-Key"])
    assert isinstance(generic["headers"], list) and MARKER.search(json.dumps(generic["headers"]))
    assert MARKER.search(generic["request"]["headers"]["Authorization"])
    assert isinstance(first["voiceOverrides"], list) and MARKER.search(json.dumps(first["voiceOverrides"]))
    unknown = next(s["externalVoice"]["acmeTts"] for s in stages if "acmeTts" in (s.get("externalVoice") or {}))
    assert MARKER.search(unknown["transport"]["http"]["headers"]["X-Acme-Key"])
    places = {path[-1]: path for path, value in _paths(stages) if isinstance(value, str) and MARKER.search(value)}
    for name in ("authorizationHeader", "privateKeyPem", "clientSecretValue", "apiKey", "token"):
        assert name in places, name
    buried = [places[n] for n in ("authorizationHeader", "privateKeyPem", "clientSecretValue", "apiKey", "token")]
    assert any(any(isinstance(step, int) for step in path) for path in buried)  # inside lists too
    assert any(len(path) >= 8 for path in buried)  # at some depth


def test_huge_pages_are_400_pages_of_2mb_built_on_request(client: httpx.Client) -> None:
    data = _data()
    cid = data.call_ids[0]
    with Sandbox(data, SandboxOptions(api_key=KEY, hostile_calls={cid: "huge_pages"})) as box:
        first = client.get(_stages_url(box, cid), params={"pageSize": 100})
        page = first.json()
        assert page["total"] == 400 and len(page["results"]) == 1
        assert 1_900_000 <= len(first.content) <= 2_200_000 < 64 * 1024 * 1024
        assert page["next"] and page["previous"] is None
        second = client.get(page["next"]).json()
        ids = box.served_stage_ids(cid)
        assert len(ids) == len(set(ids)) == 400
        assert [page["results"][0]["callStageId"], second["results"][0]["callStageId"]] == ids[:2]
        tracemalloc.start()
        try:
            for offset in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11):
                assert len(client.get(_stages_url(box, cid), params={"cursor": _cursor(offset)}).content) > 1_900_000
            gc.collect()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert held < 8_000_000  # twenty megabytes served, none of it kept
        last = client.get(_stages_url(box, cid), params={"cursor": _cursor(399)}).json()
        assert last["next"] is None and last["results"][0]["callStageId"] == ids[399]
        assert client.get(_stages_url(box, data.call_ids[1])).json()["total"] == data.stage_count(data.call_ids[1])


def _cursor(offset: int) -> str:
    import base64

    return base64.urlsafe_b64encode(str(offset).encode()).decode().rstrip("=")


# --------------------------------------------------------------------------- choice and determinism


def _first_pages(app: SandboxApp) -> dict[str, tuple[int, str | None, bytes]]:
    """Every call's first stages page as sent, asked of the app itself (no socket needed to compare answers)."""
    pages = {}
    with httpx.Client(transport=httpx.MockTransport(app.handler), headers={"X-API-Key": KEY}) as client:
        for cid in app.data.call_ids:
            if app.hostile_kind(cid) in ("slow_body", "huge_pages"):
                continue
            response, body = _raw(client, f"http://sandbox.test/api/calls/{cid}/stages")
            pages[cid] = (response.status_code, response.headers.get("content-encoding"), body)
    return pages


def test_share_is_deterministic_and_leaves_other_calls_untouched() -> None:
    every = tuple(sorted(HOSTILE_KINDS))
    options = dict(api_key=KEY, hostile=every, hostile_share=0.2, next_base_url="http://127.0.0.1:9")
    a, b = SandboxApp(_data(300), SandboxOptions(**options)), SandboxApp(_data(300), SandboxOptions(**options))
    picked = a.hostile_calls()
    assert picked == b.hostile_calls()
    assert 30 <= len(picked) <= 90 and set(picked.values()) == HOSTILE_KINDS
    assert _first_pages(a) == _first_pages(b)
    normal = _first_pages(SandboxApp(_data(300), SandboxOptions(api_key=KEY, next_base_url="http://127.0.0.1:9")))
    served = _first_pages(SandboxApp(_data(300), SandboxOptions(**options)))
    untouched = [cid for cid in normal if cid not in picked]
    assert len(untouched) >= 200 and all(served[cid] == normal[cid] for cid in untouched)
    assert all(served[cid] != normal[cid] for cid in picked if cid in served)
    other_seed = SandboxApp(_data(300), SandboxOptions(**options, fault_seed=1)).hostile_calls()
    assert other_seed != picked


def test_explicit_calls_win_over_the_share() -> None:
    data = _data(100)
    share = Sandbox(data, SandboxOptions(hostile=("deep_nesting",), hostile_share=1.0))
    target = _with_stages(data)[0]
    assert share.hostile_kind(target) == "deep_nesting"
    both = Sandbox(data, SandboxOptions(hostile=("deep_nesting",), hostile_share=1.0, hostile_calls={target: "echo_key"}))
    assert both.hostile_kind(target) == "echo_key" and both.hostile_kind(data.call_ids[-1]) == "deep_nesting"
    assert Sandbox(data, SandboxOptions(hostile_calls={target: "echo_key"})).hostile_calls() == {target: "echo_key"}
    # Kinds that change stage contents skip calls without stages.
    voice = Sandbox(data, SandboxOptions(hostile=("deep_voice",), hostile_share=1.0)).hostile_calls()
    assert set(voice) == set(_with_stages(data))


# --------------------------------------------------------------------------- big prompts


def test_big_prompts_are_deterministic_prose_and_change_nothing_else() -> None:
    big, again, plain = _data(400, 2, big_prompts=True), _data(400, 2, big_prompts=True), _data(400, 2)
    stages = [s for c in big.call_ids for s in big.stages_for(c)]
    sizes = [len((s.get("systemPrompt") or "").encode()) for s in stages]
    assert 0.18 <= sum(n >= 100_000 for n in sizes) / len(sizes) <= 0.32
    huge_calls = [c for c in big.call_ids if any(len(s.get("systemPrompt") or "") >= 1_000_000 for s in big.stages_for(c))]
    assert 1 <= len(huge_calls) <= 12
    sample = next(s["systemPrompt"] for s in stages if len(s.get("systemPrompt") or "") >= 100_000)
    assert "## Section 2" in sample and "Always confirm the caller's account number" in sample
    ignored = {"systemPrompt", "initialTokenCount", "latestTokenCount"}
    for cid in big.call_ids[:120]:
        assert big.stages_for(cid) == again.stages_for(cid)
        pairs = zip(big.stages_for(cid), plain.stages_for(cid), strict=True)
        assert all({k: v for k, v in a.items() if k not in ignored} == {k: v for k, v in b.items() if k not in ignored}
                   for a, b in pairs)


def test_huge_prompt_calls_are_lazy_served_and_not_cached(client: httpx.Client) -> None:
    tracemalloc.start()
    try:
        data = SyntheticData(n_calls=25_000, seed=4, huge_prompt_calls=2)
        chosen = data.huge_prompt_call_ids()
        built, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(chosen) == 2 and built < 40_000_000  # no 60 MB prompt exists yet
    assert chosen == SyntheticData(n_calls=25_000, seed=4, huge_prompt_calls=2).huge_prompt_call_ids()
    cid = chosen[0]
    with Sandbox(data, SandboxOptions(api_key=KEY)) as box:
        tracemalloc.start()
        try:
            for _ in range(2):
                response = client.get(_stages_url(box, cid), params={"pageSize": 1})
                assert response.status_code == 200 and len(response.content) >= 60 * 1024 * 1024
                first = response.json()["results"][0]
                assert len(first["systemPrompt"]) >= 60 * 1024 * 1024 and first["callId"] == cid
                del response, first
            gc.collect()  # the client's response objects sit in reference cycles
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert held < 30_000_000  # neither the prompt nor its page stayed in a cache


# --------------------------------------------------------------------------- out of process


def test_sandbox_process_forwards_hostile_and_prompt_options(client: httpx.Client) -> None:
    data = _data(20, 3, big_prompts=True)
    echo = _with_stages(data)[0]
    options = dict(hostile=("deep_nesting",), hostile_share=0.3, hostile_calls={echo: "echo_key"})
    in_process = Sandbox(data, SandboxOptions(api_key=KEY, **options))
    deep = next(c for c, k in in_process.hostile_calls().items() if k == "deep_nesting")
    normal = next(c for c in _with_stages(data) if in_process.hostile_kind(c) is None)
    with SandboxProcess(n_calls=20, seed=3, api_key=KEY, big_prompts=True, **options) as box:
        url = f"{box.base_url}/api/calls/{{}}/stages"
        r = client.get(url.format(echo))
        assert r.status_code == 500 and r.json() == {"detail": f"Invalid request for key {KEY}"}
        _, body = _raw(client, url.format(deep))
        assert _depth(body) == 100_002
        assert client.get(url.format(normal), params={"pageSize": 50}).json()["results"] == data.stages_for(normal)
    with pytest.raises(ValueError):
        SandboxProcess(hostile=("nonsense",))


def test_hostile_answers_reach_in_process_clients_as_on_the_socket() -> None:
    data = _data()
    gzip_call, echo_call, normal = _with_stages(data)[:3]
    app = SandboxApp(data, SandboxOptions(api_key=KEY, hostile_calls={gzip_call: "corrupt_gzip", echo_call: "echo_key"}))
    assert app.hostile_calls() == {gzip_call: "corrupt_gzip", echo_call: "echo_key"}
    with httpx.Client(transport=httpx.MockTransport(app.handler), headers={"X-API-Key": KEY}) as c:
        with pytest.raises(httpx.DecodingError):
            c.get(f"http://sandbox.test/api/calls/{gzip_call}/stages")
        echoed = c.get(f"http://sandbox.test/api/calls/{echo_call}/stages")
        assert echoed.status_code == 500 and KEY in echoed.json()["detail"]
        page = c.get(f"http://sandbox.test/api/calls/{normal}/stages").json()
    assert page["results"] == app.served_stages(normal)[:10] == data.stages_for(normal)[:10]

import asyncio
import email.utils
import time

import httpx
import pytest
from conftest import KEY

from pipeline.config import Settings
from pipeline.errors import AuthError, CallError, InsecureURLError, TransientError
from pipeline.http import (
    RETRYABLE,
    OriginKeyAuth,
    SpreadTransport,
    api_client,
    DeadlineExceeded,
    InvalidJSONError,
    check_base_url,
    classify,
    decode_json,
    is_outage,
    is_transient,
    parse_retry_after,
    read_body,
)

S = Settings(retry_after_max_seconds=60, retry_after_min_seconds=0.05)
URL = "https://api.ultravox.ai/api/calls/x/stages"


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("3", S) == 3
    assert parse_retry_after("0", S) == 0.05  # 0 → a small minimum, never a hot loop
    assert parse_retry_after("100000", S) == 60  # capped
    now = time.time()
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert 8 <= parse_retry_after(date, S, now=now) <= 10.5
    past = email.utils.formatdate(now - 100, usegmt=True)
    assert parse_retry_after(past, S, now=now) == 0.05
    assert parse_retry_after("soon", S) is None
    assert parse_retry_after(None, S) is None


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_statuses(status):
    with pytest.raises(TransientError) as err:
        classify(status, httpx.Headers({"Retry-After": "2"}), b"", URL, S)
    assert is_transient(err.value)
    assert err.value.retry_after == 2


@pytest.mark.parametrize("status", [401, 403])
def test_auth_statuses_stop(status):
    with pytest.raises(AuthError) as err:
        classify(status, httpx.Headers(), b'{"detail": "Invalid API key."}', URL, S)
    assert err.value.exit_code == 3
    assert not is_transient(err.value)
    assert "Invalid API key." in str(err.value)


@pytest.mark.parametrize("status", [400, 301, 410])
def test_other_errors_are_not_retried(status):
    with pytest.raises(CallError) as err:
        classify(status, httpx.Headers(), b"<html>", URL, S)
    assert not is_transient(err.value)


def test_ok_and_not_found():
    assert classify(200, httpx.Headers(), b"{}", URL, S) == "ok"
    assert classify(404, httpx.Headers(), b"{}", URL, S) == "not_found"


def test_network_errors_are_transient():
    assert is_transient(httpx.ConnectError("x"))
    assert is_transient(httpx.ReadTimeout("x"))
    assert is_transient(httpx.RemoteProtocolError("x"))
    assert is_transient(httpx.DecodingError("x"))  # a body that is not its Content-Encoding
    assert not is_transient(ValueError("x"))
    assert not is_transient(httpx.InvalidURL("x"))
    assert not is_transient(httpx.LocalProtocolError("x"))  # what we would send: the same next time
    assert not is_transient(httpx.UnsupportedProtocol("x"))


def test_retryable_statuses_are_declared_once():
    assert RETRYABLE.statuses == {429, 500, 502, 503, 504}
    for status in range(400, 600):
        raised = None
        try:
            classify(status, httpx.Headers(), b"", URL, S)
        except Exception as exc:  # noqa: BLE001
            raised = exc
        assert (raised is not None and is_transient(raised)) == (status in RETRYABLE.statuses), status


def test_outage_means_the_api_is_not_answering():
    assert is_outage(httpx.ConnectError("x")) and is_outage(httpx.ReadTimeout("x"))
    assert is_outage(TransientError("HTTP 503", status=503)) and is_outage(DeadlineExceeded("late"))
    assert not is_outage(TransientError("HTTP 429", status=429))
    assert not is_outage(InvalidJSONError("bad", "d")) and not is_outage(httpx.DecodingError("x"))
    assert not is_outage(CallError("HTTP 400")) and not is_outage(httpx.LocalProtocolError("x"))


@pytest.mark.parametrize("body", [b"", b"<html>oops</html>", b'{"results": [', b"\xff\xfe"])
def test_bad_json_is_transient(body):
    with pytest.raises(TransientError):
        decode_json(body)


def test_too_deep_json_is_not_transient():
    with pytest.raises(CallError) as err:
        decode_json(b"[" * 100_000)
    assert not is_transient(err.value) and "nested deeper than 200" in str(err.value)


def test_same_bad_body_same_digest():
    digests = set()
    for body in (b'{"a": [', b'{"a": [', b'{"a": [1'):
        with pytest.raises(InvalidJSONError) as err:
            decode_json(body)
        digests.add(err.value.digest)
    assert len(digests) == 2


def test_401_says_whether_a_key_was_sent():
    with pytest.raises(AuthError, match="API key rejected by api.ultravox.ai"):
        classify(401, httpx.Headers(), b"{}", URL, S, key_sent=True)
    with pytest.raises(AuthError, match="no API key was sent to api.ultravox.ai"):
        classify(401, httpx.Headers(), b"{}", URL, S, key_sent=False)


def test_detail_is_one_short_line():
    body = ('{"detail": "line one\\r\\nline two\\u0000' + "x" * 1000 + '"}').encode()
    with pytest.raises(CallError) as err:
        classify(400, httpx.Headers(), body, URL, S)
    assert "\n" not in str(err.value) and "\x00" not in str(err.value) and len(str(err.value)) < 300


def test_insecure_http_refused_except_loopback():
    check_base_url("http://127.0.0.1:8000", False)
    check_base_url("http://localhost:8000", False)
    check_base_url("https://api.ultravox.ai", False)
    with pytest.raises(InsecureURLError) as err:
        check_base_url("http://api.example.com", False)
    assert err.value.exit_code == 2
    check_base_url("http://api.example.com", True)


def sent_headers(api_key, urls):
    """The X-API-Key each URL's GET carried, through the real client (auth flow included)."""
    seen = []

    def handler(request):
        seen.append(request.headers.get("X-API-Key"))
        return httpx.Response(200)

    async def get():
        settings = Settings(base_url="https://api.ultravox.ai")
        async with api_client(settings, api_key, httpx.MockTransport(handler)) as client:
            for url in urls:
                await client.get(url)
            return client

    client = asyncio.run(get())
    return seen, client


def test_key_only_sent_to_origin():
    urls = (
        "https://api.ultravox.ai/api/calls",
        "https://api.ultravox.ai:443/api/calls?x=1",  # :443 is the same origin
        "https://evil.example.com/api/calls",
        "http://api.ultravox.ai/api/calls",  # other scheme = other origin
        "https://api.ultravox.ai:8443/api/calls",  # other port = other origin
        "https://api.ultravox.ai.evil.example.com/api/calls",  # a suffix is another host
    )
    seen, client = sent_headers("sk-secret", urls)
    assert seen == ["sk-secret", "sk-secret", None, None, None, None]
    assert "sk-secret" not in repr(client.auth) and "sk-secret" not in repr(client)
    assert sent_headers(None, urls[:1])[0] == [None]


def test_client_ignores_proxy_environment(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent")
    seen, client = sent_headers("k", ["https://api.ultravox.ai/api/calls"])
    assert seen == ["k"] and client.trust_env is False and client.follow_redirects is False
    assert isinstance(client.auth, OriginKeyAuth)


def test_session_sends_our_headers_and_never_follows_redirects():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(302, headers={"Location": "https://evil.example.com/x"})

    async def get():
        settings = Settings(base_url="https://api.ultravox.ai", timeout_seconds=7)
        async with api_client(settings, "k", httpx.MockTransport(handler)) as client:
            async with client.stream("GET", "https://api.ultravox.ai/api/calls") as response:
                return response.status_code

    assert asyncio.run(get()) == 302 and len(seen) == 1
    headers = seen[0].headers
    assert headers["x-api-key"] == "k" and headers["accept"] == "application/json"
    assert headers["user-agent"].startswith("ultravox-stages/") and headers["host"] == "api.ultravox.ai"
    assert seen[0].extensions["timeout"]["read"] == 7


@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_read_body_plain_or_gzip(encoding):
    import gzip

    payload = b'{"results": []}' * 100
    body = gzip.compress(payload) if encoding else payload
    headers = {"Content-Encoding": encoding} if encoding else {}

    async def read():
        settings = Settings(base_url="https://api.ultravox.ai")
        transport = httpx.MockTransport(lambda request: httpx.Response(200, headers=headers, content=body))
        async with api_client(settings, "k", transport) as client:
            async with client.stream("GET", "https://api.ultravox.ai/api/calls") as response:
                return await read_body(response, 10_000)

    assert asyncio.run(read()) == payload


def test_read_body_cap_names_its_setting():
    async def read(limit):
        settings = Settings(base_url="https://api.ultravox.ai")
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=b"x" * 5000))
        async with api_client(settings, "k", transport) as client:
            async with client.stream("GET", "https://api.ultravox.ai/api/calls") as response:
                return await read_body(response, limit)

    with pytest.raises(CallError, match="response exceeds max_response_bytes"):
        asyncio.run(read(1000))
    assert len(asyncio.run(read(5000))) == 5000


def test_spread_transport_reuses_one_warm_connection_per_request_in_flight(start_sandbox):
    box = start_sandbox(n_calls=20, latency_ms=5)
    settings = Settings(base_url=box.base_url, concurrency=4)
    urls = [f"{box.base_url}/api/calls/{call_id}/stages?pageSize=100" for call_id in box.data.call_ids] * 3

    async def get_all():
        async with api_client(settings, KEY) as client:
            spread = client._transport
            assert isinstance(spread, SpreadTransport)

            async def one(url):
                async with client.stream("GET", url) as response:
                    body = await read_body(response, 10_000_000)
                    return response.status_code, decode_json(body)

            results = []
            for start in range(0, len(urls), 4):  # four in flight at a time
                results += await asyncio.gather(*(one(url) for url in urls[start : start + 4]))
            idle = len(spread._idle)
            connections = [len(pool._pool.connections) for pool in spread._pools]
        return results, idle, connections

    results, idle, connections = asyncio.run(get_all())
    assert [status for status, _ in results] == [200] * 60
    assert all(isinstance(page["results"], list) for _, page in results)
    assert idle == 4 and connections == [1, 1, 1, 1]  # every pool handed back, each keeping its connection


def test_spread_transport_hands_a_pool_back_when_the_request_fails():
    spread = SpreadTransport(2)

    async def scenario():
        for _ in range(3):  # nothing listens on port 9 of 127.0.0.1
            with pytest.raises(httpx.ConnectError):
                await spread.handle_async_request(httpx.Request("GET", "http://127.0.0.1:9/api/calls"))
        await spread.aclose()

    asyncio.run(scenario())
    assert len(spread._idle) == 2

import asyncio
import email.utils
import time

import httpx
import pytest

from pipeline.config import Settings
from pipeline.errors import AuthError, CallError, InsecureURLError, TransientError
from pipeline.http import ApiSession, check_base_url, classify, decode_json, is_transient, parse_retry_after, read_body

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
    assert not is_transient(ValueError("x"))


@pytest.mark.parametrize("body", [b"", b"<html>oops</html>", b'{"results": [', b"\xff\xfe"])
def test_bad_json_is_transient(body):
    with pytest.raises(TransientError):
        decode_json(body)


def test_insecure_http_refused_except_loopback():
    check_base_url("http://127.0.0.1:8000", False)
    check_base_url("http://localhost:8000", False)
    check_base_url("https://api.ultravox.ai", False)
    with pytest.raises(InsecureURLError) as err:
        check_base_url("http://api.example.com", False)
    assert err.value.exit_code == 2
    check_base_url("http://api.example.com", True)


def test_key_only_sent_to_origin():
    session = ApiSession(Settings(base_url="https://api.ultravox.ai"), "sk-secret")
    seen = {url: session.build_request(url).headers.get("X-API-Key") for url in (
        "https://api.ultravox.ai/api/calls",
        "https://api.ultravox.ai:443/api/calls?x=1",  # :443 is the same origin
        "https://evil.example.com/api/calls",
        "http://api.ultravox.ai/api/calls",  # other scheme = other origin
        "https://api.ultravox.ai:8443/api/calls",  # other port = other origin
    )}
    assert list(seen.values()) == ["sk-secret", "sk-secret", None, None, None]
    assert "sk-secret" not in repr(session)


def test_session_sends_our_headers_and_never_follows_redirects():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(302, headers={"Location": "https://evil.example.com/x"})

    async def get():
        settings = Settings(base_url="https://api.ultravox.ai", timeout_seconds=7)
        async with ApiSession(settings, "k", transport=httpx.MockTransport(handler)) as session:
            async with session.stream("https://api.ultravox.ai/api/calls") as response:
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
        async with ApiSession(settings, "k", transport=transport) as session:
            async with session.stream("https://api.ultravox.ai/api/calls") as response:
                return await read_body(response, 10_000)

    assert asyncio.run(read()) == payload

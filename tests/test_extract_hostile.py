"""Hostile answers fail their own call only; the other calls of the batch load normally.

Every test runs a batch of three calls through ``extract_calls`` over an
``httpx.MockTransport``: C1 and C3 answer normally (two pages each), C2 answers the
hostile way under test.
"""

import asyncio
import gzip
import json

import httpx
import pytest

from pipeline import jsonio
from pipeline.config import Settings
from pipeline.errors import AuthError, StagesError, UnreachableError, UsageError
from pipeline.extract import Extractor, RunAborted, extract_calls, list_endpoint
from pipeline.http import api_client, check_api_key, check_base_url

BASE = "https://api.test"
KEY = "uvx-hostile-5b2e91-DO-NOT-LEAK"
FAST = dict(
    base_url=BASE, concurrency=3, page_size=2, max_rps=10_000, backoff_initial_seconds=0.001,
    backoff_max_seconds=0.002, retry_after_min_seconds=0.001, retry_after_max_seconds=0.002, max_attempts=3,
)
C1, C2, C3 = (f"00000000-0000-4000-8000-00000000000{i}" for i in (1, 2, 3))


class Chunks(httpx.AsyncByteStream):
    """A body sent in pieces, with a pause before each piece after the first."""

    def __init__(self, pieces, pause=0.0):
        self.pieces, self.pause = list(pieces), pause

    async def __aiter__(self):
        for i, piece in enumerate(self.pieces):
            if i and self.pause:
                await asyncio.sleep(self.pause)
            yield piece


def stages(call_id, n, **extra):
    return [{"callId": call_id, "callStageId": f"{call_id[:-4]}{i:04d}", "errorCount": 0, **extra} for i in range(n)]


def good_page(request, n=3):
    call_id = request.url.path.split("/")[3]
    offset = int(request.url.params.get("cursor", 0))
    nxt = f"{BASE}/api/calls/{call_id}/stages?cursor={offset + 2}" if offset + 2 < n else None
    body = json.dumps({"next": nxt, "results": stages(call_id, n)[offset : offset + 2], "total": n}).encode()
    return httpx.Response(200, content=body)


def call_of(request):
    return request.url.path.split("/")[3]


def run(hostile, ids=(C1, C2, C3), key=KEY, **overrides):
    """Fetch ``ids``; C2's requests are answered by ``hostile(request)``. Returns the
    CallFetch per call, the requests per call and the body bytes sent per call."""
    settings = Settings(**(FAST | overrides))
    out, requests, sent = {}, {}, {}

    async def handler(request):
        call_id = call_of(request)
        requests[call_id] = requests.get(call_id, 0) + 1
        if call_id == C2:
            answer = hostile(request)
            return await answer if asyncio.iscoroutine(answer) else answer
        response = good_page(request)
        sent[call_id] = sent.get(call_id, 0) + len(response.content)
        return response

    async def sink(fetch):
        assert fetch.call_id not in out
        out[fetch.call_id] = fetch

    asyncio.run(extract_calls(list(ids), settings, key, sink, transport=httpx.MockTransport(handler)))
    return out, requests, sent


def assert_others_loaded(out, sent):
    for call_id in (C1, C3):
        fetch = out[call_id]
        assert fetch.status == "loaded" and fetch.error is None
        assert [s["callStageId"] for s in fetch.stages()] == [s["callStageId"] for s in stages(call_id, 3)]
        assert fetch.nbytes == sent[call_id] and len(fetch.pages) == 2


def assert_failed(fetch, *words):
    assert fetch.status == "failed" and fetch.pages == [] and fetch.nbytes == 0
    assert "\n" not in fetch.error and len(fetch.error) <= 300
    for word in words:
        assert word in fetch.error


# -- invalid `next` links: not a valid URL, not retried, the same next run


@pytest.mark.parametrize(
    "next_link",
    [
        "http://[::1/api/calls/x/stages?cursor=2",
        "https://xn--/api/calls/x/stages?cursor=2",
        "http://xn--/api/calls/x/stages?cursor=2",
        "https://xn--a/api/calls/x/stages?cursor=2",
        f"{BASE}/api/calls/{C2}/stages?cursor=\x002",
        f"{BASE}/api/calls/{C2}/st\tages?cursor=2",
        f"/api/calls/{C2}/stages?cursor=\t2",
        "https://api.te\x00st/api/calls/x/stages",
    ],
)
def test_invalid_next_link_fails_its_call_once(next_link):
    def hostile(request):
        return httpx.Response(200, json={"next": next_link, "results": stages(C2, 2)})

    out, requests, sent = run(hostile)
    assert_failed(out[C2], "next link is not a valid URL")
    assert requests[C2] == 1  # the page was fine; its link is what is wrong: nothing to retry
    assert_others_loaded(out, sent)
    again, _, _ = run(hostile)
    assert again[C2].error == out[C2].error


def test_invalid_next_link_of_a_listing_is_one_line_run_error():
    def handler(request):
        return httpx.Response(200, json={"next": "http://[::1/api/calls?cursor=2", "results": [{"callId": C1}]})

    settings = Settings(**FAST)
    with pytest.raises(StagesError) as err:
        asyncio.run(list_endpoint(settings, KEY, "/api/calls", {}, transport=httpx.MockTransport(handler)))
    assert not isinstance(err.value, UnreachableError)
    message = str(err.value)
    assert message.startswith("listing /api/calls failed: next link is not a valid URL") and "\n" not in message
    assert "InvalidURL" not in message


def test_too_deep_listing_is_one_line_run_error():
    handler = lambda request: httpx.Response(200, content=b'{"results": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(StagesError) as err:
        asyncio.run(list_endpoint(Settings(**FAST), KEY, "/api/deleted_calls", {}, transport=httpx.MockTransport(handler)))
    assert "nested deeper than 200" in str(err.value)


# -- bodies that cannot be decoded


def test_corrupt_gzip_is_retried_then_fails_its_call():
    def hostile(request):
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Chunks([b"\x1f\x8b not gzip at all"]))

    out, requests, sent = run(hostile)
    assert_failed(out[C2], "Content-Encoding")
    assert requests[C2] == 3 and out[C2].retries == 2  # transient: max_attempts
    assert_others_loaded(out, sent)


def test_corrupt_gzip_once_then_a_good_body_loads():
    answers = iter([b"\x1f\x8b\x08\x00broken", None])

    def hostile(request):
        body = next(answers, None)
        if body is not None:
            return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Chunks([body]))
        payload = json.dumps({"next": None, "results": stages(C2, 1)}).encode()
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Chunks([gzip.compress(payload)]))

    out, requests, sent = run(hostile)
    assert out[C2].status == "loaded" and out[C2].retries == 1 and len(out[C2].stages()) == 1
    assert_others_loaded(out, sent)


def test_100k_deep_json_fails_at_once_without_recursion_error():
    deep = b'{"next": null, "results": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    out, requests, sent = run(lambda request: httpx.Response(200, content=deep))
    assert_failed(out[C2], "nested deeper than 200 levels")
    assert "Recursion" not in out[C2].error and requests[C2] == 1  # the same body fails again: not retried
    assert_others_loaded(out, sent)


def test_600_nested_lists_in_a_voice_fail_the_call():
    voice = {"generic": {"url": "https://tts.example", "body": json.loads("[" * 600 + "]" * 600)}}
    body = json.dumps({"next": None, "results": stages(C2, 1, externalVoice=voice)}).encode()
    out, requests, sent = run(lambda request: httpx.Response(200, content=body))
    assert_failed(out[C2], "nested deeper")
    assert_others_loaded(out, sent)


def test_lone_surrogates_become_replacement_characters_and_the_call_loads():
    body = (
        b'{"next": null, "results": [{"callId": "' + C2.encode() + b'", "callStageId": "s1", '
        b'"systemPrompt": "a\\ud800b", "\\udfffkey": "\\uDBFF", "pair": "\\ud83d\\ude00"}]}'
    )
    out, _, sent = run(lambda request: httpx.Response(200, content=body))
    stage = out[C2].stages()[0]
    assert out[C2].status == "loaded" and out[C2].nbytes == len(body)
    assert stage["systemPrompt"] == "a\ufffdb" and stage["\ufffdkey"] == "\ufffd" and stage["pair"] == "\U0001f600"
    json.dumps(stage, ensure_ascii=False).encode("utf-8")  # writable as UTF-8 anywhere
    assert_others_loaded(out, sent)


def test_the_same_invalid_json_again_and_again_fails_without_using_every_attempt():
    body = b'{"next": null, "results": [{"callId": "x"'
    out, requests, sent = run(lambda request: httpx.Response(200, content=body), max_attempts=6)
    assert_failed(out[C2], "invalid JSON", "the same body 3 times")
    assert requests[C2] == 3
    assert_others_loaded(out, sent)


def test_differently_truncated_json_is_retried_until_a_whole_body():
    full = json.dumps({"next": None, "results": stages(C2, 2)}).encode()
    answers = iter([full[:10], full[:20], full])
    out, requests, sent = run(lambda request: httpx.Response(200, content=next(answers)), max_attempts=6)
    assert out[C2].status == "loaded" and requests[C2] == 3 and out[C2].retries == 2
    assert_others_loaded(out, sent)


# -- time and size


def test_a_body_trickling_one_byte_at_a_time_hits_the_deadline():
    body = json.dumps({"next": None, "results": stages(C2, 1)}).encode()

    def hostile(request):
        return httpx.Response(200, stream=Chunks([body[i : i + 1] for i in range(len(body))], pause=0.2))

    out, requests, sent = run(hostile, request_deadline_seconds=0.5, max_attempts=2)
    assert_failed(out[C2], "request deadline exceeded")
    assert requests[C2] == 2  # transient: retried, then failed
    assert_others_loaded(out, sent)


def test_a_call_whose_pages_exceed_max_call_bytes_fails_without_reading_them_all():
    def hostile(request):
        offset = int(request.url.params.get("cursor", 0))
        rows = [{"callId": C2, "callStageId": f"s{offset}", "systemPrompt": "p" * 1000}]
        return httpx.Response(200, json={"next": f"{BASE}/api/calls/{C2}/stages?cursor={offset + 1}", "results": rows})

    out, requests, sent = run(hostile, max_call_bytes=10_000, max_pages=1000)
    assert_failed(out[C2], "call exceeds max_call_bytes (the 10000-byte cap")
    assert requests[C2] <= 11  # stopped at the cap, not at max_pages
    assert_others_loaded(out, sent)


# -- secrets


def _no_key_anywhere(*things):
    for thing in things:
        for text in (str(thing), repr(thing)):
            assert KEY not in text and KEY[:-4] not in text


def test_a_key_echoed_in_a_500_body_never_reaches_the_call_error():
    body = json.dumps({"detail": f"upstream said: invalid header X-API-Key={KEY}\r\nretry later"}).encode()
    out, requests, sent = run(lambda request: httpx.Response(500, content=body))
    assert_failed(out[C2], "HTTP 500", "<redacted>")
    _no_key_anywhere(out[C2], out[C2].error)
    assert_others_loaded(out, sent)


def test_a_key_echoed_in_an_html_500_body_is_not_kept_at_all():
    out, _, sent = run(lambda request: httpx.Response(500, text=f"<html><pre>X-API-Key: {KEY}</pre></html>"))
    assert_failed(out[C2], "HTTP 500")
    assert "html" not in out[C2].error
    _no_key_anywhere(out[C2])


@pytest.mark.parametrize("status", [401, 403])
def test_a_key_echoed_in_an_auth_failure_says_rejected_without_the_key(status):
    body = json.dumps({"detail": f"Invalid API key {KEY}."}).encode()
    with pytest.raises(AuthError) as err:
        run(lambda request: httpx.Response(status, content=body), ids=[C2])
    message = str(err.value)
    assert f"API key rejected by api.test (HTTP {status}: Invalid API key <redacted>.)" in message
    assert "missing" not in message
    _no_key_anywhere(err.value, err.value.args)


def test_401_without_a_key_says_none_was_sent():
    with pytest.raises(AuthError) as err:
        run(lambda request: httpx.Response(401, json={"detail": "Authentication credentials were not provided."}),
            ids=[C2], key=None)
    assert "no API key was sent to api.test (HTTP 401" in str(err.value)


@pytest.mark.parametrize("bad_key", [KEY + "\r\n", "uvx-\nkey-123", "uvx-key\t123", "uvx-kéy-123", "uvx-key-\u2603"])
def test_keys_that_cannot_be_a_header_are_usage_errors(bad_key):
    with pytest.raises(UsageError) as err:
        check_api_key(bad_key)
    assert err.value.exit_code == 2 and bad_key.strip() not in str(err.value)
    with pytest.raises(UsageError):
        run(lambda request: httpx.Response(500), key=bad_key)


def test_a_plain_key_is_accepted():
    check_api_key(KEY)


@pytest.mark.parametrize(
    "url", ["https://user:hunter2@api.test", "http://user:hunter2@127.0.0.1:8000/", "https://:hunter2@[::1"]
)
def test_base_url_with_userinfo_is_refused_without_echoing_the_password(url):
    with pytest.raises(UsageError) as err:
        check_base_url(url, allow_insecure_http=False)
    assert err.value.exit_code == 2 and "hunter2" not in str(err.value) and "user:password@" in str(err.value)
    with pytest.raises(UsageError):
        api_client(Settings(base_url=url), KEY)


def test_an_exception_nobody_foresaw_fails_its_call_without_its_message():
    def hostile(request):
        raise RuntimeError(f"system prompt: you are a helpful agent {KEY}")

    out, _, sent = run(hostile)
    assert_failed(out[C2], "unexpected RuntimeError")
    assert "prompt" not in out[C2].error
    assert_others_loaded(out, sent)


# -- outage


def test_outage_stops_the_run_and_leaves_untouched_calls_out_of_the_sink():
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(40)]
    answered = {"n": 0}
    sunk = []

    def handler(request):
        if answered["n"] >= 5:
            raise httpx.ConnectError("connection refused")
        answered["n"] += 1
        return httpx.Response(200, json={"next": None, "results": stages(call_of(request), 1)})

    async def sink(fetch):
        sunk.append(fetch)

    settings = Settings(**(FAST | dict(concurrency=2, outage_calls=3, max_attempts=2)))
    with pytest.raises(UnreachableError) as err:
        asyncio.run(extract_calls(ids, settings, KEY, sink, transport=httpx.MockTransport(handler)))
    message = str(err.value)
    assert err.value.exit_code == 3
    assert message.startswith("the API at https://api.test stopped answering (connection error (ConnectError)")
    loaded = [f for f in sunk if f.status == "loaded"]
    failed = [f for f in sunk if f.status == "failed"]
    assert len(loaded) == 5 and 3 <= len(failed) <= 4  # the streak, and at most one more in flight
    assert all("ConnectError" in f.error for f in failed)
    assert f"; {len(ids) - len(sunk)} calls were left for the next run" in message
    # Calls start in order: beyond those sunk, at most the one in flight was started.
    assert {f.call_id for f in sunk} <= set(ids[: len(sunk) + 1])


def test_a_5xx_storm_is_an_outage_too_but_4xx_answers_are_not():
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(12)]
    settings = Settings(**(FAST | dict(concurrency=1, outage_calls=3, max_attempts=2)))
    sunk = []

    async def sink(fetch):
        sunk.append(fetch)

    def storm(request):
        return httpx.Response(503, json={"detail": "down for maintenance"})

    with pytest.raises(UnreachableError) as err:
        asyncio.run(extract_calls(ids, settings, KEY, sink, transport=httpx.MockTransport(storm)))
    assert "(HTTP 503: down for maintenance;" in str(err.value) and len(sunk) == 3
    assert "9 calls were left for the next run" in str(err.value)

    sunk.clear()
    asyncio.run(extract_calls(ids, settings, KEY, sink, transport=httpx.MockTransport(lambda r: httpx.Response(400))))
    assert len(sunk) == 12 and all(f.status == "failed" for f in sunk)


def test_connection_refused_before_any_answer_is_unreachable():
    def handler(request):
        raise httpx.ConnectError("connection refused")

    async def sink(fetch):
        raise AssertionError("no call was fetched")

    with pytest.raises(UnreachableError) as err:
        asyncio.run(extract_calls([C1, C2, C3], Settings(**FAST), KEY, sink, transport=httpx.MockTransport(handler)))
    assert "cannot reach the API at https://api.test" in str(err.value)


def test_stop_cuts_a_retry_backoff_short():
    async def scenario():
        settings = Settings(**(FAST | dict(backoff_initial_seconds=3600, backoff_max_seconds=3600, max_attempts=5)))
        transport = httpx.MockTransport(lambda request: httpx.Response(502))
        async with api_client(settings, KEY, transport) as client:
            extractor = Extractor(settings, client)
            task = asyncio.create_task(extractor.fetch_call(C1))
            while extractor.stats.requests == 0:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)  # now in its first backoff
            extractor.stop()
            with pytest.raises(RunAborted):
                await asyncio.wait_for(task, 30)  # a hang guard: without stop() it would wait an hour
            assert extractor.stats.requests == 1

    asyncio.run(scenario())


# -- jsonio on its own


def test_jsonio_60_mb_string_with_brackets_inside_loads():
    text = "[{" * 30_000_000 + '\\"' * 5 + "\\\\"
    raw = b'{"prompt": "' + text.encode() + b'", "next": [[1]]}'
    assert len(raw) > 60_000_000
    value = jsonio.loads(raw)
    assert len(value["prompt"]) == 60_000_000 + 5 + 1 and value["next"] == [[1]]


@pytest.mark.parametrize("data", [b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, "{\"a\":" * 100_000])
def test_jsonio_100k_deep_is_too_deep(data):
    with pytest.raises(jsonio.JSONTooDeep) as err:
        jsonio.loads(data)
    assert isinstance(err.value, jsonio.JSONError) and isinstance(err.value, ValueError)


def test_jsonio_depth_limit_is_exact_and_ignores_strings():
    assert jsonio.loads(b"[" * 200 + b"]" * 200) is not None
    with pytest.raises(jsonio.JSONTooDeep):
        jsonio.loads(b"[" * 201 + b"]" * 201)
    many = json.dumps([{"a": [{"b": {}}]} for _ in range(10_000)] + ["]]]" * 300, "\\\"[[[" * 300])
    assert len(jsonio.loads(many)) == 10_002


def test_jsonio_lone_surrogates_in_keys_and_values():
    value = jsonio.loads(rb'{"\ud800": ["\uDC00", "ok\ud83d\ude00", "\\ud800 stays text", "\ud800\ud800"]}')
    assert value == {"\ufffd": ["\ufffd", "ok\U0001f600", "\\ud800 stays text", "\ufffd\ufffd"]}
    assert jsonio.loads('["\ud800"]') == ["\ufffd"]  # a str holding a lone surrogate code point
    assert jsonio.loads(b'["\xed\xa0\x80"]') == ["\ufffd"]  # one encoded as UTF-8 bytes


@pytest.mark.parametrize("data", [b"", b"<html>secret prompt</html>", b'{"a": [', b'["\xff"]', b"\xff\xfe"])
def test_jsonio_errors_never_quote_content(data):
    with pytest.raises(jsonio.JSONError) as err:
        jsonio.loads(data)
    assert not isinstance(err.value, jsonio.JSONTooDeep)
    assert "secret" not in str(err.value) and "html" not in str(err.value)


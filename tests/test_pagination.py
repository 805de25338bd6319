"""The one paginator: its guards on its own, and the same guards on every endpoint that pages."""

import asyncio
import json

import httpx
import pytest

from pipeline.config import Settings
from pipeline.errors import OriginError, PaginationError, ResponseTooLargeError, StagesError
from pipeline.extract import extract_calls, list_endpoint
from pipeline.http import origin
from pipeline.pagination import NextLinkPaginator

BASE = "https://api.test"
FIRST = f"{BASE}/api/calls?pageSize=2"
ORIGIN = origin(httpx.URL(BASE))
KEY = "uvx-pagination-9c1d-DO-NOT-LEAK"
FAST = dict(
    base_url=BASE, concurrency=2, page_size=2, max_rps=10_000, backoff_initial_seconds=0.001,
    backoff_max_seconds=0.002, retry_after_min_seconds=0.001, retry_after_max_seconds=0.002, max_attempts=3,
)


def page(next_link, n=2):
    return {"next": next_link, "results": [{"i": i} for i in range(n)]}


def pager(**kw):
    return NextLinkPaginator(FIRST, ORIGIN, kw.pop("max_pages", 100), **kw)


def test_follows_next_until_null_empty_or_missing():
    for last in ({"next": None}, {"next": ""}, {}):
        p = pager()
        assert p.advance(page(f"{BASE}/api/calls?cursor=a"), 10) == [{"i": 0}, {"i": 1}]
        assert p.url == f"{BASE}/api/calls?cursor=a" and not p.finished
        assert p.advance({"results": [], **last}, 5) == [] and p.finished
        assert p.pages == 2 and p.nbytes == 15


def test_relative_next_is_joined_to_the_current_page():
    p = pager()
    p.advance(page("/api/calls?cursor=b"), 1)
    assert p.url == f"{BASE}/api/calls?cursor=b"


@pytest.mark.parametrize(
    "links",
    [
        ["?cursor=a", "?cursor=b", "?cursor=a"],  # a cursor again
        ["?cursor=a&x=1", "?x=2&cursor=a"],  # the same cursor in another URL
        ["?cursor=a", "?pageSize=2"],  # back to the first page, which has no cursor
        ["?cursor=a", "?cursor=a"],  # the page itself
    ],
)
def test_a_repeated_cursor_or_url_is_a_loop(links):
    p = pager()
    with pytest.raises(PaginationError, match="repeats a cursor"):
        for link in links:
            p.advance(page(f"{BASE}/api/calls{link}"), 1)
    assert p.pages == len(links)  # found at the page that links back, not later


@pytest.mark.parametrize(
    "link",
    ["https://evil.example.com/api/calls?cursor=2", "http://api.test/api/calls?cursor=2",
     "https://api.test:8443/api/calls?cursor=2", "//evil.example.com/api/calls?cursor=2"],
)
def test_next_to_another_origin_is_refused(link):
    with pytest.raises(OriginError, match="another host"):
        pager().advance(page(link), 1)


@pytest.mark.parametrize("link", ["http://[::1/x", "https://xn--/x", "https://api.te\x00st/x", "/x?cursor=\t2"])
def test_an_invalid_next_url_is_refused(link):
    with pytest.raises(PaginationError, match="not a valid URL"):
        pager().advance(page(link), 1)


@pytest.mark.parametrize("body", [[], {"results": None}, {"results": {}}, {"next": 3, "results": []}, "x"])
def test_unexpected_page_shapes(body):
    with pytest.raises(PaginationError, match="unexpected page shape"):
        pager().advance(body, 1)


def test_page_cap_stops_before_fetching_one_page_too_many():
    p = pager(max_pages=3)
    p.advance(page(f"{BASE}/api/calls?cursor=1"), 1)
    p.advance(page(f"{BASE}/api/calls?cursor=2"), 1)
    with pytest.raises(PaginationError, match="more than 3 pages"):
        p.advance(page(f"{BASE}/api/calls?cursor=3"), 1)
    last = pager(max_pages=1)
    assert last.advance(page(None), 1) and last.finished  # exactly max_pages pages is fine


def read(p, body, max_response_bytes):
    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
        async with httpx.AsyncClient(transport=transport) as client, client.stream("GET", FIRST) as response:
            return await p.read(response, max_response_bytes)

    return asyncio.run(go())


def test_byte_cap_spans_all_pages():
    p = pager(max_bytes=1000)
    assert len(read(p, b"x" * 600, 10_000)) == 600
    p.advance(page(f"{BASE}/api/calls?cursor=1"), 600)
    with pytest.raises(ResponseTooLargeError, match="call exceeds max_call_bytes"):
        read(p, b"x" * 401, 10_000)
    assert len(read(p, b"x" * 400, 10_000)) == 400
    with pytest.raises(ResponseTooLargeError, match="max_response_bytes"):
        read(pager(), b"x" * 501, 500)  # a listing has no byte cap but the response cap


# -- the same guards on each endpoint that pages


def listing_handler(loop_at):
    def handler(request):
        cursor = int(request.url.params.get("cursor", 0))
        following = loop_at if cursor + 1 > loop_at else cursor + 1
        return httpx.Response(200, json=page(f"{request.url.copy_with(params={'cursor': following})}"))

    return handler


@pytest.mark.parametrize("path", ["/api/calls", "/api/deleted_calls"])
def test_listings_refuse_a_cursor_loop_in_one_line(path):
    requests = []

    def handler(request):
        requests.append(request)
        return listing_handler(loop_at=2)(request)

    with pytest.raises(StagesError) as err:
        asyncio.run(list_endpoint(Settings(**FAST), KEY, path, {}, transport=httpx.MockTransport(handler)))
    assert f"listing {path} failed: next link repeats a cursor" in str(err.value)
    assert len(requests) == 3 and all(r.headers["X-API-Key"] == KEY for r in requests)


def test_listing_never_sends_the_key_to_another_origin():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, json=page("https://evil.example.com/api/calls?cursor=1"))

    with pytest.raises(StagesError) as err:
        asyncio.run(list_endpoint(Settings(**FAST), KEY, "/api/calls", {}, transport=httpx.MockTransport(handler)))
    assert "another host (evil.example.com)" in str(err.value) and len(seen) == 1


def test_listing_follows_every_page_under_the_page_cap():
    def handler(request):
        cursor = int(request.url.params.get("cursor", 0))
        link = f"{BASE}/api/calls?cursor={cursor + 1}" if cursor < 4 else None
        return httpx.Response(200, content=json.dumps(page(link)).encode())

    items, stats = asyncio.run(list_endpoint(Settings(**FAST), KEY, "/api/calls", {}, transport=httpx.MockTransport(handler)))
    assert len(items) == 10 and stats.requests == 5
    with pytest.raises(StagesError, match="more than 3 pages"):
        asyncio.run(list_endpoint(Settings(**(FAST | dict(max_pages=3))), KEY, "/api/calls", {},
                                  transport=httpx.MockTransport(handler)))


def test_stages_paging_uses_the_same_loop_guard():
    call_id = "00000000-0000-4000-8000-000000000001"
    out = []

    def handler(request):
        cursor = request.url.params.get("cursor")
        link = f"{BASE}/api/calls/{call_id}/stages?cursor=1" if cursor in (None, "2") else f"{BASE}/api/calls/{call_id}/stages?cursor=2"
        return httpx.Response(200, json=page(link))

    async def sink(fetch):
        out.append(fetch)

    asyncio.run(extract_calls([call_id], Settings(**FAST), KEY, sink, transport=httpx.MockTransport(handler)))
    assert out[0].status == "failed" and "repeats a cursor" in out[0].error and out[0].requests == 3

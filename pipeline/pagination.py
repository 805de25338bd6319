"""The one paginator: follows the ``next`` links of a paginated list endpoint (stages,
``/api/calls``, ``/api/deleted_calls``) under the same guards for all of them."""

from __future__ import annotations

from typing import Any

import httpx

from pipeline.errors import OriginError, PaginationError, ResponseTooLargeError
from pipeline.http import Origin, origin, read_body


class NextLinkPaginator:
    """Pages of ``{"results": [...], "next": url | null}`` from ``first_url`` on.

    ``url`` is the page to fetch next (None once paging ended); :meth:`read` reads a
    page's body within the byte caps and :meth:`advance` takes the decoded page. Guards:
    ``next`` must be a valid URL of ``base_origin`` (the API key only goes there); a
    cursor or URL seen before is a loop; at most ``max_pages`` pages and (if given)
    ``max_bytes`` body bytes over all pages.
    """

    def __init__(self, first_url: str, base_origin: Origin, max_pages: int, max_bytes: int | None = None):
        self.url: str | None = first_url
        self.origin = base_origin
        self.max_pages = max_pages
        self.max_bytes = max_bytes
        self.pages = 0
        self.nbytes = 0
        self._seen: set[str] = {str(httpx.URL(first_url))}

    @property
    def finished(self) -> bool:
        return self.url is None

    async def read(self, response: httpx.Response, max_response_bytes: int) -> bytes:
        """The body, within max_response_bytes and what is left of ``max_bytes``."""
        left = max_response_bytes if self.max_bytes is None else self.max_bytes - self.nbytes
        if left >= max_response_bytes:
            return await read_body(response, max_response_bytes)
        try:
            return await read_body(response, left)
        except ResponseTooLargeError:
            raise ResponseTooLargeError(
                f"call exceeds max_call_bytes (the {self.max_bytes}-byte cap on all its pages together)"
            ) from None

    def advance(self, page: Any, nbytes: int) -> list[Any]:
        """Take the decoded page at ``url`` (``nbytes`` long): returns its results and
        moves ``url`` to the next page, or to None at the end."""
        if not isinstance(page, dict) or not isinstance(page.get("results"), list):
            raise PaginationError("unexpected page shape: 'results' is not a list")
        self.pages += 1
        self.nbytes += nbytes
        assert self.url is not None
        self.url = self._next_url(self.url, page.get("next"))
        if self.url is not None and self.pages >= self.max_pages:
            raise PaginationError(f"more than {self.max_pages} pages (max_pages); stopped paging")
        return page["results"]

    def _next_url(self, current: str, next_link: object) -> str | None:
        # Paging ends on null, a missing key or "" (seen from some DRF setups).
        if next_link is None or next_link == "":
            return None
        if not isinstance(next_link, str):
            raise PaginationError("unexpected page shape: 'next' is not a string")
        # `next` is followed exactly as given (joined only if it were relative).
        try:
            target = httpx.URL(current).join(next_link)
            target_origin = origin(target)  # the host's IDNA is decoded here, and may fail
            url = str(httpx.URL(str(target)))  # what the request will parse again
        except (httpx.InvalidURL, ValueError):  # IDNA errors are UnicodeErrors
            raise PaginationError("next link is not a valid URL; stopped paging") from None
        if target_origin != self.origin:
            raise OriginError(f"next link points to another host ({target.host}); not followed, API key not sent")
        cursor = target.params.get("cursor")
        keys = {url, f"cursor={cursor}"} if cursor else {url}
        if url == current or keys & self._seen:
            raise PaginationError("next link repeats a cursor already seen for this call; stopped paging")
        self._seen |= keys
        return url

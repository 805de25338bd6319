"""HTTP: the client, the origin guard for the API key, and the one retry policy.

* :func:`classify` is the only place that decides what an answer means (ok, 404,
  auth failure, transient, fatal) and :func:`is_transient` the only place that
  decides what is retried.
* :class:`ApiSession` sends every request and adds ``X-API-Key`` only to requests
  whose origin (scheme, host, port) is the configured base URL's, so a ``next``
  link to another host can never carry the key (redirects are never followed).
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import importlib.util
import ipaddress
import json
import random
import ssl
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import httpx
import tenacity

from pipeline import __version__
from pipeline.config import Settings
from pipeline.errors import (
    AuthError,
    CallError,
    InsecureURLError,
    ResponseTooLargeError,
    TransientError,
    UsageError,
)

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
USER_AGENT = f"ultravox-stages/{__version__}"


def _remember_missing_sniffio() -> None:
    """httpcore runs ``import sniffio`` on every lock and semaphore it sets up, several
    times per request; anyio >= 4.11 no longer installs sniffio, and Python does not
    cache a failed import, so each of those rescans sys.path (~0.2 ms): over half of our
    CPU per request on a fast API (encode/httpcore#1103). A ``None`` in sys.modules is
    Python's own "known missing" marker: the import then fails at once, as before."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


_remember_missing_sniffio()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every connection pool: building one loads the CA bundle
    (~30 ms of CPU), and extract runs a pool per request in flight. Same trust as
    httpx's default (certifi; SSL_CERT_FILE is not read: the environment is not
    trusted, as before)."""
    return httpx.create_ssl_context(trust_env=False)


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, port)


def safe_url(url: httpx.URL | str) -> str:
    """The URL as it may be logged or stored: no user-info (the key never is in it)."""
    u = httpx.URL(str(url))
    return str(u.copy_with(username=None, password=None)) if u.userinfo else str(u)


def check_base_url(base_url: str, allow_insecure_http: bool) -> httpx.URL:
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise UsageError(f"invalid --base-url {base_url!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError(f"invalid --base-url {base_url!r}: expected http(s)://host[:port]")
    if url.scheme == "http" and not _is_loopback(url.host) and not allow_insecure_http:
        raise InsecureURLError(
            f"refusing plain http to {url.host}: the API key would travel unencrypted; "
            "use https or pass --allow-insecure-http"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_transport(max_connections: int) -> httpx.AsyncHTTPTransport:
    """One connection pool. No proxies from the environment (trust_env off, as the
    API key must only ever go to the configured origin)."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=30
    )
    return httpx.AsyncHTTPTransport(verify=_tls_context(), limits=limits, trust_env=False)


class ApiSession:
    """Every request to the API: a GET with our headers and timeout, and the API key —
    sent only to the configured origin (scheme, host, port), so a ``next`` link to
    another host can never carry it. Redirects are never followed (a 3xx is an answer
    for :func:`classify`).

    Requests go straight to httpx transports, not through ``httpx.AsyncClient``: its
    layers (auth flow, cookie jar, redirect loop, request merging) cost about a third
    of the CPU of a request, and nothing here uses them. ``pools`` connection pools
    share ``settings.concurrency`` connections and are handed out idle first (with
    one connection each, every request gets a pool of its own): one big pool spent
    more CPU on its bookkeeping than on the requests (PERFORMANCE.md). ``transport``
    replaces them all (tests pass an ``httpx.MockTransport``).
    """

    def __init__(
        self,
        settings: Settings,
        api_key: str | None,
        pools: int = 1,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = check_base_url(settings.base_url, settings.allow_insecure_http)
        self._origin = origin(self.base_url)
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "Connection": "keep-alive",
        }
        self._plain = httpx.Headers(headers)
        self._keyed = httpx.Headers(headers | {"X-API-Key": api_key}) if api_key else self._plain
        self._extensions = {"timeout": httpx.Timeout(settings.timeout_seconds).as_dict()}
        if transport is not None:
            self._transports: list[httpx.AsyncBaseTransport] = [transport]
        else:
            pools = max(1, min(pools, settings.concurrency))
            self._transports = [build_transport(-(-settings.concurrency // pools)) for _ in range(pools)]
        self._idle = list(self._transports)
        self._turn = 0

    def build_request(self, url: str) -> httpx.Request:
        target = httpx.URL(url)
        headers = self._keyed if origin(target) == self._origin else self._plain
        return httpx.Request("GET", target, headers=headers, extensions=self._extensions)

    @contextlib.asynccontextmanager
    async def stream(self, url: str) -> AsyncIterator[httpx.Response]:
        """GET ``url``; the response's body is read (or not) inside the block."""
        request = self.build_request(url)
        idle = bool(self._idle)
        if idle:
            transport = self._idle.pop()  # the most recently used: its connection is warm
        else:  # more requests than pools: share them in turn
            self._turn += 1
            transport = self._transports[self._turn % len(self._transports)]
        try:
            response = await transport.handle_async_request(request)
            try:
                yield response
            finally:
                await response.aclose()
        finally:
            if idle:
                self._idle.append(transport)

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()

    async def __aenter__(self) -> ApiSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:  # never show the key, even in a debugger or traceback
        return f"ApiSession(origin={self._origin!r}, pools={len(self._transports)})"


def parse_retry_after(value: str | None, settings: Settings, now: float | None = None) -> float | None:
    """Retry-After as seconds (``"3"``) or an HTTP-date; clamped to [min, max]."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        now_dt = datetime.fromtimestamp(now if now is not None else time.time(), timezone.utc)
        seconds = (when - now_dt).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, settings.retry_after_min_seconds), settings.retry_after_max_seconds)


def _detail(body: bytes) -> str:
    """A short reason from an error body: DRF's {"detail": ...} when present."""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("detail"), str):
            return data["detail"][:200]
    except ValueError:
        pass
    return ""


def classify(status: int, headers: httpx.Headers, body: bytes, url: str, settings: Settings) -> str:
    """What an answer means: returns "ok" or "not_found", raises for everything else.

    401/403 → AuthError (the run stops); 429/5xx → TransientError with Retry-After;
    any other non-2xx (400, 3xx redirects, 410 …) → CallError (not retried).
    """
    if 200 <= status < 300:
        return "ok"
    if status == 404:
        return "not_found"
    detail = _detail(body)
    suffix = f": {detail}" if detail else ""
    if status in (401, 403):
        what = "missing" if status == 401 else "rejected"
        raise AuthError(
            f"API key {what} by {httpx.URL(url).host} (HTTP {status}{suffix}); "
            "check the ULTRAVOX_API_KEY environment variable"
        )
    if status in TRANSIENT_STATUSES:
        retry_after = parse_retry_after(headers.get("Retry-After"), settings)
        raise TransientError(f"HTTP {status}{suffix}", retry_after=retry_after, status=status)
    raise CallError(f"HTTP {status} from {safe_url(url)}{suffix}")


def is_transient(exc: BaseException) -> bool:
    """The one decision of what is retried: throttling, 5xx, network trouble, bad JSON."""
    return isinstance(exc, (TransientError, httpx.TransportError))


def describe(exc: BaseException) -> str:
    """A short reason for etl_calls.error and logs (no secrets: no headers, no bodies)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout ({type(exc).__name__})"
    if isinstance(exc, httpx.TransportError):
        return f"connection error ({type(exc).__name__})"
    return str(exc)[:300]


class WaitPolicy(tenacity.wait.wait_base):
    """Full-jitter exponential backoff, unless the server said when (Retry-After)."""

    def __init__(self, settings: Settings):
        self.jitter = tenacity.wait_random_exponential(
            multiplier=settings.backoff_initial_seconds, max=settings.backoff_max_seconds
        )

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            # A small random spread so throttled requests do not return in lockstep.
            return exc.retry_after * (1 + 0.1 * random.random())
        return float(self.jitter(retry_state))


async def read_body(response: httpx.Response, limit: int) -> bytes:
    """Read a streamed body, refusing more than ``limit`` bytes (memory guard)."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ResponseTooLargeError(f"response of {int(declared)} bytes exceeds the {limit}-byte cap")
    chunks: list[bytes] = []
    size = 0
    # Not encoded (what servers send without gzip): the transport's stream itself,
    # without httpx's decoder and re-chunking layers (a tenth of a request's CPU).
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    stream = response.stream if encoding == "identity" else response.aiter_bytes()
    async for chunk in stream:  # type: ignore[union-attr]
        size += len(chunk)
        if size > limit:
            raise ResponseTooLargeError(f"response larger than the {limit}-byte cap")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        # Invalid or truncated JSON on a 200 is treated as transient (see NOTES.md).
        raise TransientError(f"invalid JSON in response ({len(body)} bytes): {exc.__class__.__name__}") from None

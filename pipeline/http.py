"""HTTP: the client, the origin guard for the API key, and the one retry policy.

* :func:`classify` is the only place that decides what an answer means (ok, 404,
  auth failure, transient, fatal); :data:`RETRYABLE` declares what is retried (read
  only by :func:`is_transient`) and :func:`is_outage` what counts towards "the API
  stopped answering".
* :func:`api_client` is the one ``httpx.AsyncClient``; its :class:`OriginKeyAuth` adds
  ``X-API-Key`` only to requests whose origin (scheme, host, port) is the configured
  base URL's, so a ``next`` link to another host can never carry the key (redirects
  are never followed).
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import ipaddress
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx
import tenacity

from pipeline import __version__, jsonio
from pipeline.config import Settings
from pipeline.errors import (
    AuthError,
    CallError,
    InsecureURLError,
    ResponseTooLargeError,
    StagesError,
    TransientError,
    UsageError,
    register_secret,
    scrub,
)


class InvalidJSONError(TransientError):
    """A 200 whose body is not JSON; ``digest`` tells the same body failing again."""

    def __init__(self, message: str, digest: str):
        super().__init__(message)
        self.digest = digest


class DeadlineExceeded(TransientError):
    """The whole request (connect, headers, body) took longer than request_deadline_seconds."""


@dataclass(frozen=True)
class RetryableSet:
    """What is worth retrying: answers with these statuses, and these exceptions
    (``unless`` lists subclasses of them that a retry cannot fix)."""

    statuses: frozenset[int]
    exceptions: tuple[type[BaseException], ...]
    unless: tuple[type[BaseException], ...]


RETRYABLE = RetryableSet(
    statuses=frozenset({429, 500, 502, 503, 504}),
    # TransientError: 429/5xx, invalid JSON, deadline; DecodingError: a body that does not
    # match its Content-Encoding (a broken proxy or a cut stream).
    exceptions=(TransientError, httpx.TransportError, httpx.DecodingError),
    # Raised by httpcore for what *we* would send (bad URL or header): the same every time.
    unless=(httpx.LocalProtocolError, httpx.UnsupportedProtocol),
)
USER_AGENT = f"ultravox-stages/{__version__}"


Origin = tuple[str, str, int | None]


def origin(url: httpx.URL) -> Origin:
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, port)


def safe_url(url: httpx.URL | str) -> str:
    """The URL as it may be logged or stored: no user-info (the key never is in it)."""
    u = httpx.URL(str(url))
    return str(u.copy_with(username=None, password=None)) if u.userinfo else str(u)


_USERINFO = re.compile(r"(?<=//)[^/?#]*@")


def check_base_url(base_url: str, allow_insecure_http: bool) -> httpx.URL:
    shown = _USERINFO.sub("", base_url)  # never echo a password, even of an invalid URL
    if shown != base_url:
        raise UsageError(
            f"--base-url {shown!r} must not contain user:password@; the API key is read from "
            "the environment (ULTRAVOX_API_KEY), never from the URL"
        )
    try:
        url = httpx.URL(base_url)
        url.host  # noqa: B018 - decodes IDNA, which may fail
    except (httpx.InvalidURL, ValueError):
        raise UsageError(f"invalid --base-url {base_url!r}: expected http(s)://host[:port]") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError(f"invalid --base-url {base_url!r}: expected http(s)://host[:port]")
    if url.scheme == "http" and not _is_loopback(url.host) and not allow_insecure_http:
        raise InsecureURLError(
            f"refusing plain http to {url.host}: the API key would travel unencrypted; "
            "use https or pass --allow-insecure-http"
        )
    return url


def check_api_key(key: str, env: str = "ULTRAVOX_API_KEY") -> None:
    """Refuse a key that cannot travel as an HTTP header value (no key text in the message)."""
    for position, char in enumerate(key, start=1):
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise UsageError(
                f"the API key in {env} contains a control character (line break, tab …) at position "
                f"{position}; it cannot be sent as an HTTP header: set {env} again without it"
            )
        if ord(char) > 0x7E:
            raise UsageError(
                f"the API key in {env} contains a non-ASCII character at position {position}; "
                f"it cannot be sent as an HTTP header: copy the key again into {env}"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class OriginKeyAuth(httpx.Auth):
    """Adds ``X-API-Key`` only to requests for ``base_url``'s origin (scheme, host,
    port): a ``next`` link to another host never carries the key."""

    def __init__(self, api_key: str | None, base_url: httpx.URL):
        self._key = api_key
        self._origin = origin(base_url)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._key and origin(request.url) == self._origin:
            request.headers["X-API-Key"] = self._key
        yield request

    def __repr__(self) -> str:  # never show the key, even in a debugger or traceback
        return f"OriginKeyAuth(origin={self._origin!r})"


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every connection pool (building one loads the CA bundle);
    certifi's trust, as httpx's default, SSL_CERT_FILE not read."""
    return httpx.create_ssl_context(trust_env=False)


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that hands its connection pool back once closed."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]):
        self._stream, self._release = stream, release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._release()


class SpreadTransport(httpx.AsyncBaseTransport):
    """``size`` connection pools of one connection each, the idle ones first (the most
    recently used: its connection is warm). httpcore's pool rescans every connection it
    holds (a poll() on each idle one) on every request event, so one pool of
    ``concurrency`` connections spends more CPU on that than on the requests
    (bench/http_bench.py); single-connection pools never scan."""

    def __init__(self, size: int):
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=30)
        self._pools = [
            httpx.AsyncHTTPTransport(verify=_tls_context(), limits=limits, trust_env=False) for _ in range(size)
        ]
        self._idle = list(self._pools)
        self._turn = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._idle:
            pool = self._idle.pop()
            release: Callable[[], None] = functools.partial(self._idle.append, pool)
        else:  # more requests than pools: share them in turn
            self._turn += 1
            pool, release = self._pools[self._turn % len(self._pools)], lambda: None
        try:
            response = await pool.handle_async_request(request)
        except BaseException:
            release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        stream = _ReleasingStream(response.stream, release)
        return httpx.Response(
            response.status_code, headers=response.headers, stream=stream, extensions=response.extensions
        )

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


def api_client(
    settings: Settings, api_key: str | None, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The one client for every request to the API: our headers and timeout, the key
    for the base origin only, no redirects followed (a 3xx is an answer for
    :func:`classify`) and nothing from the environment (no proxies: the key goes to
    the configured origin only). Connections go through :class:`SpreadTransport`;
    ``transport`` replaces it (tests pass an ``httpx.MockTransport``)."""
    base_url = check_base_url(settings.base_url, settings.allow_insecure_http)
    if api_key:
        check_api_key(api_key, settings.api_key_env)
        register_secret(api_key)  # from here on, no message can carry it
    return httpx.AsyncClient(
        auth=OriginKeyAuth(api_key, base_url),
        headers={"User-Agent": USER_AGENT, "Accept": "application/json", "Accept-Encoding": "gzip, deflate"},
        timeout=httpx.Timeout(settings.timeout_seconds),
        follow_redirects=False,
        trust_env=False,
        transport=transport if transport is not None else SpreadTransport(settings.concurrency),
    )


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


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _detail(body: bytes) -> str:
    """A short, one-line, scrubbed reason from an error body: DRF's {"detail": ...}."""
    try:
        data = jsonio.loads(body)
    except jsonio.JSONError:
        return ""
    if isinstance(data, dict) and isinstance(data.get("detail"), str):
        return scrub(_UNPRINTABLE.sub(" ", scrub(data["detail"])).strip())[:200]
    return ""


def classify(
    status: int, headers: httpx.Headers, body: bytes, url: str, settings: Settings, key_sent: bool = True
) -> str:
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
        host = httpx.URL(url).host
        env = settings.api_key_env
        if key_sent:
            raise AuthError(f"API key rejected by {host} (HTTP {status}{suffix}); check the {env} environment variable")
        raise AuthError(f"no API key was sent to {host} (HTTP {status}{suffix}); set the {env} environment variable")
    if status in RETRYABLE.statuses:
        retry_after = parse_retry_after(headers.get("Retry-After"), settings)
        raise TransientError(f"HTTP {status}{suffix}", retry_after=retry_after, status=status)
    raise CallError(f"HTTP {status} from {safe_url(url)}{suffix}")


def is_transient(exc: BaseException) -> bool:
    """The one decision of what is retried (reads RETRYABLE)."""
    return isinstance(exc, RETRYABLE.exceptions) and not isinstance(exc, RETRYABLE.unless)


def is_outage(exc: BaseException) -> bool:
    """A failure that says the API is not answering (not: this call is bad)."""
    if isinstance(exc, TransientError):
        return isinstance(exc, DeadlineExceeded) or (exc.status or 0) >= 500
    return isinstance(exc, httpx.TransportError) and is_transient(exc)


def describe(exc: BaseException) -> str:
    """A short one-line reason for etl_calls.error and logs: no secrets, headers or bodies
    (a StagesError's message is ours, scrubbed; anything else is named by its type)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout ({type(exc).__name__})"
    if isinstance(exc, httpx.TransportError):
        return f"connection error ({type(exc).__name__})"
    if isinstance(exc, httpx.DecodingError):
        return "response body does not match its Content-Encoding (DecodingError)"
    if isinstance(exc, httpx.InvalidURL):
        return "invalid URL (InvalidURL)"
    if isinstance(exc, StagesError):
        return str(exc)[:300]
    return f"unexpected {type(exc).__name__} while fetching"


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
    too_large = f"response exceeds max_response_bytes (the {limit}-byte cap)"
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ResponseTooLargeError(too_large)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise ResponseTooLargeError(too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes) -> Any:
    """A page body as JSON. Invalid or truncated JSON on a 200 is transient (a cut
    stream); nesting deeper than jsonio.MAX_DEPTH is not (the same body fails again)."""
    try:
        return jsonio.loads(body)
    except jsonio.JSONTooDeep:
        raise CallError(f"response JSON nested deeper than {jsonio.MAX_DEPTH} levels; not loaded") from None
    except jsonio.JSONError as exc:
        digest = hashlib.blake2b(body, digest_size=16).hexdigest()
        raise InvalidJSONError(f"invalid JSON in response ({len(body)} bytes): {exc}", digest) from None

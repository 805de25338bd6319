"""The one exception hierarchy of ultravox-stages.

Every error a user can see is a subclass of :class:`StagesError`; the CLI prints
``str(error)`` as one line and exits with ``error.exit_code``. Tracebacks are shown
only with ``--debug``.

    StagesError                 exit 1  generic failure
    ├── WarehouseError          exit 4  the warehouse or the tool itself failed (disk full, …)
    ├── UsageError              exit 2  bad flags, config, calls file, output path
    │   ├── ConfigError                 config file problems (names the key)
    │   ├── InputError                  calls file / call IDs problems (file:line)
    │   ├── OutputError                 --output exists and is not ours, lock held
    │   └── InsecureURLError            plain http to a non-loopback host
    ├── AuthError               exit 3  401/403 from the API: stop at once
    ├── UnreachableError        exit 3  the API cannot be reached at all
    └── CallError                       one call failed; recorded in etl_calls, never
        │                               raised out of a run (the run exits 1)
        ├── TransientError              retryable: 429, 5xx, connection, timeout, bad JSON
        ├── PaginationError             `next` loop, page cap, foreign call id, bad shape
        ├── OriginError                 `next` points at another origin (key not sent)
        └── ResponseTooLargeError       a body above the response size cap

Messages never contain the API key: every message is passed through :func:`scrub`,
which removes each secret registered with :func:`register_secret` (the API key, as
soon as it is read), also from text a server sent back.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_WAREHOUSE = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

REDACTED = "<redacted>"
_secrets: set[str] = set()


def register_secret(secret: str) -> None:
    """Remember a secret (the API key) so that :func:`scrub` removes it from any text."""
    if secret and len(secret) >= 4:
        _secrets.add(secret)


def scrub(text: str) -> str:
    """``text`` without any registered secret (also URL- or JSON-escaped forms)."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
        for variant in _variants(secret):
            if variant in text:
                text = text.replace(variant, REDACTED)
    return text


def _variants(secret: str) -> tuple[str, ...]:
    import json
    import urllib.parse

    return tuple(
        {urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret), json.dumps(secret)[1:-1]} - {secret}
    )


class StagesError(Exception):
    """Base class: a one-line, user-facing message and an exit code."""

    exit_code: int = EXIT_PARTIAL

    def __str__(self) -> str:
        return scrub(" ".join(super().__str__().split()))


class WarehouseError(StagesError):
    """The warehouse (or the tool itself) failed; the message names the real cause."""

    exit_code = EXIT_WAREHOUSE


class UsageError(StagesError):
    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    pass


class InputError(UsageError):
    pass


class OutputError(UsageError):
    pass


class InsecureURLError(UsageError):
    pass


class AuthError(StagesError):
    exit_code = EXIT_AUTH


class UnreachableError(StagesError):
    exit_code = EXIT_AUTH


class CallError(StagesError):
    """A failure confined to one call: it is recorded and the run goes on."""


class TransientError(CallError):
    """Worth retrying. ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class PaginationError(CallError):
    pass


class OriginError(CallError):
    pass


class ResponseTooLargeError(CallError):
    pass

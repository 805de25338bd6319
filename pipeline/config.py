"""Settings: defaults < TOML config file < CLI flags, frozen once resolved.

The API key is never a setting: it is read from the environment variable named by
``api_key_env`` (default ``ULTRAVOX_API_KEY``). A key written in the TOML is refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, UsageError

FORMATS = ("duckdb", "parquet", "delta")
DEFAULT_OUTPUTS = {"duckdb": "ultravox_stages.duckdb", "parquet": "ultravox_stages_parquet", "delta": "ultravox_stages_delta"}
_SECRET_KEYS = {"api_key", "apikey", "key", "x_api_key", "token", "secret"}


@dataclass(frozen=True)
class Settings:
    base_url: str = "https://api.ultravox.ai"
    format: str = "duckdb"
    #: None means the format's default (ultravox_stages.duckdb / ultravox_stages_parquet).
    output: str | None = None
    calls_file: str | None = None
    concurrency: int = 16
    page_size: int = 100
    refresh: bool = False
    raw_dir: str | None = None
    log_format: str = "text"
    api_key_env: str = "ULTRAVOX_API_KEY"
    allow_insecure_http: bool = False
    #: Seconds for connect/read/write/pool of one HTTP request.
    timeout_seconds: float = 30.0
    #: Total seconds one HTTP request may take (connect + headers + whole body).
    request_deadline_seconds: float = 120.0
    #: Attempts per HTTP request (first try included) before the call is failed.
    max_attempts: int = 6
    #: Retries allowed per call over all its pages before it is recorded failed.
    call_retry_budget: int = 20
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    #: Retry-After is honoured up to this many seconds; 0 becomes retry_after_min_seconds.
    retry_after_max_seconds: float = 120.0
    retry_after_min_seconds: float = 0.05
    #: Client-side request rate cap (token bucket); Ultravox allows 200/s per key.
    max_rps: float = 195.0
    #: A call with more pages than this fails (protects against endless paging).
    max_pages: int = 1000
    #: A response body larger than this fails the call (protects memory).
    max_response_bytes: int = 64 * 1024 * 1024
    #: All page bodies of one call together larger than this fail the call (protects memory).
    max_call_bytes: int = 256 * 1024 * 1024
    #: Stages gathered before one transform + commit.
    batch_stages: int = 2000
    #: Page bytes gathered before one transform + commit (whichever of the two comes first).
    batch_bytes: int = 4 * 1024 * 1024
    #: `replay`: the same two bounds (None: the format's, :data:`REPLAY_BATCHES`).
    replay_batch_stages: int | None = None
    replay_batch_bytes: int | None = None
    #: `replay`: processes reading and transforming the landing zone, each a share of the calls.
    replay_readers: int = 1
    #: Calls in a row failing on connection errors or 5xx before the run stops (exit 3).
    outage_calls: int = 10
    #: `run --incremental`: list calls from the stored watermark minus the overlap window.
    incremental: bool = False
    #: Hours before the watermark that an incremental run lists (and re-fetches) again.
    overlap_hours: float = 24.0
    #: Keep the stages of calls the API reports deleted (flagged in calls.deleted_at).
    keep_deleted: bool = False
    #: DuckDB buffer-pool cap while writing (its default is 80% of RAM).
    duckdb_memory_limit: str = "256MB"

    def replay_batch(self) -> tuple[int, int]:
        """(stages, page bytes) of a replay commit: as set, else the format's default."""
        stages, nbytes = REPLAY_BATCHES[self.format]
        return self.replay_batch_stages or stages, self.replay_batch_bytes or nbytes

    @property
    def output_path(self) -> Path:
        return Path(self.output_location)

    @property
    def output_location(self) -> str:
        """The output as given: a path, or an object-store URI (``s3://…``) for Delta."""
        return self.output or DEFAULT_OUTPUTS[self.format]

    def public_options(self) -> dict[str, Any]:
        """What etl_runs.options records: every setting, URLs without userinfo (no secret)."""
        return {name: _without_userinfo(value) for name, value in dataclasses.asdict(self).items()}


#: Replay commits per format, (stages, page bytes): no latency to hide, so bigger than a
#: run's. DuckDB writes a batch of a few row groups straight to the file; Parquet and Delta
#: write a file per date folder and table per commit, so fewer, bigger commits.
REPLAY_BATCHES = {"duckdb": (8000, 12 << 20), "parquet": (16000, 24 << 20), "delta": (16000, 24 << 20)}

_FIELD_TYPES: dict[str, type] = {
    f.name: (str if "str" in str(f.type) else {"int": int, "float": float, "bool": bool}[str(f.type).removesuffix(" | None")])
    for f in fields(Settings)
}
_OPTIONAL = {f.name for f in fields(Settings) if "None" in str(f.type)}
_POSITIVE = {
    "concurrency", "page_size", "timeout_seconds", "max_attempts", "max_rps",
    "max_pages", "max_response_bytes", "batch_stages", "backoff_max_seconds",
    "request_deadline_seconds", "max_call_bytes", "batch_bytes", "outage_calls",
    "replay_batch_stages", "replay_batch_bytes", "replay_readers",
}
_NON_NEGATIVE = {"overlap_hours", "call_retry_budget", "backoff_initial_seconds", "retry_after_max_seconds", "retry_after_min_seconds"}
_CHOICES = {"format": FORMATS, "log_format": ("text", "json")}
#: What a value of another type is called in the message (TOML's own names).
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a float", bool: "a boolean", dict: "a table", list: "an array"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: A choice echoed back in a message must look like one (never a pasted secret).
_ECHOABLE = re.compile(r"[a-z]{1,16}")
_SETTING_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
#: DuckDB's memory units (KB = 1000 bytes, KiB = 1024 bytes).
_MEMORY_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_MEMORY_LIMIT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*")
#: A floor that keeps a slip of the unit ("256KB" for "256MB") from starving DuckDB.
_MIN_MEMORY_BYTES = 16 * 10**6
_MEMORY_SHAPE = 'digits and a unit, e.g. "256MB", "1GiB" or "512 MB" (units: KB MB GB TB KiB MiB GiB TiB), at least 16MB'
_TOML_LOCATION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")
#: Key names and long quoted text tomllib puts in its messages (they may be a pasted secret).
_TOML_QUOTED = re.compile(r"\(.*\)|'[^']{4,}'|\"[^\"]{4,}\"")


def _type_name(value: Any) -> str:
    return next((name for t, name in _TYPE_NAMES.items() if type(value) is t), f"a {type(value).__name__} value")


def _toml_error(text: str, exc: tomllib.TOMLDecodeError) -> str:
    """tomllib's reason with its line and column (computed from the end when it gives none)."""
    message = getattr(exc, "msg", None) or str(exc)
    line, column = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    found = _TOML_LOCATION.search(message)
    if found:
        message = message[: found.start()]
        if line is None and found.group(1):
            line, column = int(found.group(1)), int(found.group(2))
    if line is None:  # "at end of document": the end is where the problem shows
        lines = text.split("\n")
        line, column = len(lines), len(lines[-1]) + 1
    reason = _TOML_QUOTED.sub("<key>", message)[:100].strip() or "syntax error"
    return f"{reason} at line {line}, column {column}"


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text; save it as UTF-8 TOML") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {p}: {_toml_error(text, exc)}") from None
    for key in data:
        if key.lower().replace("-", "_") in _SECRET_KEYS:
            raise ConfigError(
                f"{p}: '{key}' looks like an API key; secrets are never read from the config "
                "file — set the ULTRAVOX_API_KEY environment variable (or name another "
                "variable with api_key_env)"
            )
    return data


def memory_limit_bytes(text: str) -> int | None:
    """Bytes of a DuckDB memory limit such as "256MB" or "1 GiB"; None when not that shape."""
    match = _MEMORY_LIMIT.fullmatch(text)
    if match is None or match.group(2).lower() not in _MEMORY_UNITS:
        return None
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()])


def _unknown(key: str, origin: str) -> ConfigError:
    known = ", ".join(sorted(_FIELD_TYPES))
    if not _SETTING_NAME.fullmatch(key):
        return ConfigError(f"{origin}: unknown setting (name not shown: it is not a setting name) (known settings: {known})")
    close = difflib.get_close_matches(key.replace("-", "_"), list(_FIELD_TYPES), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{origin}: unknown setting '{key}'{hint} (known settings: {known})")


def _check_type(key: str, value: Any, origin: str) -> Any:
    expected = _FIELD_TYPES[key]
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{origin}: setting '{key}' must be {expected.__name__}, got {_type_name(value)}")
    return value


def _check_number(key: str, value: float, origin: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{origin}: setting '{key}' must be a finite number, got NaN or infinity")
    if key in _POSITIVE and value <= 0:
        raise ConfigError(f"{origin}: setting '{key}' must be greater than 0")
    if key in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{origin}: setting '{key}' must not be negative")


def _check_text(key: str, value: str, origin: str) -> None:
    if key in _CHOICES and value not in _CHOICES[key]:
        shown = f"got {value!r}" if _ECHOABLE.fullmatch(value) else "got another string"
        raise ConfigError(f"{origin}: setting '{key}' must be one of {', '.join(_CHOICES[key])}, {shown}")
    if key == "api_key_env" and not _ENV_NAME.fullmatch(value):
        raise ConfigError(
            f"{origin}: setting 'api_key_env' must be the NAME of an environment variable "
            "(letters, digits and _, not starting with a digit), not the key itself; "
            "put the key in that variable"
        )
    if key == "duckdb_memory_limit":
        size = memory_limit_bytes(value)
        if size is None or size < _MIN_MEMORY_BYTES:
            raise ConfigError(f"{origin}: setting 'duckdb_memory_limit' must be {_MEMORY_SHAPE}")


def _check(key: str, value: Any, origin: str) -> Any:
    """The value, validated; messages name the setting and the shape, never the value."""
    if key not in _FIELD_TYPES:
        raise _unknown(key, origin)
    if value is None and key in _OPTIONAL:
        return None
    value = _check_type(key, value, origin)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(key, value, origin)
    if isinstance(value, str):
        _check_text(key, value, origin)
    return value


def _without_userinfo(value: Any) -> Any:
    """A URL-looking string without ``user:password@``; anything else unchanged."""
    if not isinstance(value, str) or "://" not in value or "@" not in value:
        return value
    parts = urllib.parse.urlsplit(value)
    if "@" not in parts.netloc:
        return value
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def load_settings(config_file: str | None, cli: dict[str, Any]) -> Settings:
    """Resolve settings: defaults, then the file, then CLI flags given (None = not given)."""
    values: dict[str, Any] = {}
    if config_file:
        for key, value in read_config_file(config_file).items():
            values[key] = _check(key, value, str(config_file))
    for key, value in cli.items():
        if value is not None:
            values[key] = _check(key.replace("-", "_"), value, "command line")
    return Settings(**values)


def api_key_from_env(settings: Settings) -> str:
    key = os.environ.get(settings.api_key_env, "").strip()
    if not key:
        raise UsageError(
            f"no API key: set the {settings.api_key_env} environment variable "
            "(or try `ultravox-stages demo`, which needs none)"
        )
    return key

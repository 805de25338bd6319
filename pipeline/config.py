"""Settings: defaults < TOML config file < CLI flags, frozen once resolved.

The API key is never a setting: it is read from the environment variable named by
``api_key_env`` (default ``ULTRAVOX_API_KEY``). A key written in the TOML is refused.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
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
    max_rps: float = 150.0
    #: A call with more pages than this fails (protects against endless paging).
    max_pages: int = 1000
    #: A response body larger than this fails the call (protects memory).
    max_response_bytes: int = 64 * 1024 * 1024
    #: All page bodies of one call together larger than this fail the call (protects memory).
    max_call_bytes: int = 256 * 1024 * 1024
    #: Stages gathered before one transform + commit.
    batch_stages: int = 2000
    #: Page bytes gathered before one transform + commit (whichever of the two comes first).
    batch_bytes: int = 32 * 1024 * 1024
    #: Calls in a row failing on connection errors or 5xx before the run stops (exit 3).
    outage_calls: int = 10
    #: `run --incremental`: list calls from the stored watermark minus the overlap window.
    incremental: bool = False
    #: Hours before the watermark that an incremental run lists (and re-fetches) again.
    overlap_hours: float = 24.0
    #: Keep the stages of calls the API reports deleted (flagged in calls.deleted_at).
    keep_deleted: bool = False
    #: DuckDB buffer-pool cap while writing (its default is 80% of RAM).
    duckdb_memory_limit: str = "96MB"

    @property
    def output_path(self) -> Path:
        return Path(self.output_location)

    @property
    def output_location(self) -> str:
        """The output as given: a path, or an object-store URI (``s3://…``) for Delta."""
        return self.output or DEFAULT_OUTPUTS[self.format]

    def public_options(self) -> dict[str, Any]:
        """What etl_runs.options records: every setting (no secret lives here)."""
        return dataclasses.asdict(self)


_FIELD_TYPES: dict[str, type] = {
    f.name: (str if "str" in str(f.type) else {"int": int, "float": float, "bool": bool}[str(f.type)])
    for f in fields(Settings)
}
_OPTIONAL = {f.name for f in fields(Settings) if "None" in str(f.type)}
_POSITIVE = {
    "concurrency", "page_size", "timeout_seconds", "max_attempts", "max_rps",
    "max_pages", "max_response_bytes", "batch_stages", "backoff_max_seconds",
    "request_deadline_seconds", "max_call_bytes", "batch_bytes", "outage_calls",
}
_NON_NEGATIVE = {"overlap_hours", "call_retry_budget", "backoff_initial_seconds", "retry_after_max_seconds", "retry_after_min_seconds"}
_CHOICES = {"format": FORMATS, "log_format": ("text", "json")}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends with "(at line L, column C)".
        raise ConfigError(f"invalid TOML in {p}: {exc}") from None
    for key in data:
        if key.lower().replace("-", "_") in _SECRET_KEYS:
            raise ConfigError(
                f"{p}: '{key}' looks like an API key; secrets are never read from the config "
                "file — set the ULTRAVOX_API_KEY environment variable (or name another "
                "variable with api_key_env)"
            )
    return data


def _check(key: str, value: Any, origin: str) -> Any:
    if key not in _FIELD_TYPES:
        known = ", ".join(sorted(_FIELD_TYPES))
        raise ConfigError(f"{origin}: unknown setting '{key}' (known settings: {known})")
    if value is None and key in _OPTIONAL:
        return None
    expected = _FIELD_TYPES[key]
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(
            f"{origin}: setting '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    if key in _POSITIVE and value <= 0:
        raise ConfigError(f"{origin}: setting '{key}' must be greater than 0, got {value}")
    if key in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{origin}: setting '{key}' must not be negative, got {value}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{origin}: setting '{key}' must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    return value


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

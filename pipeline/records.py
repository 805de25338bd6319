"""Plain records passed along the one-way flow: extract → transform → load."""

from __future__ import annotations

import dataclasses
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.ledger import CallStatus, CallTally, RunStatus


#: A UUID as the API sends ids and the tool stores them: lowercase, 8-4-4-4-12.
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def rfc3339(value: datetime) -> str:
    """The one timestamp style of every JSON output: ``2026-12-01T20:18:46.123456Z``."""
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# RFC 3339 date-time: "T"/"Z" in either case (RFC 3339 §5.6), a space for "T" (common),
# any number of fractional digits (truncated to microseconds).
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 timestamp as an aware UTC datetime (microsecond precision)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"created {text[:40]!r} is not an RFC 3339 timestamp")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    if zulu == "Z" and text[10] != "t" and (fraction is None or len(fraction) <= 6):
        try:  # the C parser, for the shape the API and this tool write (it is laxer with offsets)
            return datetime.fromisoformat(text)
        except ValueError:
            pass  # e.g. February 30th: the message below
    try:
        micros = int(fraction[:6].ljust(6, "0")) if fraction else 0
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros)
        offset = timedelta(0)
        if not zulu:
            if int(off_m) > 59:
                raise ValueError("offset minutes out of range")
            offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (-1 if sign == "-" else 1)
        return local.replace(tzinfo=timezone(offset)).astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise ValueError(f"created {text[:40]!r} is not a valid date and time") from None


def micros(moment: datetime) -> int:
    """An aware datetime as microseconds since the epoch (a TIMESTAMPTZ column's value)."""
    return (moment - _EPOCH) // _MICROSECOND


def new_run_id(now: datetime | None = None) -> str:
    """Sortable and readable: ``20261125T065600Z-3f9a1c``."""
    now = now or utcnow()
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass
class CallFetch:
    """Everything the extractor learned about one call.

    ``pages`` are the page bodies exactly as received (not yet redacted); they are
    only meaningful when ``status == "loaded"``.
    """

    call_id: str
    status: CallStatus
    pages: list[dict[str, Any]] = field(default_factory=list)
    #: The URL each page was fetched from (for the raw landing zone).
    page_urls: list[str] = field(default_factory=list)
    error: str | None = None
    requests: int = 0
    retries: int = 0
    fetched_at: datetime = field(default_factory=utcnow)
    #: ``total`` reported by the API when it differs from the rows received.
    total_mismatch: tuple[int, int] | None = None
    #: Bytes of page bodies received (as sent on the wire, decoded): batches are sized by it.
    nbytes: int = 0

    def stages(self) -> list[Any]:
        return [stage for page in self.pages for stage in page["results"]]


@dataclass
class CallOutcome:
    """One etl_calls update, committed together with the call's rows."""

    call_id: str
    status: CallStatus
    stage_count: int | None
    error: str | None
    attempted_at: datetime


@dataclass
class RunRecord:
    """One etl_runs row; updated in place while the run goes on."""

    run_id: str
    started_at: datetime
    tool_version: str
    options: dict[str, Any]
    finished_at: datetime | None = None
    status: RunStatus = "running"
    calls_requested: int = 0
    calls_loaded: int = 0
    calls_not_found: int = 0
    calls_failed: int = 0
    stages_loaded: int = 0
    http_requests: int = 0
    http_retries: int = 0

    def __post_init__(self) -> None:
        self._tally: CallTally | None = None

    def as_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tally(self) -> CallTally:
        """The calls counted so far (each once, by its latest outcome)."""
        if self._tally is None:
            from pipeline.ledger import CallTally  # the ledger builds on these records

            self._tally = CallTally()
        return self._tally

    def count(self, outcome: CallOutcome) -> None:
        self.tally.count(self, outcome)


@dataclass
class ExtractStats:
    """Requests one extraction (or listing) sent, retried, saw throttled and got answered."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0
    answered: int = 0  # responses received at all (any status)

"""Call discovery: `run --since/--until` and `run --incremental`.

Calls are listed with ``GET /api/calls`` (``fromDate``/``toDate`` are whole days,
inclusive, on ``created``). The warehouse keeps a watermark — the latest call
``created`` seen — in ``etl_state``; an incremental run lists from the watermark minus
an overlap window (default 24 h), because calls still in progress gain stages after
they are created, and re-fetches the calls created inside that window even when they
are already loaded. The watermark moves only after the run has loaded what it listed,
so a crash between listing and loading simply lists again next time. Only incremental
runs move it, only forward, and never to a ``created`` later than now plus a small clock
skew (one such call would otherwise hide every later call from incremental runs).

Deleted calls (``GET /api/deleted_calls``, read by incremental runs) lose their stage
rows and are recorded ``not_found`` with the reason (default), or keep them with
``--keep-deleted``; either way ``calls.deleted_at`` is set.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx
import pyarrow as pa

from pipeline import schema
from pipeline.calls_input import normalize_call_id
from pipeline.config import Settings
from pipeline.durations import duration_nanos
from pipeline.errors import UsageError
from pipeline.extract import ExtractStats, list_endpoint
from pipeline.ledger import watermark_row  # noqa: F401 (re-exported: the watermark row lives in the ledger)
from pipeline.redact import redact_call
from pipeline.records import parse_rfc3339

#: A listed ``created`` later than now plus this is implausible: it never moves the watermark.
MAX_CLOCK_SKEW = timedelta(minutes=10)


@dataclass(frozen=True)
class Discovery:
    """What to list; an inverted range raises UsageError (exit 2) when constructed."""

    since: date | None = None
    until: date | None = None
    incremental: bool = False
    overlap_hours: float = 24.0
    keep_deleted: bool = False

    def __post_init__(self) -> None:
        if self.since and self.until and self.since > self.until:
            raise UsageError(
                f"--since {self.since.isoformat()} is after --until {self.until.isoformat()}: "
                "swap them or drop --until"
            )


@dataclass
class Discovered:
    call_ids: list[str] = field(default_factory=list)
    #: Listed calls to fetch even when already loaded (inside the overlap window).
    refetch: set[str] = field(default_factory=set)
    deleted: dict[str, datetime] = field(default_factory=dict)
    calls_rows: pa.Table | None = None
    #: Set by incremental runs only: what the watermark becomes once the listed calls are loaded.
    new_watermark: datetime | None = None
    #: Listed calls whose ``created`` lies beyond now + MAX_CLOCK_SKEW (ignored for the watermark).
    future_created: int = 0
    stats: list[ExtractStats] = field(default_factory=list)


def parse_day(flag: str, text: str | None) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a date (expected YYYY-MM-DD)") from None


def _rfc3339_or_none(value: Any) -> datetime | None:
    """An RFC 3339 string as aware UTC, else None (missing, malformed or not a string)."""
    if not isinstance(value, str):
        return None
    try:
        return parse_rfc3339(value)
    except ValueError:
        return None


def _nanos(value: Any) -> int | None:
    try:
        return duration_nanos(value)
    except ValueError:
        return None


def calls_rows(calls: Sequence[dict[str, Any]], run_id: str, extracted_at: datetime) -> pa.Table:
    """Listed call objects → rows of the ``calls`` table (malformed entries skipped)."""
    rows = []
    for call in calls:
        call_id = normalize_call_id(str(call.get("callId", ""))) if isinstance(call, dict) else None
        if call_id is None:
            continue
        nanos = _nanos(call.get("billedDuration"))
        metadata = call.get("metadata")
        rows.append(
            {
                "call_id": call_id,
                "created": _rfc3339_or_none(call.get("created")),
                "joined": _rfc3339_or_none(call.get("joined")),
                "ended": _rfc3339_or_none(call.get("ended")),
                "end_reason": call.get("endReason") if isinstance(call.get("endReason"), str) else None,
                "billed_duration": call.get("billedDuration") if isinstance(call.get("billedDuration"), str) else None,
                "billed_duration_seconds": None if nanos is None else Decimal(nanos).scaleb(-9),
                "agent_id": call.get("agentId") if isinstance(call.get("agentId"), str) else None,
                "metadata": None if metadata is None else json.dumps(metadata, ensure_ascii=False),
                "deleted_at": None,
                "raw": json.dumps(call, ensure_ascii=False, separators=(",", ":")),
                "run_id": run_id,
                "extracted_at": extracted_at,
            }
        )
    return pa.Table.from_pylist(rows, schema=schema.CALLS.arrow_schema)


def listing_window(discovery: Discovery, watermark: datetime | None) -> tuple[date | None, date | None, datetime | None]:
    """fromDate, toDate and the moment after which listed calls are re-fetched."""
    since, until, refetch_after = discovery.since, discovery.until, None
    if discovery.incremental and watermark is not None:
        refetch_after = watermark - timedelta(hours=discovery.overlap_hours)
        start = refetch_after.date()
        since = max(since, start) if since else start
    return since, until, refetch_after


def advance_watermark(old: datetime | None, created: Iterable[datetime | None], now: datetime) -> tuple[datetime | None, int]:
    """max(old, newest plausible ``created``) and how many were implausibly in the future."""
    horizon = now + MAX_CLOCK_SKEW
    plausible = [w for w in created if w is not None]
    future = sum(1 for w in plausible if w > horizon)
    candidates = [w for w in plausible if w <= horizon] + ([old] if old is not None else [])
    return max(candidates, default=None), future


def discover(settings: Settings, api_key: str, discovery: Discovery, watermark: datetime | None,
             run_id: str, transport: httpx.AsyncBaseTransport | None = None) -> Discovered:
    since, until, refetch_after = listing_window(discovery, watermark)
    params = {"sort": "created"}
    if since:
        params["fromDate"] = since.isoformat()
    if until:
        params["toDate"] = until.isoformat()
    found = Discovered()
    calls, stats = asyncio.run(list_endpoint(settings, api_key, "/api/calls", params, transport=transport))
    found.stats.append(stats)
    now = datetime.now(timezone.utc)
    found.calls_rows = calls_rows([redact_call(call) for call in calls], run_id, now)
    created = dict(zip(found.calls_rows["call_id"].to_pylist(), found.calls_rows["created"].to_pylist()))
    found.call_ids = list(created)
    if refetch_after is not None:
        found.refetch = {c for c, when in created.items() if when is None or when >= refetch_after}
    if discovery.incremental:
        found.new_watermark, found.future_created = advance_watermark(watermark, created.values(), now)
        deleted, stats = asyncio.run(list_endpoint(settings, api_key, "/api/deleted_calls", {}, transport=transport))
        found.stats.append(stats)
        for item in deleted:
            call_id = normalize_call_id(str(item.get("callId", ""))) if isinstance(item, dict) else None
            if call_id:
                found.deleted[call_id] = _rfc3339_or_none(item.get("deleted")) or now
    return found


def parse_watermark(text: str | None) -> datetime | None:
    return _rfc3339_or_none(text)

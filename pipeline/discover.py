"""Call discovery: `run --since/--until` and `run --incremental`.

Calls are listed with ``GET /api/calls`` (``fromDate``/``toDate`` are whole days,
inclusive, on ``created``). The warehouse keeps a watermark — the latest call
``created`` seen — in ``etl_state``; an incremental run lists from the watermark minus
an overlap window (default 24 h), because calls still in progress gain stages after
they are created, and re-fetches the calls created inside that window even when they
are already loaded. The watermark moves only after the run has loaded what it listed,
so a crash between listing and loading simply lists again next time.

Deleted calls (``GET /api/deleted_calls``, read by incremental runs) lose their stage
rows and are recorded ``not_found`` with the reason (default), or keep them with
``--keep-deleted``; either way ``calls.deleted_at`` is set.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pyarrow as pa

from pipeline import schema
from pipeline.calls_input import normalize_call_id
from pipeline.config import Settings
from pipeline.durations import duration_nanos
from pipeline.errors import UsageError
from pipeline.extract import ExtractStats, list_endpoint

WATERMARK_KEY = "watermark_created"


@dataclass(frozen=True)
class Discovery:
    since: date | None = None
    until: date | None = None
    incremental: bool = False
    overlap_hours: float = 24.0
    keep_deleted: bool = False


@dataclass
class Discovered:
    call_ids: list[str] = field(default_factory=list)
    #: Listed calls to fetch even when already loaded (inside the overlap window).
    refetch: set[str] = field(default_factory=set)
    deleted: dict[str, datetime] = field(default_factory=dict)
    calls_rows: pa.Table | None = None
    new_watermark: datetime | None = None
    stats: list[ExtractStats] = field(default_factory=list)


def parse_day(flag: str, text: str | None) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a date (expected YYYY-MM-DD)") from None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.astimezone(timezone.utc) if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


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
                "created": _time(call.get("created")),
                "joined": _time(call.get("joined")),
                "ended": _time(call.get("ended")),
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


def discover(settings: Settings, api_key: str, discovery: Discovery, watermark: datetime | None,
             run_id: str) -> Discovered:
    since, until, refetch_after = listing_window(discovery, watermark)
    params = {"sort": "created"}
    if since:
        params["fromDate"] = since.isoformat()
    if until:
        params["toDate"] = until.isoformat()
    found = Discovered()
    calls, stats = asyncio.run(list_endpoint(settings, api_key, "/api/calls", params))
    found.stats.append(stats)
    now = datetime.now(timezone.utc)
    found.calls_rows = calls_rows(calls, run_id, now)
    created = dict(zip(found.calls_rows["call_id"].to_pylist(), found.calls_rows["created"].to_pylist()))
    found.call_ids = list(created)
    if refetch_after is not None:
        found.refetch = {c for c, when in created.items() if when is None or when >= refetch_after}
    latest = max((w for w in created.values() if w is not None), default=None)
    found.new_watermark = max(w for w in (latest, watermark) if w is not None) if (latest or watermark) else None
    if discovery.incremental:
        deleted, stats = asyncio.run(list_endpoint(settings, api_key, "/api/deleted_calls", {}))
        found.stats.append(stats)
        for item in deleted:
            call_id = normalize_call_id(str(item.get("callId", ""))) if isinstance(item, dict) else None
            if call_id:
                found.deleted[call_id] = _time(item.get("deleted")) or now
    return found


def watermark_row(value: datetime) -> pa.Table:
    return pa.Table.from_pylist(
        [{"key": WATERMARK_KEY, "value": value.isoformat(), "updated_at": datetime.now(timezone.utc)}],
        schema=schema.ETL_STATE.arrow_schema,
    )


def parse_watermark(text: str | None) -> datetime | None:
    return _time(text)

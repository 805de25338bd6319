"""`ultravox-stages status`: what a cron operator checks (last runs, failures, staleness).

Healthy means: the most recent finished run succeeded (a run in progress is named with
its progress but does not count until it finishes). ``status`` exits 1 otherwise, so
it can be used directly by monitoring (e.g. ``ultravox-stages status || alert``).

Run states cannot lie: a run still marked ``running`` while nobody holds the output's
writer lock died (kill -9, power loss) and is reported ``crashed``; when the output is
writable, ``status`` takes the free lock for a moment and records that. While a run is
writing, ``status`` answers from the live state the writer publishes in its lock file
(the lock object on S3; and, for Parquet and Delta, from the committed tables; a DuckDB
file is locked by its writer). An S3 lock its writer stopped refreshing is a dead one.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from pipeline import ledger
from pipeline.errors import OutputError, StagesError
from pipeline.load import lock_file, open_warehouse, query_connection
from pipeline.lock import read_lock
from pipeline.records import rfc3339

_LAST_RUNS = """
SELECT run_id, started_at, finished_at,
       round(epoch(finished_at) - epoch(started_at), 1) AS seconds,
       status, calls_requested, calls_loaded, calls_not_found, calls_failed, stages_loaded,
       http_requests, http_retries
FROM etl_runs ORDER BY started_at DESC LIMIT 5
"""
_BY_STATUS = "SELECT status, count(*) AS calls, sum(stage_count) AS stages FROM etl_calls GROUP BY status ORDER BY status"
_FAILED = """
SELECT call_id::VARCHAR AS call_id, attempts, last_attempt_at, error
FROM etl_calls WHERE status = 'failed' ORDER BY last_attempt_at DESC, call_id LIMIT 20
"""
_FAILED_COUNT = "SELECT count(*) FROM etl_calls WHERE status = 'failed'"
_LAST_SUCCESS = "SELECT max(finished_at) FROM etl_runs WHERE status = 'succeeded'"


def _rows(con: Any, sql: str) -> list[dict[str, Any]]:
    rel = con.sql(sql)
    return [dict(zip(rel.columns, row)) for row in rel.fetchall()]


def _text_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "  (none)"
    names = list(rows[0])
    cells = [[_fmt(r[n]) for n in names] for r in rows]
    widths = [max(len(n), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    lines = ["  " + "  ".join(n.ljust(w) for n, w in zip(names, widths))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


def _writer_lock(fmt: str, path: Path) -> tuple[bool, dict[str, Any]] | None:
    """(held by a live writer, its state document) of the output's writer lock; None
    when the output has no lock to probe."""
    if fmt == "delta":
        from pipeline.load.delta import read_writer_lock

        return read_writer_lock(path)
    lock = lock_file(fmt, path)
    return None if lock is None else read_lock(lock)


def _record_crashes(fmt: str, path: Path) -> None:
    """Take the free writer lock for a moment: opening marks dead runs crashed. Best
    effort: a read-only output (or a writer starting meanwhile) keeps them as they are."""
    try:
        warehouse = open_warehouse(fmt, path)
        warehouse.open()
        warehouse.close()
    except (StagesError, OSError, duckdb.Error):
        pass


def _read_tables(fmt: str, path: Path, live: dict[str, Any] | None) -> dict[str, Any] | None:
    """Runs and calls from the warehouse; None when a live writer keeps it locked."""
    try:
        con = query_connection(fmt, path)
    except OutputError:
        if live is None:
            raise
        return None
    try:
        return {
            "runs": _rows(con, _LAST_RUNS),
            "by_status": _rows(con, _BY_STATUS),
            "failed": _rows(con, _FAILED),
            "failed_count": con.execute(_FAILED_COUNT).fetchall()[0][0],
            "last_success": con.execute(_LAST_SUCCESS).fetchall()[0][0],
        }
    finally:
        con.close()


def status_report(fmt: str, path: Path, style: str) -> tuple[str, bool]:
    lock = _writer_lock(fmt, path)
    live = lock[1] if lock is not None and lock[0] else None
    tables = _read_tables(fmt, path, live)
    current = (live or {}).get("run") or None
    # Its writer is gone: the run is reported crashed whether or not that can be recorded.
    if tables is not None and live is None and lock is not None and ledger.settle_ghosts(tables["runs"]):
        _record_crashes(fmt, path)
    if tables is not None:
        last = ledger.last_finished(tables["runs"], current["run_id"] if current else None)
    else:
        last = (live or {}).get("last_finished")
    healthy = ledger.is_healthy(last)
    if style == "json":
        return _json_report(path, healthy, last, live, tables), healthy
    return _text_report(path, healthy, last, live, tables), healthy


def _writer(live: dict[str, Any] | None) -> dict[str, Any] | None:
    if live is None:
        return None
    return {"pid": live.get("pid"), "host": live.get("host"), "locked_at": live.get("started_at"), "run": live.get("run")}


def _json_report(
    path: Path, healthy: bool, last: dict[str, Any] | None, live: dict[str, Any] | None, tables: dict[str, Any] | None
) -> str:
    doc: dict[str, Any] = {"warehouse": str(path), "healthy": healthy, "last_finished_run": last, "writing_now": _writer(live)}
    if tables is None:
        doc["note"] = "the DuckDB file is locked by the run writing it; figures are from that run's live state"
    else:
        last_success = tables["last_success"]
        doc |= {
            "last_success_at": last_success,
            "hours_since_last_success": _hours_since(last_success),
            "last_runs": tables["runs"],
            "calls_by_status": tables["by_status"],
            "failed_calls": tables["failed_count"],
            "failed_calls_sample": tables["failed"],
        }
    return json.dumps(doc, default=_json_value, indent=2)


def _json_value(value: Any) -> str:
    return rfc3339(value) if isinstance(value, datetime) else str(value)


def _hours_since(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return round((datetime.now(timezone.utc) - moment).total_seconds() / 3600, 2)


def _text_report(
    path: Path, healthy: bool, last: dict[str, Any] | None, live: dict[str, Any] | None, tables: dict[str, Any] | None
) -> str:
    if healthy:
        state = "OK"
    elif last is not None:
        state = f"ATTENTION: the last run did not succeed ({last['status']})"
    else:
        state = "no finished run yet"
    parts = [f"Warehouse {path}: {state}"]
    if live is not None:
        parts.append(_describe_live(live))
    if tables is None:
        if last is not None:
            finished_at = last.get("finished_at") or "an unknown time (it crashed)"
            parts.append(f"Last finished run: {last['run_id']} {last['status']}, finished {finished_at}")
        parts.append("(the DuckDB file is locked by the run writing it; run status again when it finishes for details)")
        return "\n".join(parts)
    last_success = tables["last_success"]
    staleness = f"{_hours_since(last_success)} h ago ({_fmt(last_success)})" if last_success else "never"
    parts += [
        f"Last successful run finished: {staleness}",
        "",
        "Last runs:",
        _text_table(tables["runs"]),
        "",
        "Calls by status:",
        _text_table(tables["by_status"]),
        "",
        f"Failed calls ({tables['failed_count']}; they are retried by the next run):",
        _text_table(tables["failed"]),
    ]
    return "\n".join(parts)


def _describe_live(live: dict[str, Any]) -> str:
    run = live.get("run")
    who = f"pid {live.get('pid')} on {live.get('host')}"
    if not run:
        return f"A run is starting ({who}, since {live.get('started_at')})"
    done = run["calls_loaded"] + run["calls_not_found"] + run["calls_failed"]
    return (
        f"Run {run['run_id']} is writing now ({who}, started {run['started_at']}): "
        f"{done}/{run['calls_requested'] or '?'} calls done ({run['calls_loaded']} loaded, "
        f"{run['calls_not_found']} not found, {run['calls_failed']} failed), {run['stages_loaded']} stages"
    )

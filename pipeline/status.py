"""`ultravox-stages status`: what a cron operator checks (last runs, failures, staleness).

Healthy means: the most recent finished run succeeded. ``status`` exits 1 otherwise,
so it can be used directly by monitoring (e.g. ``ultravox-stages status || alert``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.load import query_connection

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


def status_report(fmt: str, path: Path, style: str) -> tuple[str, bool]:
    con = query_connection(fmt, path)
    try:
        runs = _rows(con, _LAST_RUNS)
        by_status = _rows(con, _BY_STATUS)
        failed = _rows(con, _FAILED)
        failed_count = con.execute(_FAILED_COUNT).fetchall()[0][0]
        last_success = con.execute(_LAST_SUCCESS).fetchall()[0][0]
    finally:
        con.close()
    finished = [r for r in runs if r["status"] != "running"]
    healthy = bool(finished) and finished[0]["status"] == "succeeded"
    now = datetime.now(timezone.utc)
    stale_hours = round((now - last_success).total_seconds() / 3600, 2) if last_success else None
    if style == "json":
        doc = {
            "warehouse": str(path),
            "healthy": healthy,
            "last_success_at": last_success,
            "hours_since_last_success": stale_hours,
            "last_runs": runs,
            "calls_by_status": by_status,
            "failed_calls": failed_count,
            "failed_calls_sample": failed,
        }
        return json.dumps(doc, default=str, indent=2), healthy
    state = "OK" if healthy else "ATTENTION: the last run did not succeed" if finished else "no finished run yet"
    staleness = f"{stale_hours} h ago ({_fmt(last_success)})" if last_success else "never"
    parts = [
        f"Warehouse {path}: {state}",
        f"Last successful run finished: {staleness}",
        "",
        "Last runs:",
        _text_table(runs),
        "",
        "Calls by status:",
        _text_table(by_status),
        "",
        f"Failed calls ({failed_count}; they are retried by the next run):",
        _text_table(failed),
    ]
    return "\n".join(parts), healthy

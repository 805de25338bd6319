"""Run bookkeeping: the one owner of etl_runs, etl_calls and etl_state rows.

A run starts ``running`` and ends ``succeeded`` (every call loaded or not found),
``partial`` (some calls failed, or replay met bad lines), ``interrupted`` (SIGINT /
SIGTERM), ``auth_failed``, ``unreachable`` or ``crashed`` (any other error; also a run
still ``running`` whose writer is gone: its ``finished_at`` stays NULL).

A call's etl_calls row is merged with its earlier one: attempts count up,
last_success_at moves only on success, a failed call keeps its last known stage_count.
A run counts distinct calls: a later outcome of a call replaces its earlier one.

The output is healthy when its most recent finished run succeeded. Backends only store
what this module builds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.errors import AuthError, UnreachableError
from pipeline.records import CANONICAL_UUID, CallOutcome, RunRecord, rfc3339, utcnow

CallStatus = Literal["loaded", "not_found", "failed"]
CALL_STATUSES: tuple[str, ...] = get_args(CallStatus)
RunStatus = Literal["running", "succeeded", "partial", "interrupted", "crashed", "auth_failed", "unreachable"]
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)

RUNNING: RunStatus = "running"
CRASHED: RunStatus = "crashed"
SUCCEEDED: RunStatus = "succeeded"
INTERRUPTED: RunStatus = "interrupted"

WATERMARK_KEY = "watermark_created"

#: The run fields every published live state carries.
_LIVE_FIELDS = ("run_id", "status", "calls_requested", "calls_loaded", "calls_not_found", "calls_failed", "stages_loaded")


# -- run states


def finished_status(calls_failed: int, bad_lines: int = 0) -> RunStatus:
    """How a run that went to its end finished."""
    return SUCCEEDED if calls_failed == 0 and bad_lines == 0 else "partial"


def status_after_error(exc: BaseException, interrupted: bool) -> RunStatus:
    """How a run that ``exc`` broke off ended (``interrupted``: a stop signal arrived)."""
    if interrupted or isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, AuthError):
        return "auth_failed"
    if isinstance(exc, UnreachableError):
        return "unreachable"
    return CRASHED


def finish(run: RunRecord, status: RunStatus, now: datetime | None = None) -> None:
    run.status = status
    run.finished_at = now or utcnow()


# -- run counts


class CallTally:
    """Each call's contribution to its run's counts, so a later outcome replaces an earlier one."""

    def __init__(self) -> None:
        #: call key → stage_count * len(CALL_STATUSES) + status index (one small int per call).
        self._counted: dict[int | str, int] = {}

    def __contains__(self, call_id: object) -> bool:
        return isinstance(call_id, str) and _call_key(call_id) in self._counted

    def __len__(self) -> int:
        return len(self._counted)

    def count(self, run: RunRecord, outcome: CallOutcome) -> None:
        key = _call_key(outcome.call_id)
        earlier = self._counted.get(key)
        if earlier is not None:
            stages, index = divmod(earlier, len(CALL_STATUSES))
            _add(run, CALL_STATUSES[index], stages, -1)
        stages = (outcome.stage_count or 0) if outcome.status == "loaded" else 0
        self._counted[key] = stages * len(CALL_STATUSES) + CALL_STATUSES.index(outcome.status)
        _add(run, outcome.status, stages, 1)


def _call_key(call_id: str) -> int | str:
    """A canonical UUID's 128 bits (an int of 44 bytes, its text takes 85); any other id as it is."""
    return int(call_id.replace("-", ""), 16) if CANONICAL_UUID.fullmatch(call_id) else call_id


def _add(run: RunRecord, status: str, stages: int, sign: int) -> None:
    if status == "loaded":
        run.calls_loaded += sign
        run.stages_loaded += sign * stages
    elif status == "not_found":
        run.calls_not_found += sign
    else:
        run.calls_failed += sign


# -- etl_runs


def run_row(run: RunRecord) -> dict[str, Any]:
    """The etl_runs row of ``run`` (options as JSON text)."""
    row = run.as_row()
    row["options"] = json.dumps(row["options"], sort_keys=True)
    return row


def run_table(run: RunRecord) -> pa.Table:
    return pa.Table.from_pylist([run_row(run)], schema=schema.ETL_RUNS.arrow_schema)


def crashed_runs(runs: pa.Table) -> pa.Table:
    """The runs still ``running``, now ``crashed``: read with the writer lock held, their writer is dead."""
    running = runs.filter(pc.equal(runs["status"], RUNNING))
    column = running.schema.get_field_index("status")
    crashed = pa.array([CRASHED] * running.num_rows, running.schema.field("status").type)
    return running.set_column(column, running.schema.field("status"), crashed)


def latest_run(runs: pa.Table) -> dict[str, Any] | None:
    """``{"run_id", "status", "finished_at"}`` of the most recent run (by started_at), or None."""
    if not runs.num_rows:
        return None
    latest = runs.take(pc.sort_indices(runs, [("started_at", "descending")])[:1]).to_pylist()[0]
    return {"run_id": latest["run_id"], "status": latest["status"], "finished_at": latest["finished_at"]}


# -- live state and health


def live_state(fmt: str, run: RunRecord | None, last_finished: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a writer publishes in its lock file for ``status`` in another process."""
    last = dict(last_finished) if last_finished is not None else None
    if last is not None and isinstance(last.get("finished_at"), datetime):
        last["finished_at"] = rfc3339(last["finished_at"])
    state: dict[str, Any] = {"format": fmt, "last_finished": last, "run": None}
    if run is not None:
        state["run"] = {name: getattr(run, name) for name in _LIVE_FIELDS} | {"started_at": rfc3339(run.started_at)}
    return state


def settle_ghosts(runs: Iterable[dict[str, Any]]) -> bool:
    """Runs still ``running`` while the writer lock is free are ``crashed``; True if there were any."""
    ghosts = [run for run in runs if run["status"] == RUNNING]
    for run in ghosts:
        run["status"] = CRASHED
    return bool(ghosts)


def last_finished(runs: Sequence[dict[str, Any]], current_run_id: str | None) -> dict[str, Any] | None:
    """The most recent finished run of ``runs`` (newest first), not counting the one writing now."""
    for run in runs:
        if run["status"] != RUNNING and run["run_id"] != current_run_id:
            return {k: run[k] for k in ("run_id", "status", "finished_at")}
    return None


def is_healthy(last: Mapping[str, Any] | None) -> bool:
    return last is not None and last["status"] == SUCCEEDED


# -- etl_calls


def outcomes_table(outcomes: Sequence[CallOutcome], run_id: str) -> pa.Table:
    """The batch's etl_calls updates as Arrow (before merging with earlier attempts)."""
    return pa.table(
        {
            "call_id": pa.array([o.call_id for o in outcomes], pa.string()),
            "status": pa.array([o.status for o in outcomes], pa.string()),
            "stage_count": pa.array([o.stage_count for o in outcomes], pa.int32()),
            "last_run_id": pa.array([run_id] * len(outcomes), pa.string()),
            "attempted_at": pa.array(
                [o.attempted_at for o in outcomes], schema.ETL_CALLS.arrow_schema.field("last_attempt_at").type
            ),
            "error": pa.array([o.error for o in outcomes], pa.string()),
        }
    )


def merged_etl_calls(batch: pa.Table, previous: pa.Table) -> pa.Table:
    """The batch's etl_calls rows (:func:`outcomes_table`) merged with the calls' stored
    rows (``previous``, at most one per call)."""
    call_ids = pc.utf8_lower(pc.utf8_trim_whitespace(batch["call_id"]))
    previous = previous.select(schema.ETL_CALLS.column_names).cast(schema.ETL_CALLS.arrow_schema)
    stored = previous.take(pc.index_in(call_ids, value_set=pc.utf8_lower(previous["call_id"])))
    failed = pc.equal(batch["status"], "failed")
    merged = {
        "call_id": call_ids,
        "status": batch["status"],
        "stage_count": pc.if_else(failed, stored["stage_count"], batch["stage_count"]),
        "attempts": pc.add(pc.coalesce(stored["attempts"], pa.scalar(0, pa.int32())), pa.scalar(1, pa.int32())),
        "last_run_id": batch["last_run_id"],
        "last_attempt_at": batch["attempted_at"],
        "last_success_at": pc.if_else(failed, stored["last_success_at"], batch["attempted_at"]),
        "error": batch["error"],
    }
    return pa.table(merged).cast(schema.ETL_CALLS.arrow_schema)


# -- etl_state


def watermark_row(value: datetime) -> pa.Table:
    """The etl_state row holding the incremental watermark."""
    return pa.Table.from_pylist(
        [{"key": WATERMARK_KEY, "value": rfc3339(value), "updated_at": utcnow()}],
        schema=schema.ETL_STATE.arrow_schema,
    )


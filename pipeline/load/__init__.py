"""Warehouses: where transformed Arrow tables are committed, per call, idempotently.

Both outputs implement :class:`Warehouse`. The contract every implementation keeps:

* ``commit_calls`` is atomic for the whole batch: for every call in ``outcomes`` whose
  status is ``loaded`` or ``not_found``, the call's previous rows in the three data
  tables are removed and the rows in ``tables`` inserted; ``failed`` calls keep their
  previous rows. etl_calls is upserted in the same commit (attempts + 1).
* After any sequence of runs and crashes, primary keys are unique.
* One writer at a time (``OutputLock``); ``open`` refuses an output that is not ours.

Write-behind (``write_behind=True``, used by ``replay``): ``commit_calls`` returns as
soon as the batch is handed to one background committer thread (at most one batch in
flight), so the caller parses and transforms the next batch while DuckDB or pyarrow
(which release the GIL) write this one on the other core. Commits stay atomic and in
order; every other method waits for the batch in flight first (``_settle``) and a
failed commit is raised by the next call. The price: a kill -9 can lose the batch in
flight although ``commit_calls`` returned, exactly as if the process had died just
before it: none of its calls is recorded, so they are read (or fetched) again.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from types import TracebackType

import duckdb
import pyarrow as pa

from pipeline import schema
from pipeline.records import CallOutcome, RunRecord


class Warehouse(abc.ABC):
    format: str = ""

    def __init__(self, path: Path, wait_for_lock: bool = False, write_behind: bool = False):
        self.path = path
        self.wait_for_lock = wait_for_lock
        self.write_behind = write_behind
        self._committer: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    @abc.abstractmethod
    def open(self) -> None:
        """Validate the output, take the writer lock, create tables, heal leftovers."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def call_statuses(self) -> dict[str, str]:
        """call_id → status for every call in etl_calls."""

    @abc.abstractmethod
    def save_run(self, run: RunRecord) -> None:
        """Insert or update the etl_runs row of ``run``."""

    def commit_calls(self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome], run_id: str) -> None:
        """Commit one batch atomically (see the module docstring), maybe write-behind."""
        if not outcomes:
            return
        self._settle()
        if not self.write_behind:
            self._commit_batch(tables, outcomes, run_id)
            return
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.format}-commit")
        # Copies: the caller may reuse its containers (Arrow tables are immutable).
        self._pending = self._committer.submit(self._commit_batch, dict(tables), list(outcomes), run_id)

    @abc.abstractmethod
    def _commit_batch(self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome], run_id: str) -> None:
        """The commit itself; never runs concurrently with any other method."""

    def _settle(self) -> None:
        """Wait for the batch in flight; raise its error (once). Call before any other work."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _stop_committer(self) -> None:
        """For ``close``: settle, then stop the committer thread (also when settling raises)."""
        try:
            self._settle()
        finally:
            if self._committer is not None:
                self._committer.shutdown(wait=True)
                self._committer = None

    @abc.abstractmethod
    def upsert(self, table: schema.Table, rows: pa.Table) -> None:
        """Insert or replace rows of an unpartitioned table by its primary key."""

    @abc.abstractmethod
    def read_state(self, key: str) -> str | None:
        """A value from etl_state (e.g. the incremental watermark), or None."""

    @abc.abstractmethod
    def flag_deleted(self, deleted: Mapping[str, datetime]) -> None:
        """Set calls.deleted_at (where not set yet) for listed calls that were deleted."""

    def __enter__(self) -> Warehouse:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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


def deleted_table(deleted: Mapping[str, datetime]) -> pa.Table:
    return pa.table(
        {
            "call_id": pa.array(list(deleted), pa.string()),
            "deleted_at": pa.array(list(deleted.values()), schema.CALLS.arrow_schema.field("deleted_at").type),
        }
    )


#: SQL merging a batch of outcomes (``batch_outcomes``) with existing etl_calls rows
#: (``previous``): attempts count up, last_success_at moves only on success, a failed
#: call keeps its last known stage_count.
MERGE_ETL_CALLS_SQL = """
SELECT
  o.call_id::UUID AS call_id,
  o.status,
  CASE WHEN o.status = 'failed' THEN p.stage_count ELSE o.stage_count END AS stage_count,
  COALESCE(p.attempts, 0) + 1 AS attempts,
  o.last_run_id,
  o.attempted_at AS last_attempt_at,
  CASE WHEN o.status = 'failed' THEN p.last_success_at ELSE o.attempted_at END AS last_success_at,
  o.error
FROM batch_outcomes o
LEFT JOIN previous p ON p.call_id = o.call_id::UUID
"""


def open_warehouse(
    fmt: str, path: Path, wait_for_lock: bool = False, memory_limit: str = "96MB", write_behind: bool = False
) -> Warehouse:
    if fmt == "duckdb":
        from pipeline.load.duckdb import DuckDBWarehouse

        return DuckDBWarehouse(path, wait_for_lock, memory_limit, write_behind)
    if fmt == "parquet":
        from pipeline.load.parquet import ParquetWarehouse

        return ParquetWarehouse(path, wait_for_lock, write_behind)
    if fmt == "delta":
        from pipeline.load.delta import DeltaWarehouse

        return DeltaWarehouse(path, wait_for_lock, write_behind)
    raise ValueError(f"unknown format {fmt!r}")


def query_connection(fmt: str, path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection exposing the tables by name (reports, status)."""
    if fmt == "duckdb":
        from pipeline.load.duckdb import connect_read_only

        return connect_read_only(path)
    if fmt == "delta":
        from pipeline.load.delta import connect_views as connect_delta_views

        return connect_delta_views(path)
    from pipeline.load.parquet import connect_views

    return connect_views(path)

"""Warehouses: where transformed Arrow tables are committed, per call, idempotently.

Every output implements :class:`Warehouse`; the bookkeeping rows (etl_runs, etl_calls,
etl_state) are built by :mod:`pipeline.ledger`, a backend only stores them. The contract
every implementation keeps:

* ``commit_calls`` is atomic for the whole batch: for every call in ``outcomes`` whose
  status is ``loaded`` or ``not_found``, the call's previous rows in the three data
  tables are removed and the rows in ``tables`` inserted; ``failed`` calls keep their
  previous rows. etl_calls is upserted in the same commit (attempts + 1).
* After any sequence of runs and crashes, primary keys are unique: ``commit_calls``
  refuses a batch repeating a key of a data table (``ValueError``). A stage id belongs
  to one call: a call bringing a stage id the warehouse stores under another call
  (one not replaced in the same batch) is committed ``failed`` with "stage <id> is
  already owned by call <id>" and none of its rows; ``commit_calls`` returns the
  outcomes as committed.
* One writer at a time (``OutputLock``); ``open`` refuses an output that is not ours,
  or a path where nothing can be written (``OutputError``, exit 2). Holding the lock,
  it marks every run still ``running`` as ``crashed`` (its writer is dead; its
  ``finished_at`` stays NULL) and publishes the live state in the lock file, which
  ``publish(run)`` refreshes for ``status`` in other processes.
* Storage failures (disk full, permission denied, read-only file system, DuckDB
  I/O, transaction and memory errors) raise one ``WarehouseError`` (exit 4) naming
  the first cause; after it the warehouse refuses further writes with that cause.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import ledger, schema
from pipeline.errors import OutputError, StagesError, WarehouseError
from pipeline.lock import OutputLock
from pipeline.records import CallOutcome, RunRecord

if TYPE_CHECKING:  # DuckDB is loaded only by the outputs and commands that use it
    import duckdb


class Warehouse(abc.ABC):
    """Base of every output. A backend implements the abstract methods below and sets
    ``self._lock`` (an :class:`OutputLock`) in ``__init__``; ``open``/``close`` of the
    backend call :meth:`_after_open` once the lock is held and the tables exist."""

    format: str = ""
    #: Failures of the storage itself (disk, permissions, memory); anything else is a bug and stays itself.
    storage_errors: tuple[type[BaseException], ...] = (OSError,)
    _lock: OutputLock

    def __init__(
        self, path: Path, wait_for_lock: bool = False, wait_seconds: float | None = None
    ):
        self.path = path
        self.wait_for_lock = wait_for_lock
        self.wait_seconds = wait_seconds
        #: The first write failure: later failures (a rollback, the final save_run) report it, not themselves.
        self._failure: WarehouseError | None = None
        self._last_finished: dict[str, Any] | None = None

    @abc.abstractmethod
    def open(self) -> None:
        """Validate the output, take the writer lock, create tables, heal leftovers,
        then call :meth:`_after_open`."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def call_statuses(self) -> dict[str, str]:
        """call_id → status for every call in etl_calls."""

    def save_run(self, run: RunRecord) -> None:
        """Insert or update the etl_runs row of ``run``."""
        self.upsert(schema.ETL_RUNS, ledger.run_table(run))

    @abc.abstractmethod
    def _stored_stage_owners(self, stage_ids: pa.Array) -> pa.Table:
        """Stored call_stages rows whose call_stage_id is in ``stage_ids`` (lowercase
        strings): columns ``call_stage_id`` and ``call_id``, both lowercase strings."""

    @abc.abstractmethod
    def _stored_runs(self) -> pa.Table:
        """Every etl_runs row, with the schema's columns."""

    def _last_finished_run(self) -> dict[str, Any] | None:
        return ledger.latest_run(self._stored_runs())

    def _after_open(self) -> None:
        """Common end of ``open``: dead runs become crashed, the live state is published."""
        with self._writing():
            self.upsert(schema.ETL_RUNS, ledger.crashed_runs(self._stored_runs()))
        self._last_finished = self._last_finished_run()
        self.publish(None)

    def publish(self, run: RunRecord | None) -> None:
        """Publish the live state (run in progress, its counts, the last finished run)
        for ``status`` in another process; cheap, atomic for readers."""
        try:
            self._lock.publish(ledger.live_state(self.format, run, self._last_finished))
        except OSError as exc:
            raise self._write_failure(exc) from exc

    def commit_calls(
        self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome], run_id: str
    ) -> list[CallOutcome]:
        """Commit one batch atomically (see the module docstring).

        Returns the outcomes as committed: a call holding a stage id that the warehouse
        already stores under another call (one not replaced by this batch) is turned
        ``failed`` and its rows are dropped; the owner keeps its stage.

        ``tables`` is handed over: a warehouse may empty the mapping while it commits
        (Parquet does, so that each table's rows are freed once their files are written).
        """
        if not outcomes:
            return []
        _check_unique_keys(tables)
        with self._writing():
            tables, outcomes = self._claim_stages(tables, outcomes)
            self._commit_batch(tables, outcomes, run_id)
        return outcomes

    def _claim_stages(
        self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome]
    ) -> tuple[Mapping[str, pa.Table], list[CallOutcome]]:
        """One anti-join of the batch's stage ids against the stored ones."""
        stages = tables.get(schema.CALL_STAGES.name)
        if stages is None or not stages.num_rows:
            return tables, list(outcomes)
        stage_ids = pc.utf8_lower(stages["call_stage_id"].combine_chunks().cast(pa.string()))
        owners = self._stored_stage_owners(stage_ids)
        if not owners.num_rows:
            return tables, list(outcomes)
        replaced = {_normal_id(o.call_id) for o in outcomes if o.status != "failed"}
        stored = dict(zip(owners["call_stage_id"].to_pylist(), owners["call_id"].to_pylist(), strict=True))
        losers: dict[str, str] = {}
        for stage_id, call_id in zip(stage_ids.to_pylist(), pc.utf8_lower(stages["call_id"].cast(pa.string())).to_pylist(), strict=True):
            owner = stored.get(stage_id)
            if owner is not None and owner != call_id and owner not in replaced and call_id not in losers:
                losers[call_id] = f"stage {stage_id} is already owned by call {owner}"
        if not losers:
            return tables, list(outcomes)
        drop = pa.array(list(losers), pa.string())
        kept = {
            name: rows.filter(pc.invert(pc.is_in(pc.utf8_lower(rows["call_id"].cast(pa.string())), value_set=drop)))
            for name, rows in tables.items()
        }
        committed = [
            CallOutcome(o.call_id, "failed", None, losers[_normal_id(o.call_id)], o.attempted_at)
            if _normal_id(o.call_id) in losers
            else o
            for o in outcomes
        ]
        return kept, committed

    @abc.abstractmethod
    def _commit_batch(self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome], run_id: str) -> None:
        """The commit itself."""

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Around every write: storage failures become one WarehouseError naming the
        real cause; after a first failure the warehouse refuses further writes with
        that first cause (a half-failed commit leaves nothing worth writing on top)."""
        if self._failure is not None:
            raise WarehouseError(str(self._failure))
        try:
            yield
        except StagesError:
            raise
        except self.storage_errors as exc:
            raise self._write_failure(exc) from exc

    def _write_failure(self, exc: BaseException) -> WarehouseError:
        if self._failure is None:
            self._failure = WarehouseError(f"cannot write to {self.path}: {describe_failure(exc)}")
        return WarehouseError(str(self._failure))

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


def _check_unique_keys(tables: Mapping[str, pa.Table]) -> None:
    """The data tables declare no key in the warehouse: a batch repeating one is refused."""
    for table in schema.DATA_TABLES:
        rows = tables.get(table.name)
        if rows is None or not rows.num_rows:
            continue
        keys = list(table.primary_key)
        distinct = rows.select(keys).group_by(keys).aggregate([]).num_rows
        if distinct != rows.num_rows:
            raise ValueError(f"{table.name}: the batch repeats a primary key ({', '.join(keys)})")


def _normal_id(call_id: str) -> str:
    try:
        return str(uuid.UUID(call_id.strip()))
    except (ValueError, AttributeError):
        return call_id


def describe_failure(exc: BaseException) -> str:
    """One line naming the real cause of a storage failure (errno text first)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{os.strerror(exc.errno)}{where}"
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        cause = os.strerror(code)
        if cause.lower() in str(exc).lower() and cause.lower() not in line.lower():
            return f"{cause}: {line}"
    return line


def open_failure(path: Path, what: str, exc: BaseException) -> StagesError:
    """A failure while opening: a full disk is a write failure (exit 4), anything else
    means the output is unusable (exit 2)."""
    cause = describe_failure(exc)
    if os.strerror(errno.ENOSPC).lower() in str(exc).lower() or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return WarehouseError(f"cannot write to {path}: {cause}")
    return OutputError(f"cannot open {what} {path}: {cause}")


def _is_remote(location: str | Path) -> bool:
    return "://" in str(location)


def check_local_output(path: Path, kind: str) -> None:
    """Refuse, at open, a path that cannot hold ``kind``: a file as an ancestor, a
    read-only or not writable location. (Existing-output checks are the backend's.)"""
    folder = path.parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"--output {path}: {folder} is a file, not a folder; choose another --output")
    for target in [folder, path] if path.exists() else [folder]:
        if not os.access(target, os.W_OK) or (target.is_dir() and not os.access(target, os.X_OK)):
            reason = "read-only file system" if _read_only_fs(target) else "permission denied"
            raise OutputError(f"--output {path}: cannot write the {kind} there ({reason}); choose another --output")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def deleted_table(deleted: Mapping[str, datetime]) -> pa.Table:
    return pa.table(
        {
            "call_id": pa.array(list(deleted), pa.string()),
            "deleted_at": pa.array(list(deleted.values()), schema.CALLS.arrow_schema.field("deleted_at").type),
        }
    )


def open_warehouse(
    fmt: str,
    location: str | Path,
    wait_for_lock: bool = False,
    memory_limit: str = "96MB",
    wait_seconds: float | None = None,
) -> Warehouse:
    """The warehouse for ``fmt`` at ``location`` (not opened yet). Object-store URLs
    (``s3://…``) are for Delta only."""
    if fmt == "delta":
        from pipeline.load.delta import DeltaWarehouse

        return DeltaWarehouse(location, wait_for_lock, wait_seconds)  # type: ignore[arg-type]
    if _is_remote(location):
        what = "the Parquet folder" if fmt == "parquet" else "the DuckDB file"
        raise OutputError(f"--output {location}: {what} needs a local disk; use --format delta for object storage")
    path = Path(location)
    if fmt == "duckdb":
        from pipeline.load.duckdb import DuckDBWarehouse

        return DuckDBWarehouse(path, wait_for_lock, memory_limit, wait_seconds)
    if fmt == "parquet":
        from pipeline.load.parquet import ParquetWarehouse

        return ParquetWarehouse(path, wait_for_lock, wait_seconds)
    raise ValueError(f"unknown format {fmt!r}")


def lock_file(fmt: str, location: str | Path) -> Path | None:
    """Where the writer lock (and its live state document) of an output lives."""
    if fmt == "duckdb":
        from pipeline.load.duckdb import lock_path

        return lock_path(Path(location))
    if fmt == "parquet":
        from pipeline.load.parquet import lock_path as parquet_lock_path

        return parquet_lock_path(Path(location))
    if fmt == "delta":
        from pipeline.load import delta

        finder = getattr(delta, "lock_path", None)
        return finder(location) if finder is not None else None
    return None


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

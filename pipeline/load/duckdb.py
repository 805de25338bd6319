"""DuckDB output: one file, tables from schema.py, one transaction per batch of calls."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline import schema
from pipeline.errors import OutputError
from pipeline.load import MERGE_ETL_CALLS_SQL, Warehouse, deleted_table, outcomes_table
from pipeline.lock import OutputLock
from pipeline.records import CallOutcome, RunRecord

_MAGIC_OFFSET, _MAGIC = 8, b"DUCK"
#: DuckDB checkpoints (rewrites table data and serialises the primary-key indexes
#: into the file) whenever the WAL passes this size; its default, 16MB, is a batch or
#: two of stages, so a long run re-wrote indexes of the whole table every commit or
#: two (quadratic: a 100,000-stage replay spent 30 s in commits). Commits append to
#: the WAL; the checkpoint happens once this much has piled up, and at close.
CHECKPOINT_THRESHOLD = "1GB"


def check_is_duckdb_file(path: Path) -> None:
    """Refuse to touch a file that exists and is not a DuckDB database."""
    if path.is_dir():
        raise OutputError(f"--output {path} is a folder, not a DuckDB file (use --format parquet for folders)")
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as fh:
            head = fh.read(_MAGIC_OFFSET + len(_MAGIC))
        if head[_MAGIC_OFFSET:] != _MAGIC:
            raise OutputError(f"--output {path} exists and is not a DuckDB file; refusing to touch it")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    for table in schema.TABLES.values():
        con.execute(table.create_sql())


class DuckDBWarehouse(Warehouse):
    format = "duckdb"

    def __init__(
        self, path: Path, wait_for_lock: bool = False, memory_limit: str = "96MB", write_behind: bool = False
    ):
        super().__init__(path, wait_for_lock, write_behind)
        self.memory_limit = memory_limit
        self._lock = OutputLock(lock_path(path), wait=wait_for_lock)
        self._con: duckdb.DuckDBPyConnection | None = None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        assert self._con is not None, "warehouse not open"
        return self._con

    def open(self) -> None:
        check_is_duckdb_file(self.path)
        self._lock.acquire()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Bounded memory whatever the input size: DuckDB would otherwise let its
            # buffer pool grow towards 80% of RAM during a long replay.
            config = {"memory_limit": self.memory_limit, "checkpoint_threshold": CHECKPOINT_THRESHOLD}
            self._con = duckdb.connect(str(self.path), config=config)
            create_tables(self._con)
        except duckdb.Error as exc:
            self._lock.release()
            raise OutputError(f"cannot open DuckDB file {self.path}: {exc}") from exc

    def close(self) -> None:
        try:
            self._stop_committer()
        finally:
            if self._con is not None:
                self._con.close()
                self._con = None
            self._lock.release()

    def call_statuses(self) -> dict[str, str]:
        self._settle()
        rows = self.con.execute("SELECT call_id::VARCHAR, status FROM etl_calls").fetchall()
        return dict(rows)

    def save_run(self, run: RunRecord) -> None:
        self._settle()
        row = run.as_row()
        row["options"] = json.dumps(row["options"], sort_keys=True)
        cols = schema.ETL_RUNS.column_names
        placeholders = ", ".join("?" for _ in cols)
        self.con.execute(
            f"INSERT OR REPLACE INTO etl_runs ({', '.join(cols)}) VALUES ({placeholders})",
            [row[c] for c in cols],
        )

    def upsert(self, table: schema.Table, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        self._settle()
        self.con.register("upsert_rows", rows)
        try:
            self.con.execute(f"INSERT OR REPLACE INTO {table.name} BY NAME SELECT * FROM upsert_rows")
        finally:
            self.con.unregister("upsert_rows")

    def read_state(self, key: str) -> str | None:
        self._settle()
        rows = self.con.execute("SELECT value FROM etl_state WHERE key = ?", [key]).fetchall()
        return rows[0][0] if rows else None

    def flag_deleted(self, deleted: Mapping[str, datetime]) -> None:
        self._settle()
        self.con.register("deleted_calls", deleted_table(deleted))
        try:
            self.con.execute(
                "UPDATE calls SET deleted_at = d.deleted_at FROM deleted_calls d "
                "WHERE calls.call_id = d.call_id::UUID AND calls.deleted_at IS NULL"
            )
        finally:
            self.con.unregister("deleted_calls")

    def _commit_batch(self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome], run_id: str) -> None:
        con = self.con
        batch_outcomes = outcomes_table(outcomes, run_id)  # noqa: F841 (read by SQL)
        con.register("batch_outcomes", batch_outcomes)
        con.begin()
        try:
            # A call's stages are replaced as a unit: delete whatever the warehouse held
            # for the calls that answered (loaded or 404) and insert the new rows.
            # Failed calls keep their previous rows. Only calls in etl_calls can have
            # rows (both are committed together), so a batch of new calls skips the
            # scans of the data tables.
            replaced = "(SELECT call_id::UUID FROM batch_outcomes WHERE status <> 'failed')"
            known = con.execute(f"SELECT count(*) FROM etl_calls WHERE call_id IN {replaced}").fetchall()[0][0]
            for table in schema.DATA_TABLES:
                if known:
                    con.execute(f"DELETE FROM {table.name} WHERE call_id IN {replaced}")
                rows = tables.get(table.name)
                if rows is not None and rows.num_rows:
                    con.register("batch_rows", rows)
                    con.execute(f"INSERT INTO {table.name} BY NAME SELECT * FROM batch_rows")
                    con.unregister("batch_rows")
            con.execute(
                "CREATE OR REPLACE TEMP TABLE previous AS SELECT * FROM etl_calls "
                "WHERE call_id IN (SELECT call_id::UUID FROM batch_outcomes)"
            )
            con.execute(f"INSERT OR REPLACE INTO etl_calls {MERGE_ETL_CALLS_SQL}")
            con.execute("DROP TABLE previous")
            con.commit()
        except BaseException:
            con.rollback()
            raise
        finally:
            con.unregister("batch_outcomes")


def connect_read_only(path: Path) -> duckdb.DuckDBPyConnection:
    if not path.exists():
        raise OutputError(f"no warehouse at {path}: run `ultravox-stages run` (or `demo`) first")
    check_is_duckdb_file(path)
    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        raise OutputError(f"cannot open DuckDB file {path} for reading: {exc}") from exc

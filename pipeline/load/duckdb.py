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

    def __init__(self, path: Path, wait_for_lock: bool = False, memory_limit: str = "512MB"):
        super().__init__(path, wait_for_lock)
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
            self._con = duckdb.connect(str(self.path), config={"memory_limit": self.memory_limit})
            create_tables(self._con)
        except duckdb.Error as exc:
            self._lock.release()
            raise OutputError(f"cannot open DuckDB file {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        self._lock.release()

    def call_statuses(self) -> dict[str, str]:
        rows = self.con.execute("SELECT call_id::VARCHAR, status FROM etl_calls").fetchall()
        return dict(rows)

    def save_run(self, run: RunRecord) -> None:
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
        self.con.register("upsert_rows", rows)
        try:
            self.con.execute(f"INSERT OR REPLACE INTO {table.name} BY NAME SELECT * FROM upsert_rows")
        finally:
            self.con.unregister("upsert_rows")

    def read_state(self, key: str) -> str | None:
        rows = self.con.execute("SELECT value FROM etl_state WHERE key = ?", [key]).fetchall()
        return rows[0][0] if rows else None

    def flag_deleted(self, deleted: Mapping[str, datetime]) -> None:
        self.con.register("deleted_calls", deleted_table(deleted))
        try:
            self.con.execute(
                "UPDATE calls SET deleted_at = d.deleted_at FROM deleted_calls d "
                "WHERE calls.call_id = d.call_id::UUID AND calls.deleted_at IS NULL"
            )
        finally:
            self.con.unregister("deleted_calls")

    def commit_calls(
        self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome], run_id: str
    ) -> None:
        if not outcomes:
            return
        con = self.con
        batch_outcomes = outcomes_table(outcomes, run_id)  # noqa: F841 (read by SQL)
        con.register("batch_outcomes", batch_outcomes)
        con.begin()
        try:
            # A call's stages are replaced as a unit: delete whatever the warehouse held
            # for the calls that answered (loaded or 404) and insert the new rows.
            # Failed calls keep their previous rows.
            for table in schema.DATA_TABLES:
                con.execute(
                    f"DELETE FROM {table.name} WHERE call_id IN "
                    "(SELECT call_id::UUID FROM batch_outcomes WHERE status <> 'failed')"
                )
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

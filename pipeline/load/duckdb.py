"""DuckDB output: one file, tables from schema.py, one transaction per batch of calls.

Memory: the connection's ``memory_limit`` (``duckdb_memory_limit``) bounds the buffer
pool, and DuckDB spills to ``<output>.tmp/`` (removed at close when empty). A batch
is held in memory whole while it is inserted and logged, which spilling cannot help,
so before a commit the limit is raised to :data:`BATCH_MEMORY_FACTOR` times the
batch's Arrow bytes when that is more, and set back after: a batch the tool built
(even one call with a huge prompt) never fails for memory.

Compatibility: a new file is created with storage version :data:`STORAGE_VERSION`,
so DuckDB 1.x readers (CLI, other languages) open it; newer DuckDB reads it too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.duckdb_arrow import STORAGE_ERRORS, to_arrow
from pipeline import schema
from pipeline.errors import OutputError
from pipeline.ledger import merged_etl_calls, outcomes_table
from pipeline.load import Warehouse, check_local_output, deleted_table, open_failure
from pipeline.lock import OutputLock, read_lock
from pipeline.records import CallOutcome

_MAGIC_OFFSET, _MAGIC = 8, b"DUCK"
#: Rows per row group: small groups keep a batch's big strings from piling up in memory before a write.
ROW_GROUP_SIZE = 2048
#: Share of the memory limit that unspillable long strings committed since the last checkpoint may pin.
UNFLUSHED_SHARE = 0.5
#: Below the size from which DuckDB pins a string in memory until a checkpoint.
PINNED_STRING_BYTES = 32 << 10
#: DuckDB's own checkpoint threshold (WAL size) while long strings are pending: the warehouse
#: checkpoints itself once a row group's worth of stages came in (or at UNFLUSHED_SHARE).
DEFERRED_CHECKPOINT_THRESHOLD = "1GB"
#: Storage format of new files: the oldest DuckDB supported, so every 1.x reader from it on opens them.
STORAGE_VERSION = "v1.2.0"
#: The memory limit set for a moment after each commit, to make DuckDB release what it freed.
RELEASE_TO_BYTES = 8 << 20
#: Non-spillable memory of a commit, in batch Arrow bytes (rows, DuckDB's copy, the WAL buffer).
BATCH_MEMORY_FACTOR = 4
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """DuckDB's size syntax ('96MB', '1.5GiB', '500 KB'); MB is 10^6 bytes, as in DuckDB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 256MB or 1GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def batch_memory(base: int, batch_bytes: int) -> int:
    """The memory limit a commit of ``batch_bytes`` (Arrow) needs."""
    return max(base, BATCH_MEMORY_FACTOR * batch_bytes)


def pinned_bytes(tables: Mapping[str, pa.Table]) -> int:
    """Bytes of the strings DuckDB keeps in memory until a checkpoint."""
    total = 0
    for table in tables.values():
        for column in table.columns:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                lengths = pc.binary_length(column)
                long = pc.filter(lengths, pc.greater_equal(lengths, PINNED_STRING_BYTES))
                total += pc.sum(long).as_py() or 0
    return total


def temp_path(path: Path) -> Path:
    """Where DuckDB spills (DuckDB's own default for a file, made explicit)."""
    return path.with_name(path.name + ".tmp")


def check_is_duckdb_file(path: Path) -> None:
    """Refuse to touch a file that exists and is not a DuckDB database, or a path
    where no DuckDB file can be written."""
    if path.is_dir():
        raise OutputError(f"--output {path} is a folder, not a DuckDB file (use --format parquet for folders)")
    check_local_output(path, "DuckDB file")
    check_is_duckdb_file_header(path)


def check_is_duckdb_file_header(path: Path) -> None:
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
    storage_errors = STORAGE_ERRORS

    def __init__(
        self,
        path: Path,
        wait_for_lock: bool = False,
        memory_limit: str = "96MB",
        wait_seconds: float | None = None,
    ):
        super().__init__(path, wait_for_lock, wait_seconds)
        self.memory_limit = memory_limit
        self._base_memory = parse_bytes(memory_limit)
        self._lock = OutputLock(lock_path(path), wait=wait_for_lock, wait_seconds=wait_seconds)
        self._con: duckdb.DuckDBPyConnection | None = None
        #: Bytes of long strings committed since the last checkpoint (they stay in memory until one).
        self._unflushed = 0
        #: Stages committed since long strings made the warehouse checkpoint itself (None: DuckDB does).
        self._deferred_stages: int | None = None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        assert self._con is not None, "warehouse not open"
        return self._con

    def open(self) -> None:
        check_is_duckdb_file(self.path)
        self._lock.acquire()
        try:
            self._connect()
            self._after_open()
        except BaseException:
            self._close_connection()
            self._lock.release()
            raise

    def _connect(self) -> None:
        # DuckDB's buffer pool would otherwise grow towards most of RAM during a long replay.
        config = {
            "memory_limit": self.memory_limit,
            "temp_directory": str(temp_path(self.path)),
            "threads": 1,
            "preserve_insertion_order": False,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(config=config)
            try:
                path = str(self.path).replace("'", "''")
                # Storage version and row-group size apply to a new file; an existing one keeps its own.
                con.execute(
                    f"ATTACH '{path}' AS warehouse (STORAGE_VERSION '{STORAGE_VERSION}', ROW_GROUP_SIZE {ROW_GROUP_SIZE})"
                )
                con.execute("USE warehouse")
                con.execute("SET force_compression = 'zstd'")
                create_tables(con)
            except BaseException:
                con.close()
                raise
            self._con = con
            self._unflushed, self._deferred_stages = 0, None
        except (duckdb.Error, OSError) as exc:
            raise open_failure(self.path, "DuckDB file", exc) from exc

    def close(self) -> None:
        try:
            self._close_connection()
        except self.storage_errors as exc:  # the closing checkpoint writes too
            raise self._write_failure(exc) from exc
        finally:
            self._lock.release()

    def _close_connection(self) -> None:
        con, self._con = self._con, None
        if con is None:
            return
        try:
            con.close()
        finally:
            _remove_empty_dir(temp_path(self.path))

    def call_statuses(self) -> dict[str, str]:
        rows = self.con.execute("SELECT call_id::VARCHAR, status FROM etl_calls").fetchall()
        return dict(rows)

    def _stored_runs(self) -> pa.Table:
        return to_arrow(self.con.sql("SELECT * FROM etl_runs"))

    def _stored_stage_owners(self, stage_ids: pa.Array) -> pa.Table:
        con = self.con
        if not con.execute("SELECT EXISTS (SELECT 1 FROM call_stages)").fetchall()[0][0]:
            return pa.table({"call_stage_id": pa.array([], pa.string()), "call_id": pa.array([], pa.string())})
        con.register("batch_stage_ids", pa.table({"id": stage_ids}))
        try:
            rel = con.sql(
                "SELECT s.call_stage_id::VARCHAR AS call_stage_id, s.call_id::VARCHAR AS call_id "
                "FROM call_stages s SEMI JOIN batch_stage_ids b ON s.call_stage_id = b.id::UUID"
            )
            return to_arrow(rel)
        finally:
            con.unregister("batch_stage_ids")

    def upsert(self, table: schema.Table, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        with self._writing():  # after a write failure: its cause, even once closed
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
            with self._writing():
                self.con.execute(
                    "UPDATE calls SET deleted_at = d.deleted_at FROM deleted_calls d "
                    "WHERE calls.call_id = d.call_id::UUID AND calls.deleted_at IS NULL"
                )
        finally:
            self.con.unregister("deleted_calls")

    def _commit_batch(self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome], run_id: str) -> None:
        nbytes = sum(t.nbytes for t in tables.values())
        needed = batch_memory(self._base_memory, nbytes)
        if needed > self._base_memory:
            self._set_memory_limit(needed)
        try:
            pinned = pinned_bytes(tables)
            if pinned and self._deferred_stages is None:
                # DuckDB's own checkpoints would write the filling row group, long strings and all, again each time.
                self.con.execute(f"SET checkpoint_threshold = '{DEFERRED_CHECKPOINT_THRESHOLD}'")
                self._deferred_stages = 0
            stages = tables.get(schema.CALL_STAGES.name)
            self._insert_batch(tables, outcomes, run_id)
            self._unflushed += pinned
            if self._deferred_stages is not None:
                self._deferred_stages += stages.num_rows if stages is not None else 0
            if self._unflushed > self._base_memory * UNFLUSHED_SHARE or (self._deferred_stages or 0) >= ROW_GROUP_SIZE:
                self._checkpoint()
        finally:
            if needed > self._base_memory:
                self._set_memory_limit(self._base_memory)
        self._release_memory()

    def _checkpoint(self) -> None:
        """Checkpoint now; DuckDB checkpoints on its own again from here on."""
        self.con.execute("CHECKPOINT")
        self._unflushed = 0
        if self._deferred_stages is not None:
            self.con.execute("RESET checkpoint_threshold")
            self._deferred_stages = None

    def _release_memory(self) -> None:
        """Hand what the commit freed back to the OS: DuckDB's allocator keeps it until the
        memory limit is lowered (a long replay's process otherwise grows by tens of MB)."""
        try:
            self._set_memory_limit(RELEASE_TO_BYTES)
        except duckdb.OutOfMemoryException:
            pass  # more is pinned than that (long strings until a checkpoint, indexes): kept
        finally:
            self._set_memory_limit(self._base_memory)

    def _set_memory_limit(self, limit: int) -> None:
        self.con.execute(f"SET memory_limit = '{limit}B'")

    def _insert_batch(self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome], run_id: str) -> None:
        con = self.con
        batch_outcomes = outcomes_table(outcomes, run_id)
        con.register("batch_outcomes", batch_outcomes)
        con.begin()
        try:
            # Answered calls are replaced as a unit; only calls in etl_calls can have rows to delete.
            replaced = "(SELECT call_id::UUID FROM batch_outcomes WHERE status <> 'failed')"
            known = con.execute(f"SELECT count(*) FROM etl_calls WHERE call_id IN {replaced}").fetchall()[0][0]
            for table in schema.DATA_TABLES:
                if known:
                    con.execute(f"DELETE FROM {table.name} WHERE call_id IN {replaced}")
                rows = tables.get(table.name)
                if rows is not None and rows.num_rows:
                    con.register("batch_rows", _json_typed(rows, table))
                    con.execute(f"INSERT INTO {table.name} BY NAME SELECT * FROM batch_rows")
                    con.unregister("batch_rows")
            previous = to_arrow(con.sql(
                "SELECT * REPLACE (call_id::VARCHAR AS call_id) FROM etl_calls "
                "WHERE call_id IN (SELECT call_id::UUID FROM batch_outcomes)"
            ))
            con.register("merged_calls", merged_etl_calls(batch_outcomes, previous))
            con.execute("INSERT OR REPLACE INTO etl_calls BY NAME SELECT * FROM merged_calls")
            con.unregister("merged_calls")
            con.commit()
        except BaseException:
            _rollback_quietly(con)
            raise
        finally:
            con.unregister("batch_outcomes")


def _json_typed(rows: pa.Table, table: schema.Table) -> pa.Table:
    """JSON columns as Arrow's JSON type, which DuckDB stores without parsing the text
    again: the transform's JSON is valid by construction (decoded, or encoded by us)."""
    for column in table.columns:
        index = rows.schema.get_field_index(column.name)
        if column.sql_type == schema.JSON and index >= 0 and pa.types.is_string(rows.schema.field(index).type):
            values = rows.column(index)
            chunks = [pa.ExtensionArray.from_storage(_JSON_TYPE, chunk) for chunk in values.chunks]
            rows = rows.set_column(index, pa.field(column.name, _JSON_TYPE), pa.chunked_array(chunks, _JSON_TYPE))
    return rows


_JSON_TYPE = pa.json_()


def _rollback_quietly(con: duckdb.DuckDBPyConnection) -> None:
    # After a failed COMMIT DuckDB has no transaction left: "cannot rollback" must not hide the real error.
    try:
        con.rollback()
    except duckdb.Error:
        pass


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # absent, or not empty (not ours to delete then)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def connect_read_only(path: Path) -> duckdb.DuckDBPyConnection:
    if not path.exists():
        raise OutputError(f"no warehouse at {path}: run `ultravox-stages run` (or `demo`) first")
    if path.is_dir():
        raise OutputError(f"--output {path} is a folder, not a DuckDB file (use --format parquet for folders)")
    check_is_duckdb_file_header(path)
    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        held, doc = read_lock(lock_path(path))
        if held:
            raise OutputError(f"a run is writing this output ({describe_writer(doc)}); try again when it finishes") from exc
        raise OutputError(f"cannot open DuckDB file {path} for reading: {_first_line(exc)}") from exc


def describe_writer(doc: Mapping[str, Any]) -> str:
    run = doc.get("run") or {}
    name = f"run {run['run_id']}" if run.get("run_id") else "run starting"
    return f"{name}, pid {doc.get('pid', '?')}"

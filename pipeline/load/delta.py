"""Delta Lake output: one Delta table per warehouse table, in a folder or under ``s3://``.

Layout::

    OUTPUT/_ultravox_stages.json        marker: this location is ours
    OUTPUT/_lock                        writer lock (local: OutputLock; S3: a lock object)
    OUTPUT/call_stages/                 Delta table, partitioned by created_date
    OUTPUT/stage_inactivity_messages/   Delta table, partitioned by created_date
    OUTPUT/stage_voices/                Delta table, partitioned by created_date
    OUTPUT/etl_calls/ etl_runs/ calls/ etl_state/   Delta tables, unpartitioned

Columns and types are those of :mod:`pipeline.schema` (strings for UUID/JSON,
decimal(38,9), timestamp UTC); the data tables carry one more column, ``created_date``
(DATE, the UTC date of the stage's ``created``; child rows take their stage's date; a
null ``created`` is stored under :data:`NULL_CREATED_DATE`), so replacing a call
reads and rewrites only the files of the dates its old stages sit in.

Commits. Delta commits are per table, so a batch is several commits: for each data
table, the old rows of the batch's already-known calls are deleted (a MERGE joined on
call_id, created_date and, in call_stages, extracted_at: a hash join that reads only
those dates and the files whose extracted_at range meets the old rows', i.e. the files
of the batches that wrote them) and the batch's rows appended; then etl_calls is
upserted (MERGE on call_id), the batch's commit marker. (An overwrite with a
``call_id IN (...)`` predicate would be one commit per table, but deltalake evaluates
such a list row by row: much slower for a batch of calls.) Which call owns a stage,
and where its rows sit, comes from an in-memory stage index read from call_stages once
per session (random UUIDs defeat file statistics: on disk it means reading every stage
file). Parquet statistics keep a 64-character prefix of long strings: whole prompts as
min/max in every footer and Delta log entry made each table load grow with the commits.

Every batch commit carries a batch number in its commit metadata (:data:`BATCH_KEY`);
the etl_calls commit also records it as a Delta application transaction
(:data:`APP_ID`, the standard idempotent-writer field). A data-table commit whose number
is above the one etl_calls recorded belongs to a batch that never finished (crash,
failed write): ``open()`` restores those tables to the version before it (Delta
RESTORE), so every table agrees with etl_calls again. :func:`connect_views` loads each
data table at its newest version not above etl_calls' number: one consistent state
across tables, also while a batch is written or after a crash. Other Delta readers see
each table's latest version: during a batch a re-fetched call can be missing from a
data table for a moment (never duplicated), and after a crash the unfinished batch
shows until the next writer opens.

One writer at a time: locally ``OutputLock`` on ``OUTPUT/_lock``; on S3 a lock object
created with a conditional put (``If-None-Match: *``), refreshed by a heartbeat and
taken over once it has not been refreshed for :data:`LOCK_TTL_SECONDS` (a killed
writer). Delta commits themselves rely on the object store's put-if-absent (deltalake
>= 1.0 uses S3 conditional writes; no unsafe-rename mode is ever enabled here).

Credentials and endpoint come from the standard ``AWS_*`` environment variables and are
handed to deltalake/boto3 only, never written anywhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

# delta-rs allocates with jemalloc, which keeps freed pages for seconds unless told not to (read when it loads).
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")

from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from pipeline.duckdb_arrow import STORAGE_ERRORS, to_arrow
from pipeline import schema
from pipeline.errors import OutputError, WarehouseError
from pipeline.ledger import merged_etl_calls, outcomes_table
from pipeline.load import Warehouse, check_local_output, deleted_table
from pipeline.lock import OutputLock, read_lock
from pipeline.records import CallOutcome, rfc3339, utcnow

MARKER = "_ultravox_stages.json"
LOCK = "_lock"
FORMAT_TAG = "ultravox-stages-delta"
PARTITION_COLUMN = "created_date"
#: Partition of stages without a ``created`` timestamp: keeps created_date NOT NULL.
NULL_CREATED_DATE = date(1970, 1, 1)
#: Commit-metadata key holding the batch number of a batch commit.
BATCH_KEY = "ultravox_stages.batch"
#: Delta application-transaction id under which etl_calls records the last batch.
APP_ID = "ultravox-stages"
COMMIT_ATTEMPTS = 5
#: A batch commits at most twice per table, so the unfinished commits are the newest few.
HISTORY_LIMIT = 50
#: An S3 lock not refreshed for this long is considered left by a dead writer.
LOCK_TTL_SECONDS = 120.0
#: The variables handed to deltalake and boto3 (read from the environment only).
AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ALLOW_HTTP",
)
_US_PER_DAY = 86_400_000_000
#: Statistics (also copied into the Delta log) keep a prefix of long strings (see the module docstring).
_WRITER = WriterProperties(compression="ZSTD", statistics_truncate_length=64)

#: Test seam: called with ``"deleted:<table>"`` / ``"committed:<table>"`` after each data-table commit.
CRASH_HOOK: Callable[[str], None] | None = None

_T = TypeVar("_T")


def _crash_point(step: str) -> None:
    if CRASH_HOOK is not None:
        CRASH_HOOK(step)


# --------------------------------------------------------------------------- locations


def location_uri(path: str | Path) -> str:
    """The output as a URI deltalake understands: ``s3://bucket/prefix`` or an absolute path.

    pathlib collapses ``s3://`` to ``s3:/``; that form is restored."""
    text = str(path)
    if text.startswith("s3:/") and not text.startswith("s3://"):
        text = "s3://" + text[len("s3:/"):]
    if "://" in text:
        if not text.startswith("s3://") or len(text) <= len("s3://"):
            raise OutputError(f"--output {text}: only local folders and s3://bucket/prefix are supported for delta")
        return text.rstrip("/")
    return str(Path(text).absolute())


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def storage_options(uri: str) -> dict[str, str] | None:
    """deltalake ``storage_options`` from the environment (S3 only)."""
    if not is_s3(uri):
        return None
    return {name: os.environ[name] for name in AWS_VARIABLES if os.environ.get(name)}


def table_uri(root: str, name: str) -> str:
    return f"{root}/{name}"


def lock_path(location: str | Path) -> Path | None:
    """The local lock file (also holding the live state for ``status``); None on S3."""
    uri = location_uri(location)
    return None if is_s3(uri) else Path(uri) / LOCK


def delta_schema(table: schema.Table) -> pa.Schema:
    """The Arrow schema stored in Delta: schema.py's plus created_date for data tables."""
    base = table.arrow_schema
    if table.per_call:
        return base.append(pa.field(PARTITION_COLUMN, pa.date32(), nullable=False))
    return base


def _partitions(table: schema.Table) -> list[str] | None:
    return [PARTITION_COLUMN] if table.per_call else None


def _uuid_strings(values: Iterable[str]) -> list[str]:
    """Call ids as canonical lowercase UUIDs (the merge keys of etl_calls)."""
    return [str(uuid.UUID(str(v).strip())) for v in values]


def _retry(action: Callable[[], _T], table: DeltaTable) -> _T:
    """Run a Delta commit again, on the new snapshot, when a concurrent commit (another
    engine's OPTIMIZE, say) won the version and deltalake could not rebase ours."""
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            return action()
        except CommitFailedError:
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * 2**attempt)
            table.update_incremental()
    raise AssertionError("unreachable")


def _batch_of(commit: Mapping[str, Any]) -> int | None:
    value = commit.get(BATCH_KEY)
    return int(value) if value is not None else None


def _props(batch: int | None = None, marker: bool = False) -> CommitProperties:
    """Commit metadata naming the batch; on etl_calls (``marker``) also the batch's
    application transaction, the commit point of the batch."""
    if batch is None:
        return CommitProperties()
    transactions = [Transaction(app_id=APP_ID, version=batch)] if marker else None
    return CommitProperties(custom_metadata={BATCH_KEY: str(batch)}, app_transactions=transactions)


# --------------------------------------------------------------------------- S3 lock


def _s3_client() -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise OutputError("s3:// outputs need boto3 for the writer lock: pip install 'ultravox-stages[s3]'") from exc
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, region_name=region)


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


def _s3_key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _client_error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


class S3Lock:
    """One writer per S3 prefix: a lock object created with ``If-None-Match: *``.

    The holder rewrites it (``If-Match`` its ETag) from a heartbeat thread and on every
    ``publish``; a lock whose object was last written more than ``ttl`` ago (by the
    store's clock) belongs to a dead writer and is taken over (delete ``If-Match`` its
    ETag, then create again). A writer that finds its lock taken over stops writing.
    """

    def __init__(self, uri: str, wait: bool = False, wait_seconds: float | None = None, ttl: float | None = None):
        self.bucket, prefix = _split_s3(uri)
        self.key = _s3_key(prefix, LOCK)
        self.wait = wait
        self.wait_seconds = wait_seconds
        self.ttl = LOCK_TTL_SECONDS if ttl is None else ttl
        self.holder: dict[str, Any] = {}
        self.lost = False
        self._client: Any = None
        self._etag: str | None = None
        self._state: dict[str, Any] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._etag is not None

    def acquire(self) -> None:
        self._client = _s3_client()
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": rfc3339(utcnow())}
        deadline = None if self.wait_seconds is None else time.monotonic() + self.wait_seconds
        while not self._try_create():
            holder = self._take_over_if_stale()
            if holder is None:
                continue  # the stale lock was removed: try again at once
            expired = deadline is not None and time.monotonic() >= deadline
            if expired:
                raise OutputError(
                    f"another run is still writing to this output after waiting {self.wait_seconds:g} s ({holder}); "
                    "try again later"
                )
            if not self.wait:
                raise OutputError(
                    f"another run is writing to this output ({holder}); wait for it to finish or pass --wait"
                )
            pause = min(1.0, self.ttl / 4)
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="delta-s3-lock", daemon=True)
        self._beat.start()

    def _body(self) -> bytes:
        return json.dumps(self.holder | self._state, default=str, sort_keys=True).encode()

    def _try_create(self) -> bool:
        try:
            reply = self._client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*")
        except Exception as exc:  # botocore.exceptions.ClientError (boto3 is imported lazily)
            if _client_error_code(exc) in _CONFLICT_CODES:
                return False
            raise OutputError(f"cannot create the lock object s3://{self.bucket}/{self.key}: {_client_error_code(exc) or exc}") from exc
        self._etag = reply["ETag"]
        return True

    def _take_over_if_stale(self) -> str | None:
        """Delete the lock if its writer stopped refreshing it (None); else describe it."""
        try:
            found = self._client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _client_error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise OutputError(f"cannot read the lock object s3://{self.bucket}/{self.key}: {_client_error_code(exc) or exc}") from exc
        info = _lock_document(found)
        if _lock_age(found) <= self.ttl:
            return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started_at')}"
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=found["ETag"])
        except Exception as exc:
            if _client_error_code(exc) not in _CONFLICT_CODES | {"NoSuchKey", "404"}:
                raise OutputError(
                    f"cannot remove the expired lock object s3://{self.bucket}/{self.key}: {_client_error_code(exc) or exc}"
                ) from exc
        return None

    def publish(self, state: dict[str, Any]) -> None:
        """Replace the lock document with holder info + ``state`` (also a heartbeat)."""
        self._state = dict(state)
        self._refresh()

    def _refresh(self) -> None:
        with self._guard:
            if self._etag is None or self.lost:
                return
            try:
                reply = self._client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfMatch=self._etag)
            except Exception as exc:
                if _client_error_code(exc) in _CONFLICT_CODES | {"NoSuchKey", "404"}:
                    self.lost = True  # taken over: our heartbeats stopped for longer than ttl
                return  # a failed heartbeat is retried by the next one
            self._etag = reply["ETag"]

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            self._refresh()

    def check(self) -> None:
        if self.lost:
            raise WarehouseError(
                f"the writer lock s3://{self.bucket}/{self.key} was taken over by another run; stop and run again"
            )

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        with self._guard:
            etag, self._etag = self._etag, None
        if etag is None or self.lost:
            return
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except Exception:
            pass  # gone or unreachable: it expires after ttl


def _lock_document(found: Mapping[str, Any]) -> dict[str, Any]:
    try:
        doc = json.loads(found["Body"].read())
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _lock_age(found: Mapping[str, Any]) -> float:
    """Seconds since the lock object was last written, by the store's clock when its reply says the time."""
    stamp = found.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        now = parsedate_to_datetime(stamp) if stamp else datetime.now(timezone.utc)
    except (TypeError, ValueError):
        now = datetime.now(timezone.utc)
    return (now - found["LastModified"]).total_seconds()


def read_s3_lock(uri: str) -> tuple[bool, dict[str, Any]]:
    """(held by a live writer, its document) of an S3 output's lock object, without
    touching it; a lock not refreshed for :data:`LOCK_TTL_SECONDS` is not held."""
    bucket, prefix = _split_s3(uri)
    key = _s3_key(prefix, LOCK)
    try:
        found = _s3_client().get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if _client_error_code(exc) in ("NoSuchKey", "404"):
            return False, {}
        raise OutputError(f"cannot read the lock object s3://{bucket}/{key}: {_client_error_code(exc) or exc}") from exc
    return _lock_age(found) <= LOCK_TTL_SECONDS, _lock_document(found)


def read_writer_lock(location: str | Path) -> tuple[bool, dict[str, Any]]:
    """(held by a live writer, its live-state document): the lock file or the S3 lock object."""
    uri = location_uri(location)
    return read_s3_lock(uri) if is_s3(uri) else read_lock(Path(uri) / LOCK)


# --------------------------------------------------------------------------- output checks


def _local_marker_state(root: Path) -> str:
    """'ours', 'empty' (absent or empty folder) or 'foreign'."""
    if root.exists() and not root.is_dir():
        return "file"
    if not root.exists():
        return "empty"
    if (root / MARKER).is_file():
        return "ours"
    # A writer killed between taking the lock and writing the marker leaves only the lock.
    return "foreign" if any(entry.name != LOCK for entry in root.iterdir()) else "empty"


def _s3_marker_state(uri: str) -> str:
    bucket, prefix = _split_s3(uri)
    client = _s3_client()
    try:
        client.head_object(Bucket=bucket, Key=_s3_key(prefix, MARKER))
        return "ours"
    except Exception as exc:
        if _client_error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
            raise OutputError(f"cannot read s3://{bucket}/{prefix}: {_client_error_code(exc) or exc}") from exc
    try:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=2)
    except Exception as exc:
        raise OutputError(f"cannot list s3://{bucket}/{prefix}: {_client_error_code(exc) or exc}") from exc
    others = [item["Key"] for item in listed.get("Contents", []) if item["Key"] != _s3_key(prefix, LOCK)]
    return "foreign" if others else "empty"


def _marker_state(uri: str) -> str:
    return _s3_marker_state(uri) if is_s3(uri) else _local_marker_state(Path(uri))


def _write_marker(uri: str) -> None:
    body = json.dumps({"format": FORMAT_TAG, "version": 1}, sort_keys=True).encode()
    if is_s3(uri):
        bucket, prefix = _split_s3(uri)
        _s3_client().put_object(Bucket=bucket, Key=_s3_key(prefix, MARKER), Body=body)
        return
    root = Path(uri)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    if not marker.exists():
        marker.write_bytes(body)


def check_output(uri: str, must_exist: bool = False) -> None:
    """Refuse a location holding something that is not an ultravox-stages Delta output."""
    state = _marker_state(uri)
    if state == "file":
        raise OutputError(f"--output {uri} is a file, not a Delta folder")
    if state == "foreign":
        raise OutputError(
            f"--output {uri} holds data that is not an ultravox-stages Delta output (no {MARKER}); refusing to touch it"
        )
    if must_exist and state != "ours":
        raise OutputError(f"no warehouse at {uri}: run `ultravox-stages run --format delta` first")


# --------------------------------------------------------------------------- partitions


def created_dates(created: pa.ChunkedArray | pa.Array) -> pa.Array:
    """UTC date of each ``created`` (integer days, tz-independent); null → NULL_CREATED_DATE."""
    if isinstance(created, pa.ChunkedArray):
        created = created.combine_chunks()
    micros = pc.cast(created, pa.int64())
    days = pc.floor(pc.divide(pc.cast(micros, pa.float64()), float(_US_PER_DAY)))
    dates = pc.cast(pc.cast(days, pa.int32()), pa.date32())
    return pc.fill_null(dates, pa.scalar(NULL_CREATED_DATE, pa.date32()))


def with_created_date(rows: pa.Table, table: schema.Table, stages: pa.Table, stage_dates: pa.Array) -> pa.Table:
    """``rows`` conformed to the Delta schema, created_date taken from the row's stage."""
    rows = rows.select(table.column_names).cast(table.arrow_schema)
    if table is schema.CALL_STAGES:
        dates = stage_dates
    else:
        where = pc.index_in(rows["call_stage_id"], value_set=stages["call_stage_id"].combine_chunks())
        dates = pc.fill_null(pc.take(stage_dates, where), pa.scalar(NULL_CREATED_DATE, pa.date32()))
    return rows.append_column(pa.field(PARTITION_COLUMN, pa.date32(), nullable=False), dates)


# --------------------------------------------------------------------------- tables


def arrow_dataset(table: DeltaTable, spec: schema.Table) -> pds.Dataset:
    """The table as a pyarrow dataset whose strings are string_view: files written by a
    deltalake MERGE carry string_view in their Arrow metadata, the others string, and
    pyarrow's filter pushdown (used by DuckDB) only copes when the dataset says view."""
    fields = [
        field.with_type(pa.string_view()) if field.type == pa.string() else field for field in delta_schema(spec)
    ]
    return table.to_pyarrow_dataset(schema=pa.schema(fields))


class DeltaTables:
    """The output's Delta tables (created when missing), each one DeltaTable object."""

    def __init__(self, uri: str):
        self.uri = uri
        self.options = storage_options(uri)
        self.tables: dict[str, DeltaTable] = {}

    def load(self, name: str, version: int | None = None) -> DeltaTable | None:
        try:
            return DeltaTable(table_uri(self.uri, name), version=version, storage_options=self.options)
        except TableNotFoundError:
            return None

    def create_missing(self) -> None:
        for table in schema.TABLES.values():
            found = self.load(table.name)
            if found is None:
                found = DeltaTable.create(
                    table_uri(self.uri, table.name),
                    delta_schema(table),
                    mode="ignore",
                    partition_by=_partitions(table),
                    storage_options=self.options,
                )
            self.tables[table.name] = found

    def __getitem__(self, name: str) -> DeltaTable:
        return self.tables[name]


def committed_batch(etl_calls: DeltaTable) -> int:
    """The number of the last batch etl_calls recorded (0: none yet). Kept as a Delta
    application transaction: part of the table state, it survives checkpoints and log
    cleanup, unlike the commit metadata."""
    return etl_calls.transaction_version(APP_ID) or 0


def unfinished_since(table: DeltaTable, committed: int) -> int | None:
    """The version to restore ``table`` to when its newest commits belong to batches
    above ``committed`` (never finished); None when it is consistent."""
    target = None
    for commit in table.history(HISTORY_LIMIT):
        batch = _batch_of(commit)
        if batch is None or batch <= committed:
            break
        target = int(commit["version"]) - 1
    return target


def heal(tables: DeltaTables) -> dict[str, int]:
    """Restore data tables holding commits of an unfinished batch (lock held)."""
    committed = committed_batch(tables["etl_calls"])
    restored = {}
    for table in schema.DATA_TABLES:
        target = unfinished_since(tables[table.name], committed)
        if target is not None:
            dt = tables[table.name]
            _retry(lambda dt=dt, target=target: dt.restore(target), dt)
            restored[table.name] = target
    return restored


# --------------------------------------------------------------------------- warehouse


class DeltaWarehouse(Warehouse):
    """The Delta Lake warehouse (local folder or ``s3://bucket/prefix``)."""

    format = "delta"
    storage_errors = STORAGE_ERRORS  # its scans run in DuckDB

    def __init__(
        self,
        path: str | Path,
        wait_for_lock: bool = False,
        wait_seconds: float | None = None,
    ):
        uri = location_uri(path)
        # The URI, not a Path: messages name the real location (a Path would collapse s3://).
        super().__init__(uri, wait_for_lock, wait_seconds)  # type: ignore[arg-type]
        self.uri = uri
        self._lock = (  # type: ignore[assignment]
            S3Lock(uri, wait_for_lock, wait_seconds)
            if is_s3(uri)
            else OutputLock(Path(uri) / LOCK, wait=wait_for_lock, wait_seconds=wait_seconds)
        )
        self._tables: DeltaTables | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._batch = 0
        self._stage_index_loaded = False

    @property
    def tables(self) -> DeltaTables:
        assert self._tables is not None, "warehouse not open"
        return self._tables

    # -- open / close

    def open(self) -> None:
        if not is_s3(self.uri):
            check_local_output(Path(self.uri), "Delta folder")
        check_output(self.uri)
        self._lock.acquire()
        try:
            with self._delta_writing():
                _write_marker(self.uri)
                self._tables = DeltaTables(self.uri)
                self._tables.create_missing()
                heal(self._tables)
                self._batch = committed_batch(self._tables["etl_calls"])
            self._con = duckdb.connect()
            self._after_open()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        self._stage_index_loaded = False
        self._tables = None
        self._lock.release()

    @contextlib.contextmanager
    def _delta_writing(self) -> Iterator[None]:
        """The base's ``_writing``, deltalake's own errors counted as storage failures."""
        with self._writing():
            try:
                yield
            except DeltaError as exc:
                raise self._write_failure(exc) from exc

    def _check_lock(self) -> None:
        check = getattr(self._lock, "check", None)
        if check is not None:
            check()

    # -- reads

    def _scan(self, name: str, columns: list[str], key: str | None = None, values: Sequence[str] | pa.Array = ()) -> pa.Table:
        """``columns`` of the rows whose ``key`` is in ``values`` (all rows without a key).

        A semi join in DuckDB over the Arrow dataset: pyarrow's own filter pushdown fails
        on files a deltalake MERGE wrote (string_view in their Arrow metadata)."""
        con = self._con
        assert con is not None, "warehouse not open"
        con.register("scan_source", arrow_dataset(self.tables[name], schema.TABLES[name]))
        con.register("scan_keys", pa.table({"k": pa.array(values, pa.string())}))
        try:
            where = f" WHERE {key} IN (SELECT k FROM scan_keys)" if key is not None else ""
            rel = con.sql(f"SELECT {', '.join(columns)} FROM scan_source{where}")
            rows = to_arrow(rel)
        finally:
            con.unregister("scan_source")
            con.unregister("scan_keys")
        target = delta_schema(schema.TABLES[name])
        return rows.cast(pa.schema([target.field(c) for c in columns]))

    def call_statuses(self) -> dict[str, str]:
        rows = self._scan("etl_calls", ["call_id", "status"])
        return dict(zip(rows["call_id"].to_pylist(), rows["status"].to_pylist(), strict=True))

    def read_state(self, key: str) -> str | None:
        rows = self._scan("etl_state", ["value"], "key", [key])
        return rows["value"][0].as_py() if rows.num_rows else None

    def _rows(self, table: schema.Table, key: str | None = None, values: Sequence[str] | pa.Array = ()) -> pa.Table:
        return self._scan(table.name, table.column_names, key, values)

    # -- stage index: call, created_date and extracted_at of every stored stage id, in memory

    def _stage_index(self) -> duckdb.DuckDBPyConnection:
        """The connection holding ``stage_index`` (44 bytes a stage), read from
        call_stages on first use and kept in step with each committed batch."""
        con = self._con
        assert con is not None, "warehouse not open"
        if self._stage_index_loaded:
            return con
        con.execute(
            "CREATE OR REPLACE TABLE stage_index "
            f"(call_stage_id UUID, call_id UUID, {PARTITION_COLUMN} DATE, extracted_at TIMESTAMPTZ)"
        )
        con.register("stage_source", arrow_dataset(self.tables["call_stages"], schema.CALL_STAGES))
        try:
            con.execute(
                f"INSERT INTO stage_index SELECT call_stage_id::VARCHAR::UUID, call_id::VARCHAR::UUID, {PARTITION_COLUMN}, "
                "extracted_at FROM stage_source"
            )
        finally:
            con.unregister("stage_source")
        self._stage_index_loaded = True
        return con

    def _index_lookup(self, sql: str, keys: Sequence[str] | pa.Array) -> pa.Table:
        """``sql`` over stage_index joined to ``index_keys(k UUID)``."""
        con = self._stage_index()
        con.register("index_keys_source", pa.table({"k": pa.array(keys, pa.string())}))
        try:
            con.execute(
                "CREATE OR REPLACE TEMP TABLE index_keys AS SELECT DISTINCT TRY_CAST(k AS UUID) AS k FROM index_keys_source"
            )
            return to_arrow(con.sql(sql))
        finally:
            con.unregister("index_keys_source")
            con.execute("DROP TABLE IF EXISTS index_keys")

    def _stored_stage_owners(self, stage_ids: pa.Array) -> pa.Table:
        rows = self._index_lookup(
            "SELECT s.call_stage_id::VARCHAR AS call_stage_id, s.call_id::VARCHAR AS call_id "
            "FROM stage_index s JOIN index_keys k ON s.call_stage_id = k.k",
            stage_ids,
        )
        return rows.cast(pa.schema([("call_stage_id", pa.string()), ("call_id", pa.string())]))

    def _stored_stage_keys(self, call_ids: Sequence[str]) -> pa.Table:
        """Distinct (call_id, created_date, extracted_at) of the stored stages of ``call_ids``."""
        rows = self._index_lookup(
            f"SELECT DISTINCT s.call_id::VARCHAR AS call_id, s.{PARTITION_COLUMN}, s.extracted_at "
            "FROM stage_index s JOIN index_keys k ON s.call_id = k.k",
            call_ids,
        )
        extracted_at = schema.CALL_STAGES.arrow_schema.field("extracted_at").type
        return rows.cast(pa.schema([("call_id", pa.string()), (PARTITION_COLUMN, pa.date32()), ("extracted_at", extracted_at)]))

    def _index_batch(self, replaced: Sequence[str], stages: pa.Table) -> None:
        """stage_index after a committed batch: the replaced calls' stages are the batch's."""
        con = self._stage_index()
        con.register("replaced_calls", pa.table({"k": pa.array(replaced, pa.string())}))
        con.register("batch_stages", stages.select(["call_stage_id", "call_id", PARTITION_COLUMN, "extracted_at"]))
        try:
            con.execute("DELETE FROM stage_index WHERE call_id IN (SELECT k::UUID FROM replaced_calls)")
            con.execute(
                f"INSERT INTO stage_index SELECT call_stage_id::UUID, call_id::UUID, {PARTITION_COLUMN}, extracted_at "
                "FROM batch_stages"
            )
        finally:
            con.unregister("replaced_calls")
            con.unregister("batch_stages")

    def _stored_runs(self) -> pa.Table:
        return self._rows(schema.ETL_RUNS)

    # -- single-table writes

    def upsert(self, table: schema.Table, rows: pa.Table) -> None:
        """Insert or replace rows by their single-column key: one Delta commit."""
        if table.per_call:
            raise ValueError(f"{table.name} is replaced per call: use commit_calls")
        if not rows.num_rows:
            return
        (key,) = table.primary_key
        rows = rows.select(table.column_names).cast(table.arrow_schema)
        with self._delta_writing():
            self._merge_upsert(table.name, rows, key)

    def flag_deleted(self, deleted: Mapping[str, datetime]) -> None:
        """Set calls.deleted_at where not set yet (one commit for the changed calls)."""
        if not deleted:
            return
        flags = deleted_table(deleted)
        ids = flags["call_id"].combine_chunks()
        rows = self._rows(schema.CALLS, "call_id", ids)
        rows = rows.filter(pc.is_null(rows["deleted_at"]))
        if not rows.num_rows:
            return
        stamp = pc.take(flags["deleted_at"], pc.index_in(rows["call_id"], value_set=ids))
        column = rows.schema.get_field_index("deleted_at")
        self.upsert(schema.CALLS, rows.set_column(column, rows.schema.field("deleted_at"), stamp))

    def _merge_upsert(self, name: str, rows: pa.Table, key: str, batch: int | None = None) -> None:
        """One commit: rows inserted or replaced by ``key`` (a hash join, not an IN list)."""
        self._check_lock()
        target = self.tables[name]
        props = _props(batch, marker=name == schema.ETL_CALLS.name)
        _retry(
            lambda: target.merge(
                rows, f"t.{key} = s.{key}", source_alias="s", target_alias="t", streamed_exec=False,
                writer_properties=_WRITER, commit_properties=props,
            ).when_matched_update_all().when_not_matched_insert_all().execute(),
            target,
        )

    def _delete_calls(self, name: str, keys: pa.Table, batch: int) -> None:
        """One commit: the rows matching a row of ``keys`` on all its columns out
        (call_id, created_date and, where the table has it, extracted_at)."""
        self._check_lock()
        target = self.tables[name]
        if "extracted_at" not in schema.TABLES[name].column_names:
            keys = keys.select(["call_id", PARTITION_COLUMN]).group_by(["call_id", PARTITION_COLUMN]).aggregate([])
        predicate = " AND ".join(f"t.{column} = s.{column}" for column in keys.column_names)
        # Unstreamed, deltalake prunes by the source's values: only the dates of ``keys``
        # and the files whose extracted_at range meets theirs (streamed: every file).
        _retry(
            lambda: target.merge(
                keys, predicate, source_alias="s", target_alias="t", streamed_exec=False,
                writer_properties=_WRITER, commit_properties=_props(batch),
            ).when_matched_delete().execute(),
            target,
        )

    def _append(self, name: str, rows: pa.Table, batch: int) -> None:
        self._check_lock()
        target = self.tables[name]
        _retry(
            lambda: write_deltalake(target, rows, mode="append", writer_properties=_WRITER, commit_properties=_props(batch)),
            target,
        )

    # -- batches

    def _commit_batch(self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome], run_id: str) -> None:
        batch = outcomes_table(outcomes, run_id)
        all_ids = _uuid_strings(batch["call_id"].to_pylist())
        batch = batch.set_column(0, "call_id", pa.array(all_ids, pa.string()))
        replaced = [cid for cid, status in zip(all_ids, batch["status"].to_pylist(), strict=True) if status != "failed"]
        previous = self._rows(schema.ETL_CALLS, "call_id", all_ids)
        known = set(previous["call_id"].to_pylist()) & set(replaced)
        rows = self._data_rows(tables, set(replaced))
        number = self._batch + 1
        with self._delta_writing():
            try:
                self._replace_data(rows, known, number)
                merged = merged_etl_calls(batch, previous)
                self._merge_upsert("etl_calls", merged, "call_id", number)
                self._index_batch(replaced, rows["call_stages"])
            except BaseException as exc:
                # Half a batch is on disk: no more writes on top; the next open() restores it.
                self._write_failure(exc)
                raise
        self._batch = number

    def _data_rows(self, tables: Mapping[str, pa.Table], replaced: set[str]) -> dict[str, pa.Table]:
        """The batch's rows of each data table with their created_date."""
        given = {t.name: tables.get(t.name) for t in schema.DATA_TABLES}
        conformed = {
            t.name: (t.arrow_schema.empty_table() if given[t.name] is None else given[t.name].select(t.column_names).cast(t.arrow_schema))
            for t in schema.DATA_TABLES
        }
        value_set = pa.array(sorted(replaced), pa.string())
        for name, rows in conformed.items():
            if pc.any(pc.invert(pc.is_in(rows["call_id"], value_set=value_set))).as_py():
                raise ValueError(f"{name}: rows for calls that are not loaded in this batch")
        stages = conformed["call_stages"]
        stage_dates = created_dates(stages["created"])
        return {t.name: with_created_date(conformed[t.name], t, stages, stage_dates) for t in schema.DATA_TABLES}

    def _replace_data(self, rows: Mapping[str, pa.Table], known: set[str], number: int) -> None:
        """Each data table: the known calls' old rows out (by call and date, found in
        the stage index: a child row sits in its stage's date), then the batch's rows in."""
        old = self._stored_stage_keys(sorted(known)) if known else None
        for table in schema.DATA_TABLES:
            if old is not None and old.num_rows:
                self._delete_calls(table.name, old, number)
                _crash_point(f"deleted:{table.name}")
            if rows[table.name].num_rows:
                self._append(table.name, rows[table.name], number)
            _crash_point(f"committed:{table.name}")


# --------------------------------------------------------------------------- readers


def _view_sql(table: schema.Table, source: str) -> str:
    cols = ", ".join(f"CAST({c.name} AS {c.sql_type}) AS {c.name}" for c in table.columns)
    return f"SELECT {cols} FROM {source}"


def connect_views(path: str | Path) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with one view per table (typed like the DuckDB output) over
    Arrow datasets of the Delta tables: one consistent state across tables (data tables
    at the newest version etl_calls has recorded)."""
    uri = location_uri(path)
    check_output(uri, must_exist=True)
    tables = DeltaTables(uri)
    con = duckdb.connect()
    etl_calls = tables.load("etl_calls")
    committed = committed_batch(etl_calls) if etl_calls is not None else 0
    for table in schema.TABLES.values():
        found = etl_calls if table.name == "etl_calls" else tables.load(table.name)
        if found is not None and table.per_call:
            version = unfinished_since(found, committed)
            if version is not None:
                found = tables.load(table.name, version)
        if found is None:
            # Not created yet: an empty typed table keeps queries working.
            con.execute(table.create_sql())
            continue
        source = f"{table.name}__delta"
        con.register(source, arrow_dataset(found, table))
        con.execute(f"CREATE VIEW {table.name} AS {_view_sql(table, source)}")
    return con


# --------------------------------------------------------------------------- maintenance


def _file_count(table: DeltaTable) -> int:
    return len(table.file_uris())


def _has_small_files(table: DeltaTable) -> bool:
    """Whether some partition holds more than one file (something to compact)."""
    actions = pa.table(table.get_add_actions(flatten=True))
    partition = f"partition.{PARTITION_COLUMN}"
    if partition not in actions.column_names:
        return actions.num_rows > 1
    return actions.num_rows > len(set(actions[partition].to_pylist()))


def maintain(
    location: str | Path, retention_hours: float = 168.0, wait_for_lock: bool = False, wait_seconds: float | None = None
) -> dict[str, dict[str, int]]:
    """Compact small files, vacuum unreferenced ones older than ``retention_hours`` and
    checkpoint every table, holding the writer lock (an unfinished batch is restored
    first). Per table: files before/after, files vacuumed, version after."""
    check_output(location_uri(location), must_exist=True)
    warehouse = DeltaWarehouse(location, wait_for_lock=wait_for_lock, wait_seconds=wait_seconds)
    figures: dict[str, dict[str, int]] = {}
    with warehouse:
        with warehouse._delta_writing():
            for table in schema.TABLES.values():
                dt = warehouse.tables[table.name]
                before = _file_count(dt)
                if _has_small_files(dt):
                    _retry(lambda dt=dt: dt.optimize.compact(writer_properties=_WRITER), dt)
                # Shorter than the table's retention (default 7 days) must be allowed explicitly.
                removed = dt.vacuum(
                    retention_hours=math.ceil(retention_hours), dry_run=False, enforce_retention_duration=False
                )
                dt.create_checkpoint()
                figures[table.name] = {
                    "files_before": before,
                    "files_after": _file_count(dt),
                    "files_vacuumed": len(removed),
                    "version": dt.version(),
                }
    return figures

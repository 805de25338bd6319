"""Parquet output: a folder of hive-partitioned Parquet files, committed with a journal.

Layout::

    OUTPUT/_ultravox_stages.json                 marker: this folder is ours
    OUTPUT/call_stages/created_date=YYYY-MM-DD/part-<tx>-<n>.parquet
    OUTPUT/stage_inactivity_messages/created_date=.../part-*.parquet
    OUTPUT/stage_voices/created_date=.../part-*.parquet
    OUTPUT/etl_calls/part-*.parquet              unpartitioned
    OUTPUT/etl_runs/part-*.parquet               unpartitioned
    OUTPUT/_state/call_files.parquet             index: (table, key, file)
    OUTPUT/_state/call_files.delta-<n>.parquet   index changes since (<= MAX_DELTAS files)
    OUTPUT/_staging/lock                         writer lock (OutputLock)
    OUTPUT/_staging/tx-*/, journal.json          a commit in flight

``created_date`` is the UTC date of the *stage's* ``created``; child rows take the date
of their stage, so a stage and its children always sit in the same date folder. A null
``created`` goes to ``created_date=__HIVE_DEFAULT_PARTITION__``, which DuckDB, Spark and
pyarrow read as NULL. The partition column is not stored inside the files. Files are
Parquet with standard types only (strings for UUID/JSON, decimal128(38,9),
timestamp[us, UTC]); :func:`connect_views` gives them the DuckDB output's types. A
commit's new files are snappy; files that rewrite others have ids and free text zstd
without dictionary, short columns snappy with dictionary (:func:`_write_options`).

Commit protocol (atomic, crash safe). Every change — ``commit_calls`` or an ``upsert`` —
is one transaction:

1. every new file (data files and the index change) is written into
   ``_staging/tx-<id>/`` and fsynced (all at once from a pool of :data:`IO_THREADS`,
   so the file system commits them together); nothing under ``OUTPUT/<table>/`` changes yet;
2. ``_staging/journal.json`` is written to a temporary name, fsynced and renamed into
   place: **this rename is the commit point**. It lists the renames (staging → final)
   and the deletions (files whose rows were replaced or compacted);
3. the journal is applied (``os.replace`` per file, then unlinks), directories fsynced,
   and the journal removed.

Applying is idempotent (final names are never reused, a rename whose source is gone is
already done, a deletion of a missing file is a no-op), so ``open()`` rolls a complete
journal forward and discards anything else in ``_staging/``. A kill -9 before step 2
leaves the previous dataset; at or after step 2 the next ``open()`` (or a reader via
:func:`connect_views` when no writer holds the lock) finishes the new one. Readers never
see a half-written file because files only appear under ``OUTPUT/<table>/`` by rename.
(A plain glob reader running *during* step 3 may see the new files next to the old ones;
there is no cross-file snapshot without a table format.)

Finding a call's rows: an index, not a scan. It maps (table, key) → file, key being
call_id for the data tables and etl_calls and run_id for etl_runs; a commit finds the
files holding its calls with one ``pc.is_in`` over it and reads only those files. It is
kept in memory while open and persisted in the same journaled commit as the files it
describes, as a small delta per commit (``call_files.delta-<n>.parquet``: new entries,
and removed files as null keys) folded into ``call_files.parquet`` every
:data:`MAX_DELTAS` commits. It grows with the calls stored (a few entries per call, keys
are incompressible UUIDs), is read once per ``open()`` and rewritten once every
:data:`MAX_DELTAS` commits; each other commit writes only its own entries. The
alternative — reading the call_id column of every file — costs a read of every file's
footer and key column on every commit, growing with the dataset, and pruning by
partition does not help because a call's stages may sit in any date folder. If the
index is missing or disagrees with the files on disk (files deleted or copied by hand),
``open()`` rebuilds it from the key column of each file (projection) — the same scan,
once. The index also holds each file's size (one stat per file at ``open()``), which
compaction needs.

Stage ownership (a stage id stored under one call fails a later call bringing it): the
stored (call_stage_id, call_id) pairs are read from every stage file once, at the first
batch after ``open()``, and kept in memory, updated by each commit (about 80 bytes per
stored stage). Reading them from the files per batch instead grows with the dataset on
every commit, as UUIDs defeat min/max pruning.

File count: per commit and folder, new rows go to one new file (append) when no file
there holds a replaced call. Files holding replaced calls are rewritten without those
rows: a small one (< :data:`SMALL_FILE_BYTES`) merged into the folder's new file, a
bigger one on its own (file sizes stay bounded and its other calls keep their file).
Compaction is size-tiered (:data:`COMPACT_TIERS`): when a folder holds more than
:data:`MAX_FILES_PER_PARTITION` files of the first tier they are merged into the new
file, and as many of the next tier are merged into one. Frequent small runs (cron, a few
calls each) thus keep every folder at a few tiny files plus a few bigger ones, each row
is rewritten about once per tier, and a compaction never rewrites a file past the last
tier. The price shows in long replays of small batches spread over many dates: every
folder gets a file per batch per table, so the commit cost is about fixed per batch and
folder, and about one rewrite of the data per tier is paid to keep the file count
bounded; a larger ``batch_stages`` avoids most of both.
Untouched folders and files are never read or rewritten.
"""

from __future__ import annotations

import array
import binascii
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.errors import OutputError
from pipeline.ledger import merged_etl_calls, outcomes_table
from pipeline.load import Warehouse, check_local_output, deleted_table, open_failure
from pipeline.lock import OutputLock
from pipeline.records import CANONICAL_UUID, CallOutcome

if TYPE_CHECKING:
    import duckdb

MARKER = "_ultravox_stages.json"
STAGING = "_staging"
JOURNAL = "journal.json"
STATE = "_state"
INDEX = f"{STATE}/call_files.parquet"
#: Index deltas: one small file per commit, folded into INDEX every MAX_DELTAS commits.
DELTA_GLOB = "call_files.delta-*.parquet"
MAX_DELTAS = 16
LOCK = "lock"
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
FORMAT_TAG = "ultravox-stages-parquet"

#: Compact a folder's small files once it would hold more small files than this.
MAX_FILES_PER_PARTITION = 16
#: Compaction tiers (upper bounds): a folder's files of one tier are merged, files past the last are final.
#: Each bound is 16× the one before, so a merge of one tier's files lands in the next tier
#: and is not merged again with the next files of its own (an 8 MB bound had that).
COMPACT_TIERS = (256 << 10, 4 << 20, 64 << 20)
SMALL_FILE_BYTES = COMPACT_TIERS[0]
#: Threads that fsync files and folders of a commit in parallel.
IO_THREADS = 16
#: Rows per row group: the usual target size for scan efficiency; smaller tables get one row group.
ROW_GROUP_ROWS = 65_536
#: A merged file's row groups hold at most about this many bytes of rows (Arrow), which
#: bounds what a merge holds in memory; existing files are read MERGE_READ_ROWS at a time.
MERGE_ROW_GROUP_BYTES = 16 << 20
#: Rows in at most this many runs of one partition each are split by slices (or in a quarter as many runs as rows).
MAX_SLICED_RUNS = 64
MERGE_READ_ROWS = 1024
#: Columns of unique ids or free text: zstd, no dictionary (it never pays off and costs a
#: hash of every value), and free text gets no min/max statistics (useless for pruning).
_UNIQUE_COLUMNS = frozenset({"call_stage_id", "call_id", "key"})
_FREE_TEXT_COLUMNS = frozenset(
    {"raw", "system_prompt", "experimental_settings", "initial_state", "message", "settings", "metadata", "options", "error"}
)


def _write_options(columns: Sequence[str], fresh: bool = False) -> dict[str, Any]:
    """Per column: zstd where the bytes are; snappy for the short columns, where a zstd
    context per column chunk costs more than it saves (most files are small). A fresh
    file (a commit's new rows only) is snappy throughout: it is small, and compaction
    rewrites it with zstd once its folder has enough of them."""
    plain = _UNIQUE_COLUMNS | _FREE_TEXT_COLUMNS
    return {
        "row_group_size": ROW_GROUP_ROWS,
        "compression": {c: "zstd" if c in plain and not fresh else "snappy" for c in columns},
        "use_dictionary": [c for c in columns if c not in plain],
        "write_statistics": [c for c in columns if c not in _FREE_TEXT_COLUMNS],
    }


def key_column(table: str) -> str:
    """The column identifying which rows a change replaces: call_id for the per-call
    data tables (a call is replaced as a unit), else the single-column primary key."""
    spec = schema.TABLES[table]
    if spec.per_call:
        return "call_id"
    if len(spec.primary_key) != 1:
        raise ValueError(f"{table}: the Parquet output needs a single-column key")
    return spec.primary_key[0]


_INDEX_SCHEMA = pa.schema(
    [pa.field("table", pa.string(), False), pa.field("key", pa.string(), False), pa.field("file", pa.string(), False)]
)
#: A delta row with a null key means "this file is gone"; others are new entries.
_DELTA_SCHEMA = pa.schema(
    [pa.field("table", pa.string(), False), pa.field("key", pa.string()), pa.field("file", pa.string(), False)]
)
_FILE_TYPE = pa.dictionary(pa.int32(), pa.string())
MAX_INDEX_CHUNKS = 256
_US_PER_DAY = 86_400_000_000

#: Test seam: called with a step name where a crash matters in a commit (crash tests SIGKILL there).
CRASH_HOOK: Callable[[str], None] | None = None


def _checkpoint(step: str) -> None:
    if CRASH_HOOK is not None:
        CRASH_HOOK(step)


# --------------------------------------------------------------------------- helpers


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directory fsync makes renames/unlinks durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _empty_index() -> pa.Table:
    return _INDEX_SCHEMA.empty_table()


def _conform(rows: pa.Table, table: schema.Table) -> pa.Table:
    """Columns in schema order with the schema's types (files and batches may differ in
    nullability flags or column order; concat needs identical schemas)."""
    target = table.arrow_schema
    if rows.schema.equals(target):
        return rows
    return rows.select(table.column_names).cast(target)


def lock_path(root: Path) -> Path:
    """The writer lock sits in the staging area, out of the way of readers' globs."""
    return root / STAGING / LOCK


def table_dir(root: Path, table: str) -> Path:
    return root / table


def data_files(root: Path, table: str) -> list[str]:
    """Committed files of ``table`` as paths relative to ``root`` (posix), sorted."""
    base = table_dir(root, table)
    if not base.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in base.rglob("*.parquet") if p.is_file())


def _partition_of(rel: str) -> str:
    """The folder of a file: ``call_stages/created_date=2024-01-01`` or ``etl_calls``."""
    return rel.rsplit("/", 1)[0]


# --------------------------------------------------------------------------- output checks


def check_output_folder(path: Path, must_exist: bool = False) -> None:
    """Refuse a file, or an existing non-empty folder that has no marker of ours."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"--output {path} is a file, not a Parquet folder (use --format duckdb for a file)")
    if not path.exists():
        if must_exist:
            raise OutputError(f"no warehouse at {path}: run `ultravox-stages run --format parquet` first")
        return
    if (path / MARKER).is_file():
        return
    if must_exist or any(path.iterdir()):
        raise OutputError(
            f"--output {path} is a folder that is not an ultravox-stages Parquet dataset "
            f"(no {MARKER}); refusing to touch it"
        )


def _write_marker(path: Path) -> None:
    marker = path / MARKER
    if marker.exists():
        return
    # In place, not tmp + rename: a stray temporary file after a crash would make the folder look foreign.
    body = json.dumps({"format": FORMAT_TAG, "version": 1}, sort_keys=True).encode()
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_path(path)


# --------------------------------------------------------------------------- journal


def apply_journal(root: Path, pool: ThreadPoolExecutor | None = None) -> bool:
    """Roll a committed journal forward (idempotent). True if there was one."""
    journal = root / STAGING / JOURNAL
    try:
        plan = json.loads(journal.read_bytes())
    except FileNotFoundError:
        return False
    except ValueError:
        # A journal appears only by rename of a complete file: an unreadable one never happened.
        journal.unlink()
        return False
    touched: set[Path] = set()
    for src_rel, dst_rel in plan["renames"]:
        src, dst = root / src_rel, root / dst_rel
        if src.exists():  # a missing source means this rename was already applied
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            # The file's folder and, for a new partition, the folder's own entry.
            touched.update((dst.parent, dst.parent.parent))
        _checkpoint("rename")
    for rel in plan["deletes"]:
        victim = root / rel
        victim.unlink(missing_ok=True)
        touched.add(victim.parent)
    for folder in sorted(touched, key=lambda p: len(p.parts), reverse=True):
        _remove_if_empty_partition(root, folder)
    # Folder fsyncs make the renames durable before the journal goes; in parallel they share journal commits.
    existing = [folder for folder in touched if folder.exists()]
    if pool is not None:
        _wait_all([pool.submit(_fsync_path, folder) for folder in existing])
    else:
        for folder in existing:
            _fsync_path(folder)
    _checkpoint("applied")
    journal.unlink()
    _fsync_path(journal.parent)
    return True


def _remove_if_empty_partition(root: Path, folder: Path) -> None:
    """Drop a partition folder left empty (never a table folder or the root)."""
    rel = folder.relative_to(root).parts
    if len(rel) >= 2 and rel[0] in schema.TABLES:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (new files landed there) or already gone


def clean_staging(root: Path) -> None:
    """Remove uncommitted leftovers of a killed writer (never the lock file)."""
    staging = root / STAGING
    if not staging.is_dir():
        return
    for entry in staging.iterdir():
        if entry.name in (LOCK, JOURNAL):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def heal(root: Path) -> None:
    """Finish a committed transaction and discard uncommitted ones (lock held)."""
    apply_journal(root)
    clean_staging(root)


# --------------------------------------------------------------------------- index


#: table → partition folder → file → size in bytes (sizes drive compaction).
Files = dict[str, dict[str, dict[str, int]]]


class FileIndex:
    """In-memory copy of ``_state/call_files.parquet``: per table, (key, file) rows,
    and the committed files with their sizes."""

    def __init__(self, per_table: dict[str, pa.Table], files: Files):
        self.per_table = per_table
        #: Delta files on top of INDEX, oldest first, and the next delta's number.
        self.deltas: list[str] = []
        self.next_delta = 0
        #: False when INDEX is missing or stale: the next commit writes a full INDEX instead of a delta.
        self.base_ok = True
        self.files = files

    @classmethod
    def from_table(cls, index: pa.Table, files: Files) -> FileIndex:
        per_table = {}
        for name in schema.TABLES:
            rows = index.filter(pc.equal(index["table"], name))
            per_table[name] = _index_entries(rows["key"], rows["file"])
        return cls(per_table, files)

    def to_table(self) -> pa.Table:
        parts = [
            pa.table(
                {"table": pa.array([name] * entries.num_rows, pa.string()), "key": entries["key"], "file": entries["file"].cast(pa.string())},
                schema=_INDEX_SCHEMA,
            )
            for name, entries in self.per_table.items()
        ]
        return pa.concat_tables(parts) if parts else _empty_index()

    def all_files(self, table: str) -> set[str]:
        return {rel for files in self.files[table].values() for rel in files}

    def indexed_files(self, table: str) -> set[str]:
        return set(pc.unique(self.per_table[table]["file"]).to_pylist())


def _index_entries(keys: pa.Array | pa.ChunkedArray, files: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Index rows as held in memory: the file column dictionary-encoded (one path repeats
    for every key of its file)."""
    return pa.table({"key": keys.cast(pa.string()), "file": files.cast(_FILE_TYPE)})


def _fewer_chunks(entries: pa.Table) -> pa.Table:
    """Each commit appends a chunk per new file: merge them once they pile up."""
    if entries["file"].num_chunks <= MAX_INDEX_CHUNKS:
        return entries
    return entries.unify_dictionaries().combine_chunks()


def _files_with_keys(entries: pa.Table, keys: pa.Array) -> set[str]:
    """Files whose index entries name one of ``keys``: one vectorised is_in."""
    if not len(keys) or not entries.num_rows:
        return set()
    hits = entries["file"].filter(pc.is_in(entries["key"], value_set=keys))
    return set(pc.unique(hits).to_pylist())


def files_on_disk(root: Path) -> Files:
    """Every committed file with its size, per table and folder (one stat each, at open)."""
    files: Files = {}
    for name in schema.TABLES:
        parts: dict[str, dict[str, int]] = {}
        for rel in data_files(root, name):
            parts.setdefault(_partition_of(rel), {})[rel] = (root / rel).stat().st_size
        files[name] = parts
    return files


def load_index(root: Path) -> FileIndex:
    """INDEX plus its deltas; rebuilt from the files on disk when missing or stale."""
    path = root / INDEX
    deltas = sorted((root / STATE).glob(DELTA_GLOB)) if (root / STATE).is_dir() else []
    on_disk = files_on_disk(root)
    index: FileIndex | None = None
    if path.exists():
        entries = pq.read_table(path).cast(_INDEX_SCHEMA)
        for delta in deltas:
            entries = _apply_delta(entries, pq.read_table(delta).cast(_DELTA_SCHEMA))
        index = FileIndex.from_table(entries, on_disk)
        if not all(index.indexed_files(name) == index.all_files(name) for name in schema.TABLES):
            index = None
    if index is None:
        index = rebuild_index(root, on_disk)
        index.base_ok = False
    index.deltas = [d.relative_to(root).as_posix() for d in deltas]
    index.next_delta = 1 + max((_delta_number(d) for d in deltas), default=0)
    return index


def _apply_delta(entries: pa.Table, delta: pa.Table) -> pa.Table:
    gone = delta.filter(pc.is_null(delta["key"]))["file"].combine_chunks()
    kept = entries.filter(pc.invert(pc.is_in(entries["file"], value_set=gone))) if len(gone) else entries
    added = delta.filter(pc.is_valid(delta["key"])).cast(_INDEX_SCHEMA)
    return pa.concat_tables([kept, added])


def _delta_number(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


def _delta_name(number: int) -> str:
    # Zero-padded: name order is commit order (no clock involved).
    return f"{STATE}/{DELTA_GLOB.replace('*', f'{number:012d}')}"


def rebuild_index(root: Path, on_disk: Files) -> FileIndex:
    """Read only the key column of every file (projection): the recovery path."""
    per_table = {}
    for name, folders in on_disk.items():
        key = key_column(name)
        parts = []
        for rel in sorted(rel for files in folders.values() for rel in files):
            keys = pc.unique(pq.read_table(root / rel, columns=[key])[key].combine_chunks())
            parts.append(_index_entries(keys, pa.array([rel] * len(keys), pa.string())))
        per_table[name] = pa.concat_tables(parts) if parts else _index_entries(pa.array([], pa.string()), pa.array([], pa.string()))
    return FileIndex(per_table, on_disk)


class StageOwners:
    """Every stored stage id with its call, lowercase, in memory while open: the
    ownership check of each batch needs them, and no file index covers stage ids.
    Loaded once (two columns of every stage file); each commit then updates it.
    Rows of UUIDs (all the tool stores) are held as 16 bytes each instead of 36
    characters; any other id stays text in ``other``."""

    COLUMNS = ("call_stage_id", "call_id")

    def __init__(self, rows: pa.Table, other: pa.Table):
        self.rows = rows  # binary(16) columns
        self.other = other  # string columns

    @classmethod
    def of(cls, stages: pa.Table | None) -> StageOwners:
        """The owners ``stages`` name (None: none), copied out of their buffers."""
        rows = _owner_rows(stages).combine_chunks()
        compact = pc.and_(*(is_uuid(rows[name]) for name in cls.COLUMNS))
        held = rows.filter(compact)
        return cls(pa.table({name: uuid_bytes(held[name].combine_chunks()) for name in cls.COLUMNS}),
                   rows.filter(pc.invert(compact)))

    @classmethod
    def load(cls, root: Path, files: Sequence[str], pool: ThreadPoolExecutor) -> StageOwners:
        pieces = _wait_all([pool.submit(pq.read_table, root / rel, columns=list(cls.COLUMNS)) for rel in files])
        owners = [cls.of(piece) for piece in pieces] or [cls.of(None)]
        return cls(pa.concat_tables([o.rows for o in owners]).combine_chunks(),
                   pa.concat_tables([o.other for o in owners]).combine_chunks())

    def lookup(self, stage_ids: pa.Array) -> pa.Table:
        """Stored rows whose stage id is in ``stage_ids`` (lowercase), as text."""
        compact = uuid_bytes(stage_ids.filter(is_uuid(stage_ids)))
        found = self.rows.filter(pc.is_in(self.rows["call_stage_id"], value_set=compact))
        text = pa.table({name: uuid_text(found[name].combine_chunks()) for name in self.COLUMNS})
        if not self.other.num_rows:
            return text
        return pa.concat_tables([text, self.other.filter(pc.is_in(self.other["call_stage_id"], value_set=stage_ids))])

    def replaced(self, calls: pa.Array, new: StageOwners) -> StageOwners:
        """After a commit: the stages of ``calls`` are now exactly those ``new`` holds."""
        calls = pc.utf8_lower(calls.cast(pa.string()))
        rows = pa.concat_tables([_without(self.rows, uuid_bytes(calls.filter(is_uuid(calls)))), new.rows])
        other = pa.concat_tables([_without(self.other, calls), new.other])
        # Each commit appends a chunk: merge them once they pile up (like the file index).
        rows, other = (t.combine_chunks() if t["call_id"].num_chunks > MAX_INDEX_CHUNKS else t for t in (rows, other))
        return StageOwners(rows, other)


def _without(rows: pa.Table, calls: pa.Array) -> pa.Table:
    held = pc.is_in(rows["call_id"], value_set=calls)
    return rows.filter(pc.invert(held)) if pc.any(held).as_py() else rows


def _owner_rows(stages: pa.Table | None) -> pa.Table:
    """The owner columns of ``stages`` as lowercase strings (None: no rows)."""
    return pa.table(
        {
            name: pa.array([], pa.string()) if stages is None else pc.utf8_lower(stages[name].cast(pa.string()))
            for name in StageOwners.COLUMNS
        }
    )


_UUID_PATTERN = f"^{CANONICAL_UUID.pattern}$"
_UUID_PIECES = ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))


def is_uuid(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Which of ``ids`` are lowercase UUIDs in the canonical 8-4-4-4-12 form."""
    return pc.fill_null(pc.match_substring_regex(ids, _UUID_PATTERN), False)


def uuid_bytes(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Canonical lowercase UUIDs (see :func:`is_uuid`) as binary(16), the inverse of :func:`uuid_text`."""
    ids = ids.cast(pa.string())
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if not len(ids):
        return pa.array([], pa.binary(16))
    first = memoryview(ids.buffers()[1]).cast("i")[ids.offset]
    text = memoryview(ids.buffers()[2])[first : first + 36 * len(ids)]  # 36 characters each: contiguous
    packed = binascii.unhexlify(bytes(text).replace(b"-", b""))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(ids), [None, pa.py_buffer(packed)])


def uuid_text(packed: pa.Array) -> pa.Array:
    """binary(16) UUIDs as canonical lowercase text."""
    if not len(packed):
        return pa.array([], pa.string())
    data = memoryview(packed.buffers()[1])[16 * packed.offset : 16 * (packed.offset + len(packed))]
    offsets = array.array("i", range(0, 32 * len(packed) + 1, 32))
    hexed = pa.StringArray.from_buffers(len(packed), pa.py_buffer(offsets), pa.py_buffer(binascii.hexlify(data)))
    return pc.binary_join_element_wise(*(pc.utf8_slice_codeunits(hexed, a, b) for a, b in _UUID_PIECES), "-")


# --------------------------------------------------------------------------- partitions


def stage_partitions(stages: pa.Table) -> pa.Array:
    """``YYYY-MM-DD`` (UTC) of each stage's ``created``; null → the hive default."""
    created = stages["created"].combine_chunks()
    # Integer days since the epoch, not a tz-dependent cast: UTC by construction.
    micros = pc.cast(created, pa.int64())
    days = pc.floor(pc.divide(pc.cast(micros, pa.float64()), float(_US_PER_DAY)))
    dates = pc.cast(pc.cast(pc.cast(days, pa.int32()), pa.date32()), pa.string())
    return pc.fill_null(dates, NULL_PARTITION)


def child_partitions(children: pa.Table, stages: pa.Table, stage_parts: pa.Array) -> pa.Array:
    """A child row lives in its stage's partition (looked up by call_stage_id)."""
    positions = pc.index_in(children["call_stage_id"], value_set=stages["call_stage_id"].combine_chunks())
    return pc.fill_null(pc.take(stage_parts, positions), NULL_PARTITION)


def _compactions(sizes: Mapping[str, int]) -> list[list[str]]:
    """Per size tier, the files to merge: all of the tier's files once there are more
    than MAX_FILES_PER_PARTITION of them (tier 0 counting the commit's new file).

    Merging only files of a similar size (size-tiered, as in LSM stores) keeps the work
    per compaction bounded and rewrites each row about once per tier, instead of
    rewriting an ever-growing merged file every few commits.
    """
    groups = []
    low = 0
    for tier, high in enumerate(COMPACT_TIERS):
        members = sorted(rel for rel, size in sizes.items() if low <= size < high)
        crowded = len(members) + (1 if tier == 0 else 0) > MAX_FILES_PER_PARTITION
        groups.append(members if crowded else [])
        low = high
    return groups


@dataclass(frozen=True)
class PartitionRows:
    """One partition folder's rows as slices of a batch, gathered only when its file is
    written: the commit holds no second copy of the whole batch."""

    pieces: tuple[pa.Table, ...]

    def gather(self) -> pa.Table:
        if len(self.pieces) == 1:
            return self.pieces[0]
        return pa.concat_tables(self.pieces).combine_chunks()


def split_by_partition(
    rows: pa.Table, folder: str, column: str | None, values: pa.Array | None
) -> dict[str, PartitionRows]:
    """Rows grouped by partition folder. Rows in few runs of one folder each (replay's
    parts come in day order) are each folder's slices, gathered when written;
    otherwise one sort of the (short) partition values and one gather of the rows in
    that order (chunks and all), each folder a slice of it."""
    if not rows.num_rows:
        return {}
    if column is None or values is None:
        return {folder: PartitionRows((rows,))}
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    runs = pc.run_end_encode(values)
    if len(runs.values) <= max(MAX_SLICED_RUNS, rows.num_rows // 4):
        slices: dict[str, list[pa.Table]] = {}
        start = 0
        for value, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
            slices.setdefault(f"{folder}/{column}={value}", []).append(rows.slice(start, end - start))
            start = end
        return {name: PartitionRows(tuple(pieces)) for name, pieces in sorted(slices.items())}
    order = pc.sort_indices(values)
    ordered = rows.take(order)
    groups: dict[str, PartitionRows] = {}
    offset = 0
    for item in pc.value_counts(pc.take(values, order)):  # sorted input → runs in order
        value, count = item["values"].as_py(), item["counts"].as_py()
        groups[f"{folder}/{column}={value}"] = PartitionRows((ordered.slice(offset, count),))
        offset += count
    return groups


# --------------------------------------------------------------------------- transaction


def _rows_with_keys(root: Path, per_table: Mapping[str, pa.Table], table: schema.Table, keys: pa.Array) -> pa.Table:
    key = key_column(table.name)
    files = _files_with_keys(per_table[table.name], keys)
    pieces = [_conform(pq.read_table(root / rel), table) for rel in sorted(files)]
    if not pieces:
        return table.arrow_schema.empty_table()
    rows = pa.concat_tables(pieces)
    return rows.filter(pc.is_in(rows[key], value_set=keys))


class _StreamedFile:
    """A Parquet file written a row group at a time: rows are held until they reach
    ROW_GROUP_ROWS rows or MERGE_ROW_GROUP_BYTES bytes, then written, so a merge of big
    files holds about one row group, whatever the files add up to."""

    def __init__(self, path: Path, table: schema.Table, fresh: bool):
        self.path = path
        self.key = key_column(table.name)
        self.options = _write_options(table.column_names, fresh)
        self.row_group_size = self.options.pop("row_group_size")
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_bytes = self._pending_rows = 0
        self._keys: list[pa.Array] = []

    def add(self, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        self._keys.append(pc.unique(rows[self.key]))
        self._pending.append(rows)
        self._pending_bytes += rows.nbytes
        self._pending_rows += rows.num_rows
        if self._pending_bytes >= MERGE_ROW_GROUP_BYTES or self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def close(self) -> pa.Array | None:
        """Write what is held and close; the file's distinct keys (None when it has no row)."""
        self._flush()
        if self._writer is None:
            return None
        self._writer.close()
        return pc.unique(pa.chunked_array(self._keys, pa.string()))

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = pa.concat_tables(self._pending)
        self._pending, self._pending_bytes, self._pending_rows = [], 0, 0
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, rows.schema, **self.options)
        self._writer.write_table(rows, row_group_size=self.row_group_size)


@dataclass
class FileJob:
    """One new file: existing files (minus replaced keys) + new rows, merged.

    Built in a worker thread (read, filter, write all release the GIL), so the
    partitions of a commit are encoded on all cores at once. Existing files are read
    a batch at a time (see :class:`_StreamedFile`).
    """

    table: schema.Table
    final: str
    staged: Path
    #: Files to carry over, each with the keys whose rows are dropped (None: keep all).
    sources: list[tuple[Path, pa.Array | None]]
    rows: PartitionRows | None

    def build(self, io_pool: ThreadPoolExecutor) -> tuple[pa.Array, int, Future[None]] | None:
        """Write the file and queue its fsync; return its distinct keys, its size and
        the fsync (None when no row is left)."""
        out = _StreamedFile(self.staged, self.table, fresh=not self.sources)
        try:
            for path, drop in self.sources:
                with pq.ParquetFile(path) as source:
                    for batch in source.iter_batches(batch_size=MERGE_READ_ROWS):
                        rows = _conform(pa.Table.from_batches([batch]), self.table)
                        if drop is not None:
                            rows = rows.filter(pc.invert(pc.is_in(rows[out.key], value_set=drop)))
                        out.add(rows)
            if self.rows is not None:
                rows, self.rows = self.rows, None  # the batch's slices go as its files are written
                out.add(rows.gather())
                del rows
            keys = out.close()
        except BaseException:
            out.abort()
            raise
        if keys is None:
            return None
        size = self.staged.stat().st_size  # before the fsync starts: a stat can wait for it
        return keys, size, io_pool.submit(_fsync_path, self.staged)


class Transaction:
    """One journaled commit: plan replacements table by table, then :meth:`commit`."""

    def __init__(self, root: Path, index: FileIndex, pool: ThreadPoolExecutor, io_pool: ThreadPoolExecutor):
        self.root = root
        self.tx_id = f"{time.time_ns():x}-{secrets.token_hex(4)}"
        self.tx_dir = root / STAGING / f"tx-{self.tx_id}"
        self.per_table = dict(index.per_table)
        self.index = index
        self.pool = pool
        self.io_pool = io_pool
        self.deletes: dict[str, list[str]] = {}
        self.jobs: list[tuple[FileJob, Future[tuple[pa.Array, int, Future[None]] | None]]] = []
        self._files = index.files
        self._seq = 0

    def rows_with_keys(self, table: schema.Table, keys: pa.Array) -> pa.Table:
        """Current rows of ``table`` whose key is in ``keys`` (reads only their files)."""
        return _rows_with_keys(self.root, self.per_table, table, keys)

    def replace(self, table: schema.Table, remove: pa.Array, groups: Mapping[str, PartitionRows]) -> None:
        """Drop rows whose key is in ``remove``; add ``groups`` (partition → rows).

        Only folders holding removed keys or receiving rows are touched, and in them
        only the files holding removed keys (plus small files when compacting).
        """
        hits = _files_with_keys(self.per_table[table.name], remove)
        touched = {_partition_of(rel) for rel in hits} | set(groups)
        gone: list[str] = []
        for folder in sorted(touched):
            gone += self._plan_folder(table, folder, hits, remove, groups.get(folder))
        self.deletes[table.name] = gone

    def _plan_folder(
        self, table: schema.Table, folder: str, hits: set[str], remove: pa.Array, rows: PartitionRows | None
    ) -> list[str]:
        """Queue the new files of one folder; return the files they supersede."""
        size = self._files[table.name].get(folder, {})
        existing = set(size)
        rewrite = sorted(hits & existing)
        # A file of a replaced call is rewritten without its rows: small ones join the new file, bigger alone.
        fold = [rel for rel in rewrite if size[rel] < SMALL_FILE_BYTES]
        alone = [rel for rel in rewrite if size[rel] >= SMALL_FILE_BYTES]
        merges = _compactions({rel: size[rel] for rel in existing - set(rewrite)})
        for rel in alone:
            self._submit(table, folder, [(self.root / rel, remove)], None)
        small = merges.pop(0)  # tier 0 goes into the new file
        for group in merges:
            if group:
                self._submit(table, folder, [(self.root / rel, None) for rel in group], None)
        sources: list[tuple[Path, pa.Array | None]] = [(self.root / rel, remove) for rel in fold]
        sources += [(self.root / rel, None) for rel in small]
        if sources or rows is not None:
            self._submit(table, folder, sources, rows)
        return rewrite + [rel for group in [small, *merges] for rel in group]

    def _submit(
        self, table: schema.Table, folder: str, sources: list[tuple[Path, pa.Array | None]], rows: PartitionRows | None
    ) -> None:
        self._seq += 1
        job = FileJob(
            table,
            final=f"{folder}/part-{self.tx_id}-{self._seq:05d}.parquet",
            staged=self.tx_dir / f"{self._seq:05d}.parquet",
            sources=sources,
            rows=rows,
        )
        self.jobs.append((job, self.pool.submit(job.build, self.io_pool)))

    # -- committing

    def commit(self) -> FileIndex:
        """Finish the files, stage the index, write the journal (commit point), apply."""
        self.tx_dir.mkdir(parents=True, exist_ok=True)
        built = _wait_all([future for _, future in self.jobs])
        renames = []
        added: dict[str, list[tuple[str, pa.Table]]] = {}
        sizes: dict[str, int] = {}
        synced = []
        for (job, _), result in zip(self.jobs, built, strict=True):
            if result is None:
                continue  # every row of those files was replaced: nothing to rename
            file_keys, sizes[job.final], fsync = result
            synced.append(fsync)
            renames.append((job.staged.relative_to(self.root).as_posix(), job.final))
            entries = _index_entries(file_keys, pa.array([job.final] * len(file_keys), pa.string()))
            added.setdefault(job.table.name, []).append((job.final, entries))
        index = self._new_index(added, sizes)
        deletes = [rel for gone in self.deletes.values() for rel in gone]
        renames.append(self._stage_index(index, added, deletes))
        if not index.deltas:  # a full INDEX was written: the old deltas are folded in
            deletes += self.index.deltas
        _wait_all(synced)
        _fsync_path(self.tx_dir)
        _checkpoint("staged")
        self._write_journal(renames, deletes)
        _checkpoint("journaled")
        apply_journal(self.root, self.io_pool)
        shutil.rmtree(self.tx_dir, ignore_errors=True)
        return index

    def _stage_index(self, index: FileIndex, added: Mapping[str, list[tuple[str, pa.Table]]], gone: list[str]) -> tuple[str, str]:
        """Stage this commit's index change: a small delta, or every MAX_DELTAS commits
        (and after a rebuild) the whole index. Returns the rename for the journal."""
        staged = self.tx_dir / "index.parquet"
        old = self.index
        if old.base_ok and len(old.deltas) < MAX_DELTAS:
            rows = [
                pa.table({"table": pa.array([name] * len(e), pa.string()), "key": e["key"], "file": e["file"].cast(pa.string())}, schema=_DELTA_SCHEMA)
                for name, entries in added.items()
                for _, e in entries
            ]
            rows.append(pa.table({"table": [f.split("/", 1)[0] for f in gone], "key": pa.nulls(len(gone), pa.string()), "file": gone}, schema=_DELTA_SCHEMA))
            _write_file(pa.concat_tables(rows), staged)
            final = _delta_name(old.next_delta)
            index.deltas, index.next_delta = [*old.deltas, final], old.next_delta + 1
        else:
            _write_file(index.to_table(), staged)
            final = INDEX
            index.deltas, index.next_delta = [], old.next_delta
        return staged.relative_to(self.root).as_posix(), final

    def _new_index(self, added: Mapping[str, list[tuple[str, pa.Table]]], sizes: Mapping[str, int]) -> FileIndex:
        """The index after this commit: entries of superseded files out, new ones in."""
        per_table = dict(self.per_table)
        files = {name: {folder: dict(rels) for folder, rels in parts.items()} for name, parts in self._files.items()}
        for name, gone in self.deletes.items():
            entries = per_table[name]
            if gone:
                entries = entries.filter(pc.invert(pc.is_in(entries["file"], value_set=pa.array(gone, pa.string()))))
            new = added.get(name, [])
            per_table[name] = _fewer_chunks(pa.concat_tables([entries, *(e for _, e in new)]))
            parts = files[name]
            for rel in gone:
                parts[_partition_of(rel)].pop(rel, None)
            for rel, _ in new:
                parts.setdefault(_partition_of(rel), {})[rel] = sizes[rel]
            files[name] = {folder: rels for folder, rels in parts.items() if rels}
        return FileIndex(per_table, files)

    def abort(self) -> None:
        """Before the journal only: drop this transaction's staging files."""
        futures = [future for _, future in self.jobs]
        for future in futures:
            future.cancel()
        wait(futures)  # running writes (and their fsyncs) must finish before their folder goes
        wait([f.result()[2] for f in futures if not f.cancelled() and f.exception() is None and f.result() is not None])
        shutil.rmtree(self.tx_dir, ignore_errors=True)

    def _write_journal(self, renames: list[tuple[str, str]], deletes: list[str]) -> None:
        staging = self.root / STAGING
        body = json.dumps({"tx": self.tx_id, "renames": renames, "deletes": deletes}).encode()
        tmp = staging / f"{JOURNAL}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, staging / JOURNAL)
        _fsync_path(staging)


def _wait_all(futures: Sequence[Future[Any]]) -> list[Any]:
    """Wait for every job; raise the first error only once none is still running."""
    wait(futures)
    return [future.result() for future in futures]


def _write_file(rows: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows, path, **_write_options(rows.column_names))
    _fsync_path(path)


# --------------------------------------------------------------------------- warehouse


class ParquetWarehouse(Warehouse):
    """The Parquet folder warehouse."""

    format = "parquet"

    def __init__(
        self, path: Path, wait_for_lock: bool = False, wait_seconds: float | None = None
    ):
        super().__init__(path, wait_for_lock, wait_seconds)
        self._lock = OutputLock(lock_path(path), wait=wait_for_lock, wait_seconds=wait_seconds)
        self._index: FileIndex | None = None
        #: Loaded at the first ownership check, then kept up to date by each commit.
        self._owners: StageOwners | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._io_pool: ThreadPoolExecutor | None = None

    @property
    def index(self) -> FileIndex:
        assert self._index is not None, "warehouse not open"
        return self._index

    def open(self) -> None:
        check_local_output(self.path, "Parquet folder")
        check_output_folder(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _write_marker(self.path)
        except OSError as exc:
            raise open_failure(self.path, "Parquet folder", exc) from exc
        self._lock.acquire()
        try:
            with self._writing():
                heal(self.path)
                self._index = load_index(self.path)
            # Writes of one commit run in parallel: pyarrow releases the GIL while encoding.
            self._pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
            # fsyncs wait on the disk, not the CPU: many at once let the file system batch them.
            self._io_pool = ThreadPoolExecutor(max_workers=IO_THREADS)
            self._after_open()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for pool in (self._pool, self._io_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._io_pool = None
        self._index = None
        self._owners = None
        self._lock.release()

    def call_statuses(self) -> dict[str, str]:
        files = sorted(self.index.all_files("etl_calls"))
        if not files:
            return {}
        rows = pa.concat_tables([pq.read_table(self.path / rel, columns=["call_id", "status"]) for rel in files])
        return dict(zip(rows["call_id"].to_pylist(), rows["status"].to_pylist(), strict=True))

    def _stored_runs(self) -> pa.Table:
        files = sorted(self.index.all_files(schema.ETL_RUNS.name))
        pieces = [_conform(pq.read_table(self.path / rel), schema.ETL_RUNS) for rel in files]
        return pa.concat_tables(pieces) if pieces else schema.ETL_RUNS.arrow_schema.empty_table()

    def _stored_stage_owners(self, stage_ids: pa.Array) -> pa.Table:
        if self._owners is None:
            assert self._pool is not None, "warehouse not open"
            self._owners = StageOwners.load(self.path, sorted(self.index.all_files(schema.CALL_STAGES.name)), self._pool)
        return self._owners.lookup(stage_ids)

    def upsert(self, table: schema.Table, rows: pa.Table) -> None:
        """Insert or replace rows by key (unpartitioned tables); one transaction."""
        if table.per_call:
            raise ValueError(f"{table.name} is replaced per call: use commit_calls")
        if not rows.num_rows:
            return
        rows = _conform(rows, table)
        keys = pc.unique(rows[key_column(table.name)].combine_chunks())
        self._transact(lambda tx: tx.replace(table, keys, split_by_partition(rows, table.name, None, None)))

    def read_state(self, key: str) -> str | None:
        rows = _rows_with_keys(self.path, self.index.per_table, schema.ETL_STATE, pa.array([key], pa.string()))
        return rows["value"][0].as_py() if rows.num_rows else None

    def flag_deleted(self, deleted: Mapping[str, datetime]) -> None:
        """Set calls.deleted_at where not set yet; rewrites only the files of those calls."""
        if not deleted:
            return
        flags = deleted_table(deleted)

        def work(tx: Transaction) -> None:
            rows = tx.rows_with_keys(schema.CALLS, flags["call_id"].combine_chunks())
            rows = rows.filter(pc.is_null(rows["deleted_at"]))
            if not rows.num_rows:
                return
            # Each call's own timestamp, looked up by call_id (vectorised join).
            ids = flags["call_id"].combine_chunks()
            stamp = pc.take(flags["deleted_at"], pc.index_in(rows["call_id"], value_set=ids))
            column = rows.schema.get_field_index("deleted_at")
            rows = rows.set_column(column, rows.schema.field("deleted_at"), stamp)
            changed = rows["call_id"].combine_chunks()
            tx.replace(schema.CALLS, changed, split_by_partition(rows, schema.CALLS.name, None, None))

        self._transact(work)

    def _commit_batch(self, tables: Mapping[str, pa.Table], outcomes: Sequence[CallOutcome], run_id: str) -> None:
        batch = outcomes_table(outcomes, run_id)
        # Loaded and 404 calls are replaced as a unit; failed calls keep their rows.
        replaced = batch["call_id"].filter(pc.not_equal(batch["status"], "failed")).combine_chunks()
        groups = _data_groups(tables, replaced)
        # Copied out now: a column of the stages would hold all their buffers to the end.
        new_owners = StageOwners.of(tables.get(schema.CALL_STAGES.name))
        if isinstance(tables, dict):  # handed over: each folder's rows go once its file is written
            tables.clear()

        def work(tx: Transaction) -> None:
            for table in schema.DATA_TABLES:
                tx.replace(table, replaced, groups.pop(table.name))
            all_ids = batch["call_id"].combine_chunks()
            previous = tx.rows_with_keys(schema.ETL_CALLS, all_ids)
            merged = merged_etl_calls(batch, previous)
            tx.replace(schema.ETL_CALLS, all_ids, split_by_partition(merged, schema.ETL_CALLS.name, None, None))

        owners, self._owners = self._owners, None  # unknown until this commit is through
        self._transact(work)
        if owners is not None:
            self._owners = owners.replaced(replaced, new_owners)

    def _transact(self, work: Callable[[Transaction], None]) -> None:
        with self._writing():
            self._transact_once(work)

    def _transact_once(self, work: Callable[[Transaction], None]) -> None:
        assert self._pool is not None, "warehouse not open"
        assert self._io_pool is not None, "warehouse not open"
        tx = Transaction(self.path, self.index, self._pool, self._io_pool)
        try:
            work(tx)
        except BaseException:
            tx.abort()
            raise
        if not tx.jobs and not any(tx.deletes.values()):
            return  # nothing changed (e.g. every listed call was already flagged)
        try:
            self._index = tx.commit()
        except BaseException as exc:
            self._recover_after(exc)
            raise

    def _recover_after(self, failure: BaseException) -> None:
        """Before the journal exists heal() drops the staging files; after, it rolls
        the commit forward. Either way memory must follow what the disk now holds."""
        self._index = None
        try:
            heal(self.path)
            self._index = load_index(self.path)
        except OSError:
            # The disk still refuses: report the first failure; the next open heals.
            if isinstance(failure, OSError):
                return
            raise


def _data_groups(tables: Mapping[str, pa.Table], replaced: pa.Array) -> dict[str, dict[str, PartitionRows]]:
    """The batch's rows of each data table, split into partition folders."""
    empty = {t.name: t.arrow_schema.empty_table() for t in schema.DATA_TABLES}
    rows = {}
    for name, blank in empty.items():
        given = tables.get(name)
        rows[name] = _conform(blank if given is None else given, schema.TABLES[name])
    for name, table in rows.items():
        stray = pc.invert(pc.is_in(table["call_id"], value_set=replaced))
        if pc.any(stray).as_py():
            raise ValueError(f"{name}: rows for calls that are not loaded in this batch")
    stages = rows["call_stages"]
    stage_parts = stage_partitions(stages)
    groups = {}
    for table in schema.DATA_TABLES:
        part_values = stage_parts if table is schema.CALL_STAGES else child_partitions(rows[table.name], stages, stage_parts)
        groups[table.name] = split_by_partition(rows[table.name], table.name, table.partition_by, part_values)
    return groups


# --------------------------------------------------------------------------- readers


def _heal_if_idle(path: Path) -> None:
    """A reader after a crashed run: finish its committed journal if no writer is active."""
    if not (path / STAGING / JOURNAL).exists():
        return
    lock = OutputLock(path / STAGING / LOCK)
    try:
        lock.acquire()
    except (OutputError, OSError):
        return  # a writer is active (it heals on open) or the folder is read-only
    try:
        apply_journal(path)
    except OSError:
        pass  # read-only: the next writer heals
    finally:
        lock.release()


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def view_sql(path: Path, table: schema.Table) -> str:
    """SELECT over the table's files with the DuckDB output's column types and order."""
    pattern = _sql_literal(f"{(path / table.name).as_posix()}/**/*.parquet")
    cols = ", ".join(f"CAST({c.name} AS {c.sql_type}) AS {c.name}" for c in table.columns)
    return f"SELECT {cols} FROM read_parquet({pattern}, hive_partitioning = true, union_by_name = true)"


def connect_views(path: Path) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with one view per table, typed like the DuckDB output."""
    import duckdb  # not at the top: writing a Parquet folder needs no DuckDB

    check_output_folder(path, must_exist=True)
    _heal_if_idle(path)
    con = duckdb.connect()
    for table in schema.TABLES.values():
        if data_files(path, table.name):
            con.execute(f"CREATE VIEW {table.name} AS {view_sql(path, table)}")
        else:
            # No files yet: an empty typed table keeps queries working on a fresh dataset.
            con.execute(table.create_sql())
    return con


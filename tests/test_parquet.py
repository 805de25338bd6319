"""Parquet warehouse: layout, per-call replacement, file counts, safety, DuckDB parity."""

from __future__ import annotations

import fcntl
import json
import os
import random
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.errors import OutputError
from pipeline.load import open_warehouse, query_connection
from pipeline.load.duckdb import DuckDBWarehouse
from pipeline.load.parquet import INDEX, MARKER, MAX_FILES_PER_PARTITION, NULL_PARTITION, ParquetWarehouse, connect_views
from pipeline.records import CallOutcome, RunRecord

BASE = datetime(2024, 3, 1, 6, 0, tzinfo=UTC)
KEYS = {t.name: t.primary_key for t in schema.TABLES.values()}
FIVE = ("call_stages", "stage_inactivity_messages", "stage_voices", "etl_calls", "etl_runs")

# ----------------------------------------------------------------------------- fabrication


def call_uuid(c: int) -> str:
    return str(uuid.UUID(int=(0xCA11 << 64) | c))


def stage_uuid(c: int, i: int) -> str:
    return str(uuid.UUID(int=(0x57A6 << 64) | (c << 16) | i))


def stage_count(c: int, v: int) -> int:
    """Versions of a call differ in their number of stages (re-fetch loses stages)."""
    return 1 + (c + v) % 4


def stage_created(c: int, v: int, i: int) -> datetime | None:
    if (c + v + i) % 23 == 5:
        return None  # → __HIVE_DEFAULT_PARTITION__
    # Dates move between versions, so a re-fetched stage can change partition.
    return BASE + timedelta(days=(c * 7 + v * 3 + i) % 6, hours=(c + i) % 24, microseconds=c)


_WORDS = [f"{w}{n}" for w in ("agent", "caller", "order", "refund", "please", "policy", "ticket", "voice", "say", "never") for n in range(40)]
_POOL = " ".join(random.Random(7).choices(_WORDS, k=400_000))


def prompt_text(c: int, v: int, i: int, size: int) -> str:
    """Varied, word-like text (compresses like a real prompt, not like 'xxxx');
    sizes vary per call between a quarter of ``size`` and ``size``."""
    size = size * (1 + c % 4) // 4
    start = (c * 7919 + v * 104_729 + i * 1299) % (len(_POOL) - size)
    return f"v{v} " + _POOL[start : start + size]


def fabricate(calls: Iterable[tuple[int, int]], run_id: str = "run-1", prompt_bytes: int = 64) -> dict[str, pa.Table]:
    """Arrow tables for (call index, version) pairs, matching schema.py.

    Version ``v`` is visible in the rows (latest_token_count, message text, voice id),
    so a reader can tell which version of a call it sees.
    """
    stages: dict[str, list] = {n: [] for n in schema.CALL_STAGES.column_names}
    msgs: dict[str, list] = {n: [] for n in schema.STAGE_INACTIVITY_MESSAGES.column_names}
    voices: dict[str, list] = {n: [] for n in schema.STAGE_VOICES.column_names}
    extracted = BASE + timedelta(days=30)
    for c, v in calls:
        cid = call_uuid(c)
        for i in range(stage_count(c, v)):
            sid = stage_uuid(c, i)
            n_msgs = (c + v + i) % 3
            row = {
                "call_stage_id": sid, "call_id": cid, "stage_index": i,
                "created": stage_created(c, v, i), "model": f"model-{v % 3}",
                "system_prompt": prompt_text(c, v, i, prompt_bytes), "temperature": 0.1 * (i % 5) if i % 4 else None,
                "language_hint": "en" if i % 2 else None, "voice": f"voice-{c % 5}",
                "time_exceeded_message": None, "initial_token_count": 10 * i,
                "latest_token_count": v, "error_count": (c + i) % 2,
                "experimental_settings": json.dumps({"v": v}) if i % 3 == 0 else None,
                "initial_state": json.dumps({"k": [1, 2]}), "inactivity_message_count": n_msgs,
                "raw": json.dumps({"callStageId": sid, "v": v, "systemPrompt": prompt_text(c, v, i, prompt_bytes)}), "run_id": run_id, "extracted_at": extracted,
            }
            for k, val in row.items():
                stages[k].append(val)
            offset = Decimal(0)
            for p in range(n_msgs):
                dur = Decimal(p + 1) + Decimal("0.000000001") * v
                offset += dur
                for k, val in {
                    "call_stage_id": sid, "call_id": cid, "position": p, "duration": f"{dur}s",
                    "duration_seconds": dur, "offset_seconds": offset, "message": f"v{v} msg {p}",
                    "end_behavior": "END_BEHAVIOR_UNSPECIFIED",
                }.items():
                    msgs[k].append(val)
            roles = (["external"] if (c + i) % 2 else []) + (["override"] if v % 2 else [])
            for role in roles:
                for k, val in {
                    "call_stage_id": sid, "call_id": cid, "role": role, "provider": "elevenLabs",
                    "voice_id": f"v{v}", "model": "eleven_v2", "speed": 1.0,
                    "settings": json.dumps({"voiceId": f"v{v}", "headers": {"a": "<redacted>"}}),
                }.items():
                    voices[k].append(val)
    return {
        "call_stages": pa.Table.from_pydict(stages, schema=schema.CALL_STAGES.arrow_schema),
        "stage_inactivity_messages": pa.Table.from_pydict(msgs, schema=schema.STAGE_INACTIVITY_MESSAGES.arrow_schema),
        "stage_voices": pa.Table.from_pydict(voices, schema=schema.STAGE_VOICES.arrow_schema),
    }


def outcomes_for(spec: Sequence[tuple[int, str, int]], at: datetime | None = None) -> list[CallOutcome]:
    """(call, status, version) → outcomes; loaded calls report their stage count."""
    at = at or BASE + timedelta(days=30)
    return [
        CallOutcome(
            call_uuid(c), status,  # type: ignore[arg-type]
            stage_count(c, v) if status == "loaded" else (0 if status == "not_found" else None),
            "boom" if status == "failed" else None, at,
        )
        for c, status, v in spec
    ]


def commit_spec(wh, spec: Sequence[tuple[int, str, int]], run_id: str = "run-1", prompt_bytes: int = 64) -> None:
    tables = fabricate([(c, v) for c, s, v in spec if s == "loaded"], run_id, prompt_bytes)
    wh.commit_calls(tables, outcomes_for(spec), run_id)


# ----------------------------------------------------------------------------- reading


def rows(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple]:
    order = ", ".join(KEYS[table])
    return con.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()


def view_rows(path: Path, table: str) -> list[tuple]:
    con = connect_views(path)
    try:
        return rows(con, table)
    finally:
        con.close()


def assert_unique_keys(path: Path) -> None:
    con = connect_views(path)
    try:
        for table, key in KEYS.items():
            cols = ", ".join(key)
            total, distinct = con.execute(
                f"SELECT count(*), (SELECT count(*) FROM (SELECT DISTINCT {cols} FROM {table})) FROM {table}"
            ).fetchall()[0]
            assert total == distinct, f"{table}: duplicate keys"
    finally:
        con.close()


def parquet_files(root: Path, table: str) -> list[Path]:
    return sorted((root / table).rglob("*.parquet"))


def versions(path: Path) -> dict[str, set[int]]:
    """call_id → the versions visible in call_stages (one per call when consistent)."""
    out: dict[str, set[int]] = {}
    for cid, v in view_rows_raw(path, "SELECT call_id::VARCHAR, latest_token_count FROM call_stages"):
        out.setdefault(cid, set()).add(v)
    return out


def view_rows_raw(path: Path, sql: str) -> list[tuple]:
    con = connect_views(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def duckdb_columns(table: schema.Table) -> list[tuple[str, str]]:
    """(name, type) as the DuckDB output declares them."""
    con = duckdb.connect()
    con.execute(table.create_sql())
    return [(r[0], r[1]) for r in con.execute(f"DESCRIBE {table.name}").fetchall()]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


# ----------------------------------------------------------------------------- tests


def test_commit_and_read_back_with_duckdb_and_pyarrow(out: Path) -> None:
    spec = [(c, "loaded", 0) for c in range(40)]
    expected = fabricate([(c, 0) for c in range(40)])
    with ParquetWarehouse(out) as wh:
        commit_spec(wh, spec)
        assert wh.call_statuses() == {call_uuid(c): "loaded" for c in range(40)}
    assert (out / MARKER).is_file() and (out / INDEX).is_file()
    con = duckdb.connect()
    for table in schema.DATA_TABLES:
        glob = f"{out}/{table.name}/**/*.parquet"
        got = con.execute(f"SELECT count(*), count(DISTINCT created_date) FROM read_parquet('{glob}', hive_partitioning=true)").fetchall()[0]
        assert got[0] == expected[table.name].num_rows
        described = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{glob}', hive_partitioning=true)").fetchall()]
        assert described == table.column_names + ["created_date"]
        dataset = ds.dataset(out / table.name, format="parquet", partitioning="hive")
        got_table = dataset.to_table()
        assert got_table.num_rows == expected[table.name].num_rows
        assert got_table.schema.names == table.column_names + ["created_date"]
        # Same rows as committed (file and partition order aside).
        key = list(table.primary_key)
        assert got_table.drop_columns(["created_date"]).sort_by([(k, "ascending") for k in key]).equals(
            expected[table.name].sort_by([(k, "ascending") for k in key])
        )
    # Unpartitioned bookkeeping files, standard Parquet types.
    assert [p.parent.name for p in parquet_files(out, "etl_calls")] == ["etl_calls"]
    file_schema = pq.read_schema(parquet_files(out, "call_stages")[0])
    assert file_schema.field("created").type == pa.timestamp("us", tz="UTC")
    assert "created_date" not in file_schema.names
    msg_schema = pq.read_schema(parquet_files(out, "stage_inactivity_messages")[0])
    assert msg_schema.field("duration_seconds").type == pa.decimal128(38, 9)


def test_partitions_by_stage_date_children_follow_their_stage(out: Path) -> None:
    calls = [(c, 0) for c in range(30)]
    with ParquetWarehouse(out) as wh:
        commit_spec(wh, [(c, "loaded", v) for c, v in calls])
    stage_dates = {}
    for c, v in calls:
        for i in range(stage_count(c, v)):
            created = stage_created(c, v, i)
            stage_dates[stage_uuid(c, i)] = created.date().isoformat() if created else None
    folders = {p.name for p in (out / "call_stages").iterdir()}
    assert f"created_date={NULL_PARTITION}" in folders
    assert {f"created_date={d}" for d in stage_dates.values() if d} <= folders
    con = duckdb.connect()
    for table in schema.DATA_TABLES:
        glob = f"{out}/{table.name}/**/*.parquet"
        for sid, date in con.execute(
            f"SELECT call_stage_id, created_date::VARCHAR FROM read_parquet('{glob}', hive_partitioning=true)"
        ).fetchall():
            assert date == stage_dates[sid], (table.name, sid)
    # A date filter prunes to the folder's files.
    glob = f"{out}/call_stages/**/*.parquet"
    plan = con.execute(
        f"EXPLAIN ANALYZE SELECT count(*) FROM read_parquet('{glob}', hive_partitioning=true) WHERE created_date = DATE '2024-03-02'"
    ).fetchall()
    assert "Total Files Read: 1" in str(plan)
    null_rows = pq.ParquetDataset(out / "call_stages", partitioning="hive").read().filter(
        pa.compute.is_null(pa.compute.field("created_date"))
    )
    assert null_rows.num_rows == sum(1 for d in stage_dates.values() if d is None)


def test_recommit_same_calls_is_idempotent(out: Path) -> None:
    spec = [(c, "loaded", 1) for c in range(25)]
    with ParquetWarehouse(out) as wh:
        commit_spec(wh, spec)
        first = {t.name: view_rows(out, t.name) for t in schema.DATA_TABLES}
        commit_spec(wh, spec)
        commit_spec(wh, spec)
    assert_unique_keys(out)
    for table in schema.DATA_TABLES:
        assert view_rows(out, table.name) == first[table.name]
    attempts = view_rows_raw(out, "SELECT DISTINCT attempts FROM etl_calls")
    assert attempts == [(3,)]


def test_refetch_with_fewer_stages_drops_old_ones_not_found_removes_failed_keeps(out: Path) -> None:
    with ParquetWarehouse(out) as wh:
        commit_spec(wh, [(c, "loaded", 0) for c in range(12)])
        # c=2: version 0 has 3 stages, version 2 has 1 stage.
        assert stage_count(2, 0) == 3 and stage_count(2, 2) == 1
        commit_spec(wh, [(2, "loaded", 2), (3, "not_found", 0), (4, "failed", 0), (5, "loaded", 3)])
        statuses = wh.call_statuses()
    assert statuses[call_uuid(3)] == "not_found" and statuses[call_uuid(4)] == "failed"
    assert_unique_keys(out)
    seen = versions(out)
    assert seen[call_uuid(2)] == {2} and seen[call_uuid(5)] == {3} and seen[call_uuid(4)] == {0}
    assert call_uuid(3) not in seen
    counts = dict(view_rows_raw(out, "SELECT call_id::VARCHAR, count(*) FROM call_stages GROUP BY 1"))
    assert counts[call_uuid(2)] == 1
    for table in ("stage_inactivity_messages", "stage_voices"):
        assert not view_rows_raw(out, f"SELECT * FROM {table} WHERE call_id = '{call_uuid(3)}'")
        got = {v for (v,) in view_rows_raw(out, f"SELECT DISTINCT {'message' if 'messages' in table else 'voice_id'} FROM {table} WHERE call_id = '{call_uuid(2)}'")}
        assert all(str(x).startswith("v2") for x in got)
    failed = view_rows_raw(out, f"SELECT status, stage_count, attempts, error, last_success_at IS NOT NULL FROM etl_calls WHERE call_id = '{call_uuid(4)}'")
    assert failed == [("failed", stage_count(4, 0), 2, "boom", True)]


def test_many_small_commits_keep_file_count_bounded(out: Path) -> None:
    with ParquetWarehouse(out) as wh:
        for n in range(60):
            commit_spec(wh, [(1000 + n * 3 + k, "loaded", 0) for k in range(3)], run_id=f"run-{n}")
            if n % 7 == 0:  # some re-fetches of earlier calls too
                commit_spec(wh, [(1000 + k, "loaded", n) for k in range(2)], run_id=f"run-{n}b")
            run = RunRecord(f"run-{n}", BASE, "0.1.0", {"n": n}, status="ok")
            wh.save_run(run)
    for table in ("call_stages", "stage_inactivity_messages", "stage_voices", "etl_calls", "etl_runs"):
        folders: dict[Path, int] = {}
        for f in parquet_files(out, table):
            folders[f.parent] = folders.get(f.parent, 0) + 1
        assert folders and max(folders.values()) <= MAX_FILES_PER_PARTITION, (table, folders)
    assert_unique_keys(out)
    assert len(view_rows(out, "etl_runs")) == 60
    assert len(view_rows(out, "etl_calls")) == 180
    assert not [p for p in (out / "_staging").iterdir() if p.name != "lock"]


def test_compaction_writes_a_row_group_at_a_time_and_keeps_every_row(out: Path, monkeypatch) -> None:
    import pipeline.load.parquet as parquet

    # A merge holds about one row group: with a 64 KB bound, merged files of 8 KB prompts get many.
    monkeypatch.setattr(parquet, "MERGE_ROW_GROUP_BYTES", 64 << 10)
    monkeypatch.setattr(parquet, "MERGE_READ_ROWS", 4)
    with ParquetWarehouse(out) as wh:
        for n in range(3 * MAX_FILES_PER_PARTITION):
            commit_spec(wh, [(2000 + n * 2 + k, "loaded", 0) for k in range(2)], run_id=f"run-{n}", prompt_bytes=8192)
        commit_spec(wh, [(2000, "loaded", 1)], run_id="refetch", prompt_bytes=8192)  # rewrites a merged file
    expected = DuckDBWarehouse(out.parent / "same.duckdb")
    with expected:
        for n in range(3 * MAX_FILES_PER_PARTITION):
            commit_spec(expected, [(2000 + n * 2 + k, "loaded", 0) for k in range(2)], run_id=f"run-{n}", prompt_bytes=8192)
        commit_spec(expected, [(2000, "loaded", 1)], run_id="refetch", prompt_bytes=8192)
    with expected:
        want = {t.name: sorted(rows(expected.con, t.name)) for t in schema.DATA_TABLES}
    assert {t.name: sorted(view_rows(out, t.name)) for t in schema.DATA_TABLES} == want
    assert_unique_keys(out)
    groups = [pq.ParquetFile(f).metadata for f in parquet_files(out, "call_stages")]
    merged = [m for m in groups if m.num_row_groups > 1]
    assert merged, "no file was merged"
    biggest = max(m.row_group(i).total_byte_size for m in merged for i in range(m.num_row_groups))
    assert biggest < 64 << 10 + 4 * 16 << 10  # the bound plus one read batch of 4 rows


def test_refuses_foreign_folder_and_file_without_touching_them(tmp_path: Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(OutputError, match="not an ultravox-stages Parquet dataset"):
        ParquetWarehouse(foreign).open()
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(OutputError, match="is a file"):
        ParquetWarehouse(a_file).open()
    assert a_file.read_text() == "keep me"
    with pytest.raises(OutputError):
        connect_views(foreign)
    with pytest.raises(OutputError, match="no warehouse"):
        connect_views(tmp_path / "missing")
    # An empty folder is fine: it becomes ours.
    empty = tmp_path / "empty"
    empty.mkdir()
    with ParquetWarehouse(empty):
        pass
    assert (empty / MARKER).is_file()


def test_lock_held_names_the_pid(out: Path) -> None:
    with ParquetWarehouse(out), pytest.raises(OutputError, match=f"pid {os.getpid()}"):
        ParquetWarehouse(out).open()
    # Lock lives outside the table folders.
    assert (out / "_staging" / "lock").exists()
    fd = os.open(out / "_staging" / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after close
    finally:
        os.close(fd)


def test_fresh_dataset_has_typed_empty_tables(out: Path) -> None:
    with ParquetWarehouse(out):
        pass
    con = connect_views(out)
    for table in schema.TABLES.values():
        assert con.execute(f"SELECT count(*) FROM {table.name}").fetchall()[0] == (0,)
        described = [(r[0], r[1]) for r in con.execute(f"DESCRIBE {table.name}").fetchall()]
        assert described == duckdb_columns(table)


def test_views_match_duckdb_types(out: Path) -> None:
    with ParquetWarehouse(out) as wh:
        commit_spec(wh, [(c, "loaded", 0) for c in range(5)])
        wh.save_run(RunRecord("r", BASE, "0.1.0", {"a": 1}))
    con = connect_views(out)
    for table in schema.TABLES.values():
        described = [(r[0], r[1]) for r in con.execute(f"DESCRIBE {table.name}").fetchall()]
        assert described == duckdb_columns(table)


def test_same_batches_give_identical_rows_in_duckdb_and_parquet(tmp_path: Path) -> None:
    batches = [
        [(c, "loaded", 0) for c in range(30)],
        [(c, "loaded", 1) for c in range(0, 30, 2)] + [(31, "failed", 0), (3, "failed", 0)],
        [(5, "not_found", 0), (7, "loaded", 5), (31, "loaded", 2), (3, "failed", 0)],
        [(c, "loaded", 2) for c in range(10, 20)] + [(40, "not_found", 0)],
    ]
    runs = [RunRecord(f"run-{i}", BASE + timedelta(hours=i), "0.1.0", {"batch": i, "nested": {"x": [1]}}) for i in range(len(batches))]
    duck = DuckDBWarehouse(tmp_path / "w.duckdb")
    parq = ParquetWarehouse(tmp_path / "pq")
    for wh in (duck, parq):
        with wh:
            for run, spec in zip(runs, batches, strict=True):
                wh.save_run(run)
                commit_spec(wh, spec, run_id=run.run_id)
                run.status, run.finished_at = "ok", BASE + timedelta(days=1)
                wh.save_run(run)
            assert wh.call_statuses()
    with DuckDBWarehouse(tmp_path / "w.duckdb") as d, ParquetWarehouse(tmp_path / "pq") as p:
        assert d.call_statuses() == p.call_statuses()
    dcon = duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True)
    pcon = connect_views(tmp_path / "pq")
    for table in schema.TABLES:
        expected = rows(dcon, table)
        assert expected or table not in FIVE, table
        assert rows(pcon, table) == expected, table


def test_index_deltas_fold_and_survive_reopen(out: Path) -> None:
    from pipeline.load.parquet import MAX_DELTAS, STATE

    with ParquetWarehouse(out) as wh:
        for n in range(MAX_DELTAS + 5):
            commit_spec(wh, [(n, "loaded", 0), (n + 100, "loaded", 0)])
        deltas = list((out / STATE).glob("call_files.delta-*.parquet"))
        assert 0 < len(deltas) <= MAX_DELTAS
    # A new writer finds every call's files through INDEX + deltas: re-fetches replace.
    with ParquetWarehouse(out) as wh:
        commit_spec(wh, [(c, "loaded", 7) for c in range(MAX_DELTAS + 5)] + [(100, "not_found", 0)])
    assert_unique_keys(out)
    seen = versions(out)
    assert all(seen[call_uuid(c)] == {7} for c in range(MAX_DELTAS + 5))
    assert call_uuid(100) not in seen


def test_lost_index_is_rebuilt_from_the_files(out: Path) -> None:
    import shutil

    with ParquetWarehouse(out) as wh:
        commit_spec(wh, [(c, "loaded", 0) for c in range(10)])
    shutil.rmtree(out / "_state")
    with ParquetWarehouse(out) as wh:
        assert wh.call_statuses() == {call_uuid(c): "loaded" for c in range(10)}
        commit_spec(wh, [(c, "loaded", 1) for c in range(10)])
    assert_unique_keys(out)
    assert all(v == {1} for v in versions(out).values())
    assert (out / INDEX).is_file()


def with_stolen_stage(c: int, victim: int) -> dict[str, pa.Table]:
    """Call ``c`` whose first stage carries the id of ``victim``'s first stage, in upper
    case (ids are compared case-insensitively), children included."""
    tables = fabricate([(c, 0)])
    own, stolen = stage_uuid(c, 0), stage_uuid(victim, 0).upper()
    out = {}
    for name, table in tables.items():
        ids = [stolen if sid == own else sid for sid in table["call_stage_id"].to_pylist()]
        out[name] = table.set_column(0, table.schema.field(0), pa.array(ids, pa.string()))
    return out


def commit_stolen(wh, c: int, victim: int) -> CallOutcome:
    (outcome,) = wh.commit_calls(with_stolen_stage(c, victim), outcomes_for([(c, "loaded", 0)]), "run-1")
    return outcome


def test_a_stage_owned_by_another_call_fails_the_later_call_within_and_across_sessions(out: Path) -> None:
    owned_by = "stage {} is already owned by call {}"
    with ParquetWarehouse(out) as wh:
        commit_spec(wh, [(1, "loaded", 0), (5, "loaded", 0)])
        thief = commit_stolen(wh, 2, victim=1)  # the owner was committed by the batch before
        assert (thief.status, thief.error) == ("failed", owned_by.format(stage_uuid(1, 0), call_uuid(1)))
        commit_spec(wh, [(1, "not_found", 0)])  # the owner's rows go: its stage ids are free
        assert commit_stolen(wh, 2, victim=1).status == "loaded"
        commit_spec(wh, [(5, "loaded", 1)])  # a re-fetch keeps its own stage ids
        assert commit_stolen(wh, 6, victim=5).status == "failed"
    with ParquetWarehouse(out) as wh:  # a new session knows the owners from the files
        thief = commit_stolen(wh, 3, victim=1)
        assert (thief.status, thief.error) == ("failed", owned_by.format(stage_uuid(1, 0), call_uuid(2)))
        assert commit_stolen(wh, 4, victim=7).status == "loaded"  # nobody holds call 7's ids
    assert view_rows_raw(out, "SELECT call_id::VARCHAR, status FROM etl_calls ORDER BY call_id") == sorted(
        [(call_uuid(c), s) for c, s in [(1, "not_found"), (2, "loaded"), (3, "failed"), (4, "loaded"), (5, "loaded"), (6, "failed")]]
    )
    assert view_rows_raw(out, f"SELECT call_id::VARCHAR FROM call_stages WHERE call_stage_id::VARCHAR = '{stage_uuid(1, 0)}'") == [(call_uuid(2),)]
    assert_unique_keys(out)


def test_sizes_in_the_index_follow_the_files_across_sessions(out: Path) -> None:
    with ParquetWarehouse(out) as wh:
        for n in range(4):
            commit_spec(wh, [(c, "loaded", n) for c in range(n, n + 6)])
        held = wh.index.files
    with ParquetWarehouse(out) as wh:
        assert wh.index.files == held
        on_disk = {str(f.relative_to(out)): f.stat().st_size for f in out.glob("*/**/*.parquet") if not f.is_relative_to(out / "_state")}
        assert {rel: size for parts in held.values() for files in parts.values() for rel, size in files.items()} == on_disk


def _column_chunks(path: Path) -> dict[str, pq.ColumnChunkMetaData]:
    meta = pq.ParquetFile(path).metadata
    return {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}


def test_fresh_files_are_snappy_and_rewritten_files_zstd_text_without_dictionary_or_statistics(out: Path) -> None:
    with ParquetWarehouse(out) as wh:
        commit_spec(wh, [(c, "loaded", 0) for c in range(12)], prompt_bytes=2000)
        fresh = set(parquet_files(out, "call_stages"))
        for path in fresh:
            assert {chunk.compression for chunk in _column_chunks(path).values()} == {"SNAPPY"}, path
        commit_spec(wh, [(0, "loaded", 1)], prompt_bytes=2000)  # its small file is merged into the new one
        now = set(parquet_files(out, "call_stages"))
    merged_into = {path.parent for path in fresh - now}  # folders whose old file joined a new one
    rewritten = [path for path in now - fresh if path.parent in merged_into]
    assert rewritten
    for path in now - fresh:
        if path.parent not in merged_into:
            assert _column_chunks(path)["raw"].compression == "SNAPPY"
    for path in rewritten:
        chunks = _column_chunks(path)
        for name in ("raw", "system_prompt", "call_stage_id"):
            assert chunks[name].compression == "ZSTD" and "RLE_DICTIONARY" not in chunks[name].encodings, name
        assert chunks["model"].compression == "SNAPPY" and "RLE_DICTIONARY" in chunks["model"].encodings
        assert not chunks["raw"].is_stats_set and chunks["created"].is_stats_set and chunks["call_id"].is_stats_set


def test_batches_commit_everything_in_order(out: Path) -> None:
    with ParquetWarehouse(out) as wh:
        for v in range(4):
            commit_spec(wh, [(c, "loaded", v) for c in range(15)])
        assert set(wh.call_statuses().values()) == {"loaded"}
        commit_spec(wh, [(3, "not_found", 0)])
    assert_unique_keys(out)
    seen = versions(out)
    assert call_uuid(3) not in seen and all(v == {3} for v in seen.values())
    assert view_rows_raw(out, "SELECT max(attempts) FROM etl_calls") == [(5,)]


def test_a_failed_commit_raises_and_leaves_nothing(out: Path) -> None:
    with ParquetWarehouse(out) as wh:
        bad = fabricate([(1, 0)])
        with pytest.raises(ValueError, match="not loaded in this batch"):
            wh.commit_calls(bad, outcomes_for([(2, "loaded", 0)]), "run-1")  # rows of a call not in the batch
        wh.save_run(RunRecord("run-1", BASE, "0.1.0", {}))  # the warehouse goes on
    assert view_rows_raw(out, "SELECT count(*) FROM call_stages") == [(0,)]


def test_duckdb_batches_commit_everything_in_order(tmp_path: Path) -> None:
    db = tmp_path / "wb.duckdb"
    with DuckDBWarehouse(db) as wh:
        for v in range(4):
            commit_spec(wh, [(c, "loaded", v) for c in range(15)])
        assert set(wh.call_statuses().values()) == {"loaded"}
        commit_spec(wh, [(3, "not_found", 0)])
    con = duckdb.connect(str(db), read_only=True)
    by_call = dict(con.execute(
        "SELECT call_id::VARCHAR, list(DISTINCT latest_token_count) FROM call_stages GROUP BY call_id").fetchall())
    assert call_uuid(3) not in by_call and len(by_call) == 14
    assert all(v == [3] for v in by_call.values())  # the last version of each call, once
    assert con.execute("SELECT max(attempts), count(*) FROM etl_calls").fetchall() == [(5, 15)]
    expected = sum(stage_count(c, 3) for c in range(15) if c != 3)
    assert con.execute("SELECT count(*), count(DISTINCT call_stage_id) FROM call_stages").fetchall() == [(expected, expected)]


@pytest.mark.parametrize("table", ["call_stages", "stage_inactivity_messages", "stage_voices"])
@pytest.mark.parametrize("fmt", ["duckdb", "parquet", "delta"])
def test_a_batch_repeating_a_key_is_refused_and_nothing_is_written(tmp_path: Path, fmt: str, table: str) -> None:
    out = tmp_path / ("w.duckdb" if fmt == "duckdb" else "w")
    with open_warehouse(fmt, out) as wh:
        tables = fabricate([(1, 0), (2, 0)])
        assert tables[table].num_rows
        doubled = {**tables, table: pa.concat_tables([tables[table], tables[table].slice(0, 1)])}
        with pytest.raises(ValueError, match=f"{table}: the batch repeats a primary key"):
            wh.commit_calls(doubled, outcomes_for([(1, "loaded", 0), (2, "loaded", 0)]), "run-1")
        commit_spec(wh, [(3, "loaded", 0)])  # the warehouse goes on
    con = query_connection(fmt, out)
    assert con.execute("SELECT DISTINCT call_id::VARCHAR FROM call_stages").fetchall() == [(call_uuid(3),)]
    assert con.execute("SELECT count(*) FROM etl_calls").fetchall() == [(1,)]


def test_duckdb_a_failed_commit_raises_and_is_rolled_back(tmp_path: Path) -> None:
    db = tmp_path / "wb.duckdb"
    with DuckDBWarehouse(db) as wh:
        tables = fabricate([(1, 0)])
        stages = tables["call_stages"]
        raw = stages.schema.get_field_index("raw")
        broken = stages.set_column(raw, pa.field("raw", pa.string()), pa.nulls(stages.num_rows, pa.string()))
        with pytest.raises(duckdb.ConstraintException):  # raw is NOT NULL: the insert fails inside the transaction
            wh.commit_calls({**tables, "call_stages": broken}, outcomes_for([(1, "loaded", 0)]), "run-1")
        wh.save_run(RunRecord("run-1", BASE, "0.1.0", {}))  # the warehouse goes on
        commit_spec(wh, [(2, "loaded", 0)])
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT DISTINCT call_id::VARCHAR FROM call_stages").fetchall() == [(call_uuid(2),)]
    assert con.execute("SELECT count(*) FROM etl_runs").fetchall() == [(1,)]


def calls_rows(ids: Sequence[int], run_id: str = "run-1") -> pa.Table:
    """Rows for the calls table (discovery), typed by schema.py."""
    return pa.Table.from_pylist(
        [
            {
                "call_id": call_uuid(c), "created": BASE + timedelta(minutes=c), "joined": None, "ended": None,
                "end_reason": "hangup", "billed_duration": "1.5s", "billed_duration_seconds": Decimal("1.5"),
                "agent_id": None, "metadata": json.dumps({"c": c}), "deleted_at": None,
                "raw": json.dumps({"callId": call_uuid(c)}), "run_id": run_id, "extracted_at": BASE,
            }
            for c in ids
        ],
        schema=schema.TABLES["calls"].arrow_schema,
    )


@pytest.mark.skipif("calls" not in schema.TABLES or "etl_state" not in schema.TABLES, reason="no discovery tables")
def test_upsert_state_and_flag_deleted_match_duckdb(tmp_path: Path) -> None:
    state = schema.TABLES["etl_state"]
    calls = schema.TABLES["calls"]
    deleted_at = BASE + timedelta(days=2)
    for wh in (DuckDBWarehouse(tmp_path / "w.duckdb"), ParquetWarehouse(tmp_path / "pq")):
        with wh:
            assert wh.read_state("watermark") is None
            for value in ("2024-03-01", "2024-03-02"):
                wh.upsert(state, pa.Table.from_pylist([{"key": "watermark", "value": value, "updated_at": BASE}], schema=state.arrow_schema))
            assert wh.read_state("watermark") == "2024-03-02"
            wh.upsert(calls, calls_rows(range(10)))
            wh.upsert(calls, calls_rows(range(5, 15), run_id="run-2"))  # 5..9 replaced
            wh.flag_deleted({call_uuid(c): deleted_at + timedelta(minutes=c) for c in (1, 2, 12)})
            wh.flag_deleted({call_uuid(1): deleted_at + timedelta(days=1), call_uuid(99): deleted_at})  # kept / unknown
    dcon = duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True)
    pcon = connect_views(tmp_path / "pq")
    for table in ("etl_state", "calls"):
        assert rows(pcon, table) == rows(dcon, table), table
    flagged = pcon.execute("SELECT count(*) FROM calls WHERE deleted_at IS NOT NULL").fetchone()
    assert flagged == (3,)
    assert pcon.execute("SELECT count(*), count(DISTINCT call_id) FROM calls").fetchone() == (15, 15)


def test_compaction_is_size_tiered() -> None:
    from pipeline.load.parquet import _compactions

    kb, mb = 1 << 10, 1 << 20
    limit = MAX_FILES_PER_PARTITION
    tiny = {f"t{i}": 100 * kb for i in range(limit - 1)}
    assert _compactions(tiny) == [[], [], []]  # limit - 1 + the new file: not crowded yet
    tiny["last"] = 100 * kb
    assert _compactions(tiny)[0] == sorted(tiny)  # limit + 1 > limit: merged into the new file
    medium = {f"m{i}": 2 * mb for i in range(limit + 1)}
    large = {f"l{i}": 9 * mb for i in range(limit)}  # a merge of medium files lands here, not merged again yet
    final = {f"f{i}": 70 * mb for i in range(50)}
    groups = _compactions(medium | large | final | {"t": 10 * kb})
    assert groups == [[], sorted(medium), []]  # big files are never merged


def test_stage_owners_keep_every_stage_and_few_chunks_over_many_commits() -> None:
    from pipeline.load.parquet import MAX_INDEX_CHUNKS, StageOwners

    owners = StageOwners.load(Path("/nonexistent"), [], None)  # no stage files yet
    for n in range(MAX_INDEX_CHUNKS + 40):
        stages = pa.table({"call_stage_id": [stage_uuid(n, 0).upper()], "call_id": [call_uuid(n)]})
        owners = owners.replaced(pa.array([call_uuid(n)]), StageOwners.of(stages))
    owners = owners.replaced(pa.array([call_uuid(3)]), StageOwners.of(None))  # call 3 now has no stage
    assert owners.rows["call_id"].num_chunks <= MAX_INDEX_CHUNKS + 1
    assert owners.rows.num_rows == MAX_INDEX_CHUNKS + 39
    assert owners.lookup(pa.array([stage_uuid(7, 0)])).to_pylist() == [{"call_stage_id": stage_uuid(7, 0), "call_id": call_uuid(7)}]


def test_a_commit_frees_the_rows_of_each_table_once_its_files_are_written(out: Path, monkeypatch) -> None:
    """The batch is handed over: when the last file of the commit (etl_calls) is built,
    the stages with their 64 KB prompts are already gone, not held to the end. Each
    table is one buffer, as replay receives it: any column kept would keep them all."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.load import parquet

    held: dict[str, int] = {}
    build = parquet.FileJob.build

    def watched(job, io_pool):
        held.setdefault(job.table.name, pa.total_allocated_bytes())  # when its first file starts
        return build(job, io_pool)

    monkeypatch.setattr(parquet.FileJob, "build", watched)
    spec = [(c, "loaded", 0) for c in range(200)]
    with ParquetWarehouse(out) as wh:
        wh._pool = ThreadPoolExecutor(max_workers=1)  # the files one after another, in order
        before = pa.total_allocated_bytes()
        tables = {name: _in_one_buffer(t) for name, t in fabricate([(c, 0) for c, _, _ in spec], prompt_bytes=64 << 10).items()}
        size = tables["call_stages"].nbytes
        wh.commit_calls(tables, outcomes_for(spec), "run-1")
        assert tables == {}  # handed over
        del tables
        assert held["call_stages"] - before >= size
        assert held["etl_calls"] - before < size / 4
    assert len(view_rows(out, "call_stages")) == sum(stage_count(c, 0) for c, _, _ in spec)


def _in_one_buffer(table: pa.Table) -> pa.Table:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def test_stage_owners_hold_uuids_as_16_bytes_and_any_other_id_as_text_alike() -> None:
    """The ownership lookup against a plain dict, over commits that replace calls, drop
    them and mix UUIDs (any case) with ids that are not UUIDs (kept as text)."""
    from pipeline.load.parquet import StageOwners

    rng = random.Random(11)
    owners = StageOwners.load(Path("/nonexistent"), [], None)
    model: dict[str, str] = {}
    seen: list[str] = []
    for n in range(80):
        c = rng.randrange(30)
        call = call_uuid(c) if c % 7 else f"call-{c}"  # some calls whose id is no UUID
        count = rng.randrange(0, 4)
        ids = [stage_uuid(c, rng.randrange(6)) if rng.random() < 0.8 else rng.choice([f"Stage-{c}-{k}", f"{stage_uuid(c, k)}x"])
               for k in range(count)]
        ids = [i.upper() if rng.random() < 0.3 else i for i in dict.fromkeys(ids)]
        stages = pa.table({"call_stage_id": pa.array(ids, pa.string()), "call_id": pa.array([call.upper()] * len(ids), pa.string())})
        owners = owners.replaced(pa.array([call]), StageOwners.of(stages if ids else None))
        model = {s: o for s, o in model.items() if o != call.lower()} | {i.lower(): call.lower() for i in ids}
        seen += [i.lower() for i in ids]
    probe = pa.array(sorted(set(seen)) + [stage_uuid(99, 0), "stage-none"])
    got = owners.lookup(probe)
    assert dict(zip(got["call_stage_id"].to_pylist(), got["call_id"].to_pylist(), strict=True)) == model
    assert owners.rows.schema.field("call_stage_id").type == pa.binary(16)
    assert owners.other.num_rows == sum(1 for s, o in model.items() if not (len(s) == len(o) == 36 and s.count("-") == o.count("-") == 4))
    assert 0 < owners.other.num_rows < len(model)


@pytest.mark.parametrize("in_runs", [True, False], ids=["parts-in-day-order", "unordered"])
def test_a_batch_splits_into_its_folders_alike_whether_its_rows_come_in_runs_or_not(in_runs: bool) -> None:
    """Replay's parts come in day order: their folders are slices of the batch, gathered
    only when written (no copy of the whole batch); other batches are gathered in one take."""
    from pipeline.load.parquet import split_by_partition

    days = [f"2026-11-{d:02d}" for d in range(1, 8)]
    rng = random.Random(7)
    parts = []
    for part in range(12):  # chunks, like a batch of parts
        values = sorted(rng.choice(days) for _ in range(200)) if in_runs else [rng.choice(days) for _ in range(200)]
        parts.append(pa.table({"day": values, "n": [part * 1000 + i for i in range(200)],
                               "text": [rng.randbytes(rng.randint(0, 50)).hex() for _ in range(200)]}))
    rows = pa.concat_tables(parts)
    values = rows["day"]
    groups = split_by_partition(rows, "t", "day", values)
    assert all(len(g.pieces) > 1 for g in groups.values()) is in_runs  # slices of every part, or one gathered run
    got = {name: g.gather() for name, g in groups.items()}
    expected = {f"t/day={day}": rows.filter(pa.compute.equal(values, day)) for day in sorted(set(values.to_pylist()))}
    assert list(got) == list(expected)
    assert all(got[name].equals(expected[name].combine_chunks()) for name in expected)


def test_replays_parts_come_in_day_order_and_children_follow_their_stage() -> None:
    from pipeline.columns import to_arrow
    from pipeline.sandbox import SyntheticData
    from pipeline.transform import transform_columns

    data = SyntheticData(n_calls=60, seed=3)
    result = transform_columns([(c, data.stages_for(c)) for c in data.call_ids], "run-1", datetime(2026, 12, 1, tzinfo=UTC))
    stages = to_arrow(result.tables["call_stages"])
    days = [None if c is None else c.date().isoformat() for c in stages["created"].to_pylist()]
    assert days == sorted(days, key=lambda d: d or "") and len(set(days)) > 5
    day_of = dict(zip(stages["call_stage_id"].to_pylist(), days, strict=True))
    for name in ("stage_inactivity_messages", "stage_voices"):
        children = to_arrow(result.tables[name])["call_stage_id"].to_pylist()
        assert len(children) > 20 and [day_of[s] for s in children] == sorted((day_of[s] for s in children), key=lambda d: d or "")


def test_a_replay_sized_batch_of_parts_over_a_month_splits_by_slices() -> None:
    """A replay's batch: about 32 parts of ~233 stages, each in day order over 31 days
    (nearly every day in every part): still sliced, never gathered in one copy."""
    from pipeline.load.parquet import split_by_partition

    rng = random.Random(11)
    days = [f"2026-10-{d:02d}" for d in range(1, 32)]
    rows = pa.concat_tables(
        pa.table({"day": sorted(rng.choice(days) for _ in range(233)), "n": list(range(233))}) for _ in range(32)
    )
    groups = split_by_partition(rows, "t", "day", rows["day"])
    assert len(groups) == 31 and all(len(g.pieces) > 1 for g in groups.values())
    assert sum(g.gather().num_rows for g in groups.values()) == rows.num_rows

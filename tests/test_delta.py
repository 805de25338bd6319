"""Delta Lake warehouse (local folder): layout, replace by call, healing, locks, readers, maintenance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipeline import schema
from pipeline.errors import OutputError, StagesError
from pipeline.load import delta
from pipeline.load.delta import (
    MARKER,
    NULL_CREATED_DATE,
    PARTITION_COLUMN,
    DeltaWarehouse,
    connect_views,
    delta_schema,
    location_uri,
    maintain,
)
from pipeline.records import CallOutcome, RunRecord
from pipeline.sandbox import SyntheticData
from pipeline.transform import transform_calls

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
DATA = SyntheticData(n_calls=120, seed=3)
IDS = DATA.call_ids


# ----------------------------------------------------------------------------- helpers


def stages_of(call_id: str, drop_last: bool = False) -> list[dict]:
    stages = DATA.stages_for(call_id)
    return stages[:-1] if drop_last and stages else stages


def batch(
    ids: Sequence[str], run_id: str, status: dict[str, str] | None = None, drop_last: bool = False, when: datetime = NOW
) -> tuple[dict[str, pa.Table], list[CallOutcome]]:
    """Transformed tables and outcomes for ``ids`` (status overrides: failed / not_found)."""
    status = status or {}
    loaded = [c for c in ids if status.get(c, "loaded") == "loaded"]
    result = transform_calls([(c, stages_of(c, drop_last)) for c in loaded], run_id, when)
    outcomes = []
    for c in ids:
        kind = status.get(c, "loaded")
        count = result.stage_counts.get(c) if kind == "loaded" else (0 if kind == "not_found" else None)
        outcomes.append(CallOutcome(c, kind, count, "boom" if kind == "failed" else None, when))  # type: ignore[arg-type]
    return result.tables, outcomes


def commit(w: DeltaWarehouse, ids: Sequence[str], run_id: str, **kw) -> list[CallOutcome]:
    tables, outcomes = batch(ids, run_id, **kw)
    return w.commit_calls(tables, outcomes, run_id)


def read(root: Path, name: str) -> pa.Table:
    return DeltaTable(str(root / name)).to_pyarrow_table()


def assert_consistent(root: Path) -> None:
    """Unique keys; every loaded call's rows are exactly one fetch matching etl_calls."""
    tables = {t.name: read(root, t.name) for t in schema.TABLES.values()}
    for t in schema.TABLES.values():
        rows = tables[t.name]
        keys = rows.select(list(t.primary_key)).to_pylist()
        assert len(keys) == len({tuple(k.values()) for k in keys}), f"duplicate key in {t.name}"
    calls = {r["call_id"]: r for r in tables["etl_calls"].to_pylist()}
    stages = tables["call_stages"]
    per_call: dict[str, list[dict]] = {}
    for row in stages.select(["call_id", "run_id", "call_stage_id"]).to_pylist():
        per_call.setdefault(row["call_id"], []).append(row)
    for call_id, rows in per_call.items():
        assert call_id in calls, "rows of a call etl_calls does not know"
        assert len({r["run_id"] for r in rows}) == 1, "a call mixes two fetches"
        if calls[call_id]["status"] == "loaded":
            assert len(rows) == calls[call_id]["stage_count"]
            assert rows[0]["run_id"] == calls[call_id]["last_run_id"]
        assert calls[call_id]["status"] != "not_found"
    stage_ids = set(stages["call_stage_id"].to_pylist())
    for child in ("stage_inactivity_messages", "stage_voices"):
        assert set(tables[child]["call_stage_id"].to_pylist()) <= stage_ids, f"{child} rows without their stage"


def expected_stage_ids(ids: Sequence[str]) -> set[str]:
    return {s["callStageId"] for c in ids for s in DATA.stages_for(c)}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "delta-out"


# ----------------------------------------------------------------------------- layout


def test_layout_schema_and_partitions(out: Path) -> None:
    with DeltaWarehouse(out) as w:
        commit(w, IDS[:30], "run-a")
    assert (out / MARKER).is_file()
    for table in schema.TABLES.values():
        dt = DeltaTable(str(out / table.name))
        assert pa.schema(dt.schema().to_arrow()) == delta_schema(table)
        assert dt.metadata().partition_columns == ([PARTITION_COLUMN] if table.per_call else [])
    stages = read(out, "call_stages")
    created = stages["created"].to_pylist()
    dates = stages[PARTITION_COLUMN].to_pylist()
    for when, day in zip(created, dates, strict=True):
        assert day == (when.astimezone(UTC).date() if when is not None else NULL_CREATED_DATE)
    # Child rows sit in their stage's partition.
    by_stage = dict(zip(stages["call_stage_id"].to_pylist(), dates, strict=True))
    for child in ("stage_inactivity_messages", "stage_voices"):
        rows = read(out, child)
        assert rows.num_rows
        for sid, day in zip(rows["call_stage_id"].to_pylist(), rows[PARTITION_COLUMN].to_pylist(), strict=True):
            assert day == by_stage[sid]


def test_null_created_goes_to_fixed_partition(out: Path) -> None:
    # The transformer refuses a missing created; the warehouse still places such a row.
    call = IDS[0]
    result = transform_calls([(call, DATA.stages_for(call))], "run-n", NOW)
    stages = result.tables["call_stages"]
    column = stages.schema.get_field_index("created")
    nulls = pa.nulls(stages.num_rows, stages.schema.field("created").type)
    tables = dict(result.tables, call_stages=stages.set_column(column, stages.schema.field("created"), nulls))
    outcome = CallOutcome(call, "loaded", result.stage_counts[call], None, NOW)
    with DeltaWarehouse(out) as w:
        w.commit_calls(tables, [outcome], "run-n")
    rows = read(out, "call_stages").to_pylist()
    assert {r[PARTITION_COLUMN] for r in rows if r["created"] is None} == {NULL_CREATED_DATE}
    assert (out / "call_stages" / f"{PARTITION_COLUMN}={NULL_CREATED_DATE.isoformat()}").is_dir()


def test_s3_uri_collapsed_by_pathlib_is_restored(tmp_path: Path) -> None:
    assert location_uri(Path("s3://bucket/some/prefix")) == "s3://bucket/some/prefix"
    assert location_uri("s3://bucket/p/") == "s3://bucket/p"
    assert location_uri(tmp_path / "x") == str(tmp_path / "x")
    with pytest.raises(OutputError):
        location_uri("gs://bucket/p")


# ----------------------------------------------------------------------------- replace by call


def test_exact_rows_after_several_batches(out: Path) -> None:
    with DeltaWarehouse(out) as w:
        for start in range(0, 90, 30):
            commit(w, IDS[start : start + 30], f"run-{start}")
        expected = batch(IDS[:90], "x")[0]
    for name in ("call_stages", "stage_inactivity_messages", "stage_voices"):
        table = schema.TABLES[name]
        got = read(out, name).drop_columns([PARTITION_COLUMN, *(["run_id"] if name == "call_stages" else [])])
        want = expected[name].select(got.column_names).cast(got.schema)
        order = [(k, "ascending") for k in table.primary_key]
        assert got.sort_by(order).equals(want.sort_by(order)), name
    assert set(read(out, "call_stages")["call_stage_id"].to_pylist()) == expected_stage_ids(IDS[:90])
    assert_consistent(out)


def test_recommit_replaces_not_appends(out: Path) -> None:
    with DeltaWarehouse(out) as w:
        commit(w, IDS[:40], "run-1")
        first = read(out, "call_stages").num_rows
        commit(w, IDS[:40], "run-2")
        commit(w, IDS[20:40], "run-3")
        assert w.call_statuses() == {c: "loaded" for c in IDS[:40]}
    stages = read(out, "call_stages")
    assert stages.num_rows == first
    runs = dict(zip(stages["call_id"].to_pylist(), stages["run_id"].to_pylist(), strict=True))
    assert {runs[c] for c in IDS[20:40] if c in runs} == {"run-3"}
    attempts = {r["call_id"]: r["attempts"] for r in read(out, "etl_calls").to_pylist()}
    assert attempts[IDS[0]] == 2 and attempts[IDS[25]] == 3
    assert_consistent(out)


def test_refetch_with_fewer_stages_and_not_found_and_failed(out: Path) -> None:
    multi = [c for c in IDS[:60] if len(DATA.stages_for(c)) >= 2][:6]
    gone, broken, shrunk = multi[:2], multi[2:4], multi[4:]
    with DeltaWarehouse(out) as w:
        commit(w, multi, "run-1")
        status = {c: "not_found" for c in gone} | {c: "failed" for c in broken}
        tables, outcomes = batch(multi, "run-2", status=status, drop_last=True)
        w.commit_calls(tables, outcomes, "run-2")
    stages = read(out, "call_stages")
    held = {c: stages.filter(pc.equal(stages["call_id"], c)) for c in multi}
    for c in gone:
        assert held[c].num_rows == 0
    for c in broken:  # failed: previous rows kept
        assert held[c].num_rows == len(DATA.stages_for(c))
        assert set(held[c]["run_id"].to_pylist()) == {"run-1"}
    for c in shrunk:
        assert held[c].num_rows == len(DATA.stages_for(c)) - 1
    last = DATA.stages_for(shrunk[0])[-1]["callStageId"]
    voices = read(out, "stage_voices")
    assert last not in voices["call_stage_id"].to_pylist()
    statuses = {r["call_id"]: r for r in read(out, "etl_calls").to_pylist()}
    assert statuses[broken[0]]["status"] == "failed" and statuses[broken[0]]["stage_count"] == len(DATA.stages_for(broken[0]))
    assert statuses[gone[0]]["status"] == "not_found"
    assert_consistent(out)


def test_stage_owned_by_another_call_fails_the_later_call(out: Path) -> None:
    owner, thief = IDS[0], IDS[1]
    stolen = DATA.stages_for(owner)[0]["callStageId"]
    with DeltaWarehouse(out) as w:
        commit(w, [owner], "run-1")
        stages = DATA.stages_for(thief)
        stages[0]["callStageId"] = stolen
        result = transform_calls([(thief, stages)], "run-2", NOW)
        committed = w.commit_calls(result.tables, [CallOutcome(thief, "loaded", len(stages), None, NOW)], "run-2")
    assert committed[0].status == "failed" and stolen in (committed[0].error or "")
    rows = read(out, "call_stages")
    assert set(rows["call_id"].to_pylist()) == {owner}
    assert dict(zip(rows["call_stage_id"].to_pylist(), rows["call_id"].to_pylist(), strict=True))[stolen] == owner
    assert {r["call_id"]: r["status"] for r in read(out, "etl_calls").to_pylist()}[thief] == "failed"


def test_stage_owners_are_known_across_sessions_and_freed_by_a_not_found_call(out: Path) -> None:
    owner, thief = IDS[0], IDS[1]
    stolen = DATA.stages_for(owner)[0]["callStageId"]
    stages = DATA.stages_for(thief)
    stages[0]["callStageId"] = stolen.upper()  # the same stage id, spelt differently

    def steal(w: DeltaWarehouse, run_id: str) -> str:
        tables = transform_calls([(thief, stages)], run_id, NOW).tables
        return w.commit_calls(tables, [CallOutcome(thief, "loaded", len(stages), None, NOW)], run_id)[0].status

    with DeltaWarehouse(out) as w:
        commit(w, [owner, *IDS[2:6]], "run-1")
    with DeltaWarehouse(out) as w:  # a new session reads the owners from disk
        assert steal(w, "run-2") == "failed"
        commit(w, [owner], "run-3", status={owner: "not_found"})
        assert steal(w, "run-4") == "loaded"  # the stage is free now
    rows = read(out, "call_stages")
    owners = dict(zip(rows["call_stage_id"].to_pylist(), rows["call_id"].to_pylist(), strict=True))
    assert owners[stolen] == thief and owner not in owners.values()
    assert_consistent(out)


def test_long_prompts_stay_out_of_file_statistics(out: Path) -> None:
    big = SyntheticData(n_calls=12, seed=5, big_prompts=True)
    loaded = [(c, big.stages_for(c)) for c in big.call_ids]
    result = transform_calls(loaded, "run-1", NOW)
    outcomes = [CallOutcome(c, "loaded", result.stage_counts[c], None, NOW) for c, _ in loaded]
    assert max(len(p or "") for p in result.tables["call_stages"]["system_prompt"].to_pylist()) > 50_000
    with DeltaWarehouse(out) as w:
        w.commit_calls(result.tables, outcomes, "run-1")
    adds = [json.loads(line)["add"] for log in (out / "call_stages" / "_delta_log").glob("*.json")
            for line in log.read_text().splitlines() if '"add"' in line]
    assert adds and max(len(a["stats"]) for a in adds) < 4_000  # a full prompt as min/max would be 100 KB+
    files = [pq.ParquetFile(f).metadata.row_group(0) for f in (out / "call_stages").rglob("*.parquet")]
    column = schema.CALL_STAGES.column_names.index("system_prompt")
    stats = [rg.column(column).statistics for rg in files]
    assert all(s is None or not s.has_min_max or len(s.max) <= 64 for s in stats)


def test_replacing_a_batch_reads_only_the_files_it_wrote(out: Path) -> None:
    with DeltaWarehouse(out) as w:
        files = []
        for n in range(3):  # the same dates, other extraction times
            commit(w, IDS[n * 20 : n * 20 + 20], f"run-{n}", when=NOW + timedelta(minutes=n))
            files.append(len(DeltaTable(str(out / "call_stages")).file_uris()))
        commit(w, IDS[:20], "run-again", when=NOW + timedelta(minutes=9))
    stages = DeltaTable(str(out / "call_stages"))
    delete = next(c for c in stages.history(3) if c["operation"] == "MERGE")
    assert delete["operationMetrics"]["num_target_files_scanned"] == files[0] < files[2]
    assert_consistent(out)


# ----------------------------------------------------------------------------- crashes


class SimulatedCrash(RuntimeError):
    pass


def test_crash_between_table_commits_is_healed_by_open(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with DeltaWarehouse(out) as w:
        commit(w, IDS[:30], "run-1")
    before = {name: read(out, name).sort_by([(k, "ascending") for k in schema.TABLES[name].primary_key]) for name in ("call_stages", "stage_voices")}

    def crash(step: str) -> None:
        if step == "committed:stage_inactivity_messages":
            raise SimulatedCrash(step)

    monkeypatch.setattr(delta, "CRASH_HOOK", crash)
    w = DeltaWarehouse(out)
    w.open()
    with pytest.raises(SimulatedCrash):
        commit(w, IDS[10:40], "run-2", drop_last=True)
    with pytest.raises(StagesError):  # half a batch on disk: no more writes on top
        commit(w, IDS[50:55], "run-3")
    w.close()
    monkeypatch.setattr(delta, "CRASH_HOOK", None)
    # A reader before any heal already sees the last committed state.
    con = connect_views(out)
    assert con.sql("SELECT count(*) FROM call_stages").fetchall()[0][0] == before["call_stages"].num_rows
    assert con.sql("SELECT count(DISTINCT run_id) FROM call_stages").fetchall() == [(1,)]
    con.close()
    with DeltaWarehouse(out) as w:
        assert set(w.call_statuses()) == set(IDS[:30])
    for name, rows in before.items():
        now = read(out, name).sort_by([(k, "ascending") for k in schema.TABLES[name].primary_key])
        assert now.equals(rows), name
    assert_consistent(out)
    with DeltaWarehouse(out) as w:  # and the output keeps working
        commit(w, IDS[10:40], "run-4", drop_last=True)
    assert_consistent(out)


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from tests.test_delta import IDS, commit
    from pipeline.load import delta
    from pipeline.load.delta import DeltaWarehouse

    out, round_no = sys.argv[1], int(sys.argv[2])
    steps = ["committed:call_stages", "deleted:stage_inactivity_messages", "committed:stage_voices",
             "deleted:call_stages", "deleted:stage_voices"]
    kill_at = (1 + round_no % 3, steps[round_no % 5])  # (batch, step): batches 1-3 replace known calls
    seen = {"batch": 0}

    def hook(step):
        if seen["batch"] == kill_at[0] and step == kill_at[1]:
            os.kill(os.getpid(), signal.SIGKILL)

    delta.CRASH_HOOK = hook
    with DeltaWarehouse(out) as w:
        for n in range(4):
            seen["batch"] = n
            start = (round_no * 13 + n * 17) % 90
            commit(w, IDS[start:start + 25], f"run-{round_no}-{n}", drop_last=(n + round_no) % 2 == 1)
    os.kill(os.getpid(), signal.SIGKILL)  # never a clean close
    """
)


@pytest.mark.parametrize("rounds", [pytest.param(2, id="2-rounds"), pytest.param(5, id="5-rounds", marks=pytest.mark.slow)])
def test_kill9_loop_then_clean_run(out: Path, rounds: int) -> None:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    for round_no in range(rounds):
        child = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(round_no)], cwd=root, env=env, capture_output=True)
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
        con = connect_views(out)  # readers stay consistent between crashes
        dup = con.sql("SELECT count(*) - count(DISTINCT call_stage_id) FROM call_stages").fetchall()[0][0]
        con.close()
        assert dup == 0
    with DeltaWarehouse(out) as w:
        commit(w, IDS[:90], "run-clean")
    assert_consistent(out)
    assert set(read(out, "call_stages")["call_stage_id"].to_pylist()) >= expected_stage_ids(IDS[:90])


def test_reader_never_sees_a_duplicate_stage(out: Path) -> None:
    with DeltaWarehouse(out) as w:
        commit(w, IDS[:40], "run-0")
    stop = threading.Event()
    problems: list[str] = []
    reads = {"n": 0}

    def reader() -> None:
        while not stop.is_set():
            con = connect_views(out)
            try:
                total, distinct = con.sql("SELECT count(*), count(DISTINCT call_stage_id) FROM call_stages").fetchall()[0]
                mixed = con.sql("SELECT count(*) FROM (SELECT call_id FROM call_stages GROUP BY call_id HAVING count(DISTINCT run_id) > 1)").fetchall()[0][0]
            finally:
                con.close()
            if total != distinct or mixed:
                problems.append(f"{total} rows, {distinct} distinct, {mixed} mixed calls")
            reads["n"] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with DeltaWarehouse(out) as w:
            for n in range(5):
                commit(w, IDS[(n * 7) % 40 : (n * 7) % 40 + 30], f"run-{n + 1}", drop_last=n % 2 == 0)
    finally:
        stop.set()
        thread.join()
    assert reads["n"] > 0
    assert problems == []


# ----------------------------------------------------------------------------- safety


def test_second_writer_is_refused(out: Path) -> None:
    with DeltaWarehouse(out):
        second = DeltaWarehouse(out)
        with pytest.raises(OutputError) as info:
            second.open()
        assert info.value.exit_code == 2
        assert "another run" in str(info.value)


def test_foreign_folder_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError):
        DeltaWarehouse(foreign).open()
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(OutputError):
        connect_views(tmp_path / "nothing-here")


def test_open_marks_dead_running_runs_crashed(out: Path) -> None:
    run = RunRecord("run-dead", NOW, "0.1", {"format": "delta"})
    w = DeltaWarehouse(out)
    w.open()
    w.save_run(run)
    w._lock.release()  # the writer dies without finishing the run
    with DeltaWarehouse(out) as again:
        assert again._last_finished_run()["status"] == "crashed"
    assert read(out, "etl_runs").to_pylist()[0]["status"] == "crashed"


def test_upsert_state_calls_and_deleted_flags(out: Path) -> None:
    calls = pa.Table.from_pylist(
        [
            {"call_id": c, "created": NOW, "raw": json.dumps({"callId": c}), "run_id": "r", "extracted_at": NOW}
            for c in IDS[:5]
        ],
        schema=schema.CALLS.arrow_schema,
    )
    state = pa.Table.from_pylist([{"key": "watermark", "value": "a'b", "updated_at": NOW}], schema=schema.ETL_STATE.arrow_schema)
    with DeltaWarehouse(out) as w:
        w.upsert(schema.CALLS, calls)
        w.upsert(schema.CALLS, calls)
        w.upsert(schema.ETL_STATE, state)
        w.flag_deleted({IDS[0]: NOW + timedelta(days=1)})
        w.flag_deleted({IDS[0]: NOW + timedelta(days=9)})  # already flagged: kept
        assert w.read_state("watermark") == "a'b"
        assert w.read_state("missing") is None
    rows = {r["call_id"]: r for r in read(out, "calls").to_pylist()}
    assert len(rows) == 5
    assert rows[IDS[0]]["deleted_at"] == NOW + timedelta(days=1)
    assert rows[IDS[1]]["deleted_at"] is None


# ----------------------------------------------------------------------------- readers and maintenance


def test_connect_views_types_like_duckdb_output(out: Path) -> None:
    with DeltaWarehouse(out) as w:
        w.save_run(RunRecord("run-v", NOW, "0.1", {}))
        commit(w, IDS[:10], "run-v")
    con = connect_views(out)
    types = dict(con.sql("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'call_stages'").fetchall())
    assert types["call_stage_id"] == "UUID" and types["experimental_settings"] == "JSON"
    assert PARTITION_COLUMN not in types
    assert con.sql("SELECT count(*) FROM etl_calls WHERE status = 'loaded'").fetchall() == [(10,)]
    assert con.sql("SELECT count(*) FROM calls").fetchall() == [(0,)]
    con.close()


def file_count(root: Path, name: str) -> int:
    return len(DeltaTable(str(root / name)).file_uris())


def test_maintain_compacts_vacuums_and_keeps_rows(out: Path) -> None:
    with DeltaWarehouse(out) as w:
        for n in range(3):
            commit(w, IDS[n * 10 : n * 10 + 20], f"run-{n}")
    rows_before = {t.name: read(out, t.name).num_rows for t in schema.TABLES.values()}
    files_before = file_count(out, "call_stages")
    on_disk_before = len(list((out / "call_stages").rglob("*.parquet")))
    figures = maintain(out, retention_hours=0)
    assert figures["call_stages"]["files_before"] == files_before
    assert file_count(out, "call_stages") < files_before
    assert figures["call_stages"]["files_after"] == file_count(out, "call_stages")
    assert figures["call_stages"]["files_vacuumed"] > 0
    assert len(list((out / "call_stages").rglob("*.parquet"))) < on_disk_before
    assert {t.name: read(out, t.name).num_rows for t in schema.TABLES.values()} == rows_before
    assert list((out / "etl_calls" / "_delta_log").glob("*.checkpoint.parquet"))
    assert_consistent(out)
    with DeltaWarehouse(out) as w:  # heal after maintenance finds nothing to undo
        commit(w, IDS[:5], "run-after")
    assert_consistent(out)


def test_maintain_refused_while_a_writer_holds_the_lock(out: Path) -> None:
    with DeltaWarehouse(out):
        with pytest.raises(OutputError):
            maintain(out)


def test_commit_is_retried_after_a_concurrent_commit(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltalake.exceptions import CommitFailedError

    real = delta.write_deltalake
    failures = {"left": 2}

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        if failures["left"]:
            failures["left"] -= 1
            raise CommitFailedError("Transaction failed: version already exists")
        return real(*args, **kwargs)

    with DeltaWarehouse(out) as w:
        monkeypatch.setattr(delta, "write_deltalake", flaky)
        commit(w, IDS[:10], "run-1")
        commit(w, IDS[:10], "run-2")
    assert failures["left"] == 0
    assert_consistent(out)
    assert read(out, "etl_calls").num_rows == 10


def test_overlapping_batches_commit_in_order(out: Path) -> None:
    with DeltaWarehouse(out) as w:
        for n in range(4):
            commit(w, IDS[n * 5 : n * 5 + 20], f"run-{n}")
    assert_consistent(out)
    assert read(out, "etl_calls").num_rows == 35


def test_maintain_refuses_a_missing_output(tmp_path: Path) -> None:
    with pytest.raises(OutputError):
        maintain(tmp_path / "never-written")
    assert not (tmp_path / "never-written").exists()


def test_filters_in_sql_over_merged_files(out: Path) -> None:
    """Files rewritten by deltalake's MERGE carry string_view: filters pushed down
    into the Arrow scan must still work on every string column."""
    with DeltaWarehouse(out) as w:
        commit(w, IDS[:20], "run-1")
        commit(w, IDS[:20], "run-2", status={IDS[0]: "failed"})
        commit(w, IDS[5:25], "run-3")
    con = connect_views(out)
    assert con.sql("SELECT count(*) FROM etl_calls WHERE status = 'failed'").fetchall() == [(1,)]
    assert con.execute("SELECT count(*) FROM etl_calls WHERE call_id = ?", [IDS[1]]).fetchall() == [(1,)]
    assert con.sql("SELECT count(*) FROM call_stages WHERE run_id IN ('run-3') AND model IS NOT NULL").fetchall()[0][0] > 0
    assert con.sql("SELECT count(*) FROM stage_voices WHERE role = 'no-such-role'").fetchall() == [(0,)]
    con.close()

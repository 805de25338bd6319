"""Warehouse hardening: memory, stage ownership, crashed runs, real write failures,
unusable outputs, DuckDB 1.x readability. Run as a script to measure peak RSS:

    python tests/test_warehouse_hardening.py duckdb OUT.duckdb 1500
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import schema  # noqa: E402
from pipeline.errors import OutputError, WarehouseError  # noqa: E402
from pipeline.load import open_warehouse, query_connection  # noqa: E402
from pipeline.records import CallOutcome, RunRecord, utcnow  # noqa: E402
from pipeline.transform import transform_calls  # noqa: E402

FORMATS = ("duckdb", "parquet")
ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- fabrication

_WORDS = [f"{w}{n}" for w in ("agent", "caller", "order", "refund", "please", "policy", "ticket", "voice") for n in range(50)]
_POOL = " ".join(random.Random(3).choices(_WORDS, k=200_000))


def prose(size: int, salt: int) -> str:
    """Word-like text of ``size`` characters (compresses like a prompt, not like 'xxx')."""
    pieces, total = [], 0
    while total < size:
        start = (salt * 7919) % (len(_POOL) // 2)
        piece = _POOL[start : start + min(size - total, len(_POOL) - start)]
        pieces.append(piece)
        total += len(piece)
        salt += 1
    return "".join(pieces)


def call_id(n: int) -> str:
    return str(uuid.UUID(int=(0xCA11 << 96) | n))


def stage_id(n: int) -> str:
    return str(uuid.UUID(int=(0x57A6 << 96) | n))


def stage(cid: str, sid: str, n: int, prompt: str | None = None) -> dict:
    return {
        "callId": cid, "callStageId": sid, "created": f"2026-11-{1 + n % 28:02d}T10:00:00Z",
        "errorCount": 0, "experimentalSettings": None, "initialState": {}, "initialTokenCount": n,
        "latestTokenCount": n + 5, "temperature": 0.4, "model": "fixie-ai/ultravox",
        "systemPrompt": prompt if prompt is not None else f"You are agent {n}.",
    }


def big_calls(n_calls: int, huge_bytes: int = 60_000_000) -> Iterator[tuple[str, list[dict]]]:
    """A quarter of the stages carry a 100 KB prompt, a few calls a 1 MB one, call 0 a huge one."""
    for c in range(n_calls):
        cid = call_id(c)
        stages = []
        for i in range(1 + c % 4):
            n = c * 8 + i
            prompt = prose(100_000, n) if n % 4 == 0 else None
            stages.append(stage(cid, stage_id(n), n, prompt))
        if c % 500 == 7:
            stages[0]["systemPrompt"] = prose(1_000_000, c)
        if c == 0 and huge_bytes:
            stages[0]["systemPrompt"] = prose(huge_bytes, c)
        yield cid, stages


def batches(calls: Iterator[tuple[str, list[dict]]], batch_bytes: int = 32 << 20) -> Iterator[list]:
    """Batches bounded by bytes, as the runner builds them (a bigger call is alone)."""
    batch, size = [], 0
    for cid, stages in calls:
        nbytes = sum(len(s["systemPrompt"]) + 400 for s in stages)
        if batch and size + nbytes > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append((cid, stages))
        size += nbytes
    if batch:
        yield batch


def commit(wh, calls: list[tuple[str, list[dict]]], statuses: dict[str, str] | None = None, run_id: str = "run-1"):
    """Transform and commit ``calls`` (status loaded unless given) → committed outcomes."""
    wanted = {c: (statuses or {}).get(c, "loaded") for c, _ in calls}
    result = transform_calls([(c, s) for c, s in calls if wanted[c] == "loaded"], run_id, utcnow())
    outcomes = []
    for c, _ in calls:
        if c in result.failures:
            outcomes.append(CallOutcome(c, "failed", None, result.failures[c], utcnow()))
        else:
            outcomes.append(CallOutcome(c, wanted[c], result.stage_counts.get(c, 0), None, utcnow()))
    return wh.commit_calls(result.tables, outcomes, run_id)


def export_big(fmt: str, out: Path, n_calls: int, memory_limit: str = "96MB") -> None:
    with open_warehouse(fmt, out, memory_limit=memory_limit) as wh:
        for batch in batches(big_calls(n_calls)):
            assert {o.status for o in commit(wh, batch)} == {"loaded"}


def peak_rss_mb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) // 1024 for line in fh if line.startswith("VmHWM"))


def output(tmp_path: Path, fmt: str, name: str = "out") -> Path:
    return tmp_path / (f"{name}.duckdb" if fmt == "duckdb" else name)


def rows(fmt: str, path: Path, sql: str) -> list[tuple]:
    con = query_connection(fmt, path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# ----------------------------------------------------------------------------- 1. memory


@pytest.mark.parametrize("fmt", FORMATS)
def test_batches_with_huge_prompts_commit_under_a_small_memory_limit(tmp_path: Path, fmt: str) -> None:
    out = output(tmp_path, fmt)
    proc = subprocess.run(
        [sys.executable, __file__, fmt, str(out), "300"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    total = sum(1 + c % 4 for c in range(300))
    assert rows(fmt, out, "SELECT count(*), count(DISTINCT call_stage_id), max(length(system_prompt)) FROM call_stages") == [
        (total, total, 60_000_000)
    ]
    if fmt == "duckdb":
        assert not (tmp_path / "out.duckdb.tmp").exists()  # the spill folder goes at close


@pytest.mark.parametrize("release_to", [None, 1000])
def test_duckdb_gets_its_memory_limit_back_after_each_commit(tmp_path: Path, monkeypatch, release_to: int | None) -> None:
    """After a commit the limit is lowered for a moment (DuckDB then releases what it freed)
    and set back; when DuckDB cannot get under the low value (1000 bytes here) the lowering is
    refused and nothing else changes."""
    import pipeline.load.duckdb as duckdb_output

    if release_to is not None:
        monkeypatch.setattr(duckdb_output, "RELEASE_TO_BYTES", release_to)
    with open_warehouse("duckdb", tmp_path / "w.duckdb", memory_limit="200MB") as wh:
        limit = wh.con.execute("SELECT current_setting('memory_limit')").fetchall()
        for batch in batches(big_calls(24, huge_bytes=2_000_000), batch_bytes=1 << 20):
            commit(wh, batch)
            assert wh.con.execute("SELECT current_setting('memory_limit')").fetchall() == limit
    assert rows("duckdb", tmp_path / "w.duckdb", "SELECT count(*), max(length(system_prompt)) FROM call_stages") == [
        (sum(1 + c % 4 for c in range(24)), 2_000_000)
    ]


def test_long_strings_make_the_warehouse_checkpoint_per_row_group_instead_of_duckdb(tmp_path: Path) -> None:
    """DuckDB checkpoints on its own when its WAL passes a threshold, writing the filling row
    group again each time: with long strings in it, the peak grew with the group. While long
    strings are pending its threshold is raised and the warehouse checkpoints once a row
    group's worth of stages came in, then hands checkpointing back."""
    from pipeline.load.duckdb import PINNED_STRING_BYTES, ROW_GROUP_SIZE

    def setting(wh) -> str:
        return wh.con.execute("SELECT current_setting('checkpoint_threshold')").fetchall()[0][0]

    def wal(wh) -> str:
        return wh.con.execute("SELECT wal_size FROM pragma_database_size() WHERE database_name = 'warehouse'").fetchall()[0][0]

    plain = [(call_id(c), [stage(call_id(c), stage_id(c * 8 + i), c * 8 + i) for i in range(8)]) for c in range(1, 300)]
    with open_warehouse("duckdb", tmp_path / "w.duckdb") as wh:
        default = setting(wh)
        commit(wh, plain[:10])
        assert setting(wh) == default
        commit(wh, [(call_id(0), [stage(call_id(0), stage_id(0), 0, prose(PINNED_STRING_BYTES + 1, 0))])])
        assert setting(wh) != default and wal(wh) != "0 bytes"  # held off: the WAL keeps the long string
        done = 1
        for start in range(10, len(plain), 10):
            commit(wh, plain[start : start + 10])
            done += 80
            if done < ROW_GROUP_SIZE:
                assert setting(wh) != default
            else:
                break
        assert setting(wh) == default and wal(wh) == "0 bytes"  # checkpointed, DuckDB's own threshold back
    assert rows("duckdb", tmp_path / "w.duckdb", "SELECT count(*), max(length(system_prompt)) FROM call_stages") == [
        (done + 80, PINNED_STRING_BYTES + 1)
    ]


# ----------------------------------------------------------------------------- 2. stage ownership


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_stage_stays_with_the_call_that_stored_it(tmp_path: Path, fmt: str) -> None:
    out = output(tmp_path, fmt)
    a, b, c = call_id(1), call_id(2), call_id(3)
    shared = stage_id(100)
    with open_warehouse(fmt, out) as wh:
        commit(wh, [(a, [stage(a, shared, 1), stage(a, stage_id(101), 2)])])
        # b claims a's stage (a not in the batch); c is innocent and goes through.
        got = commit(wh, [(b, [stage(b, stage_id(200), 3), stage(b, shared, 4)]), (c, [stage(c, stage_id(300), 5)])])
        assert [(o.call_id, o.status) for o in got] == [(b, "failed"), (c, "loaded")]
        assert got[0].error == f"stage {shared} is already owned by call {a}" and got[0].stage_count is None
    owners = dict(rows(fmt, out, "SELECT call_stage_id::VARCHAR, call_id::VARCHAR FROM call_stages"))
    assert owners == {shared: a, stage_id(101): a, stage_id(300): c}
    statuses = dict(rows(fmt, out, "SELECT call_id::VARCHAR, status FROM etl_calls"))
    assert statuses == {a: "loaded", b: "failed", c: "loaded"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_stage_moves_when_its_owner_is_replaced_in_the_same_batch(tmp_path: Path, fmt: str) -> None:
    out = output(tmp_path, fmt)
    a, b = call_id(1), call_id(2)
    shared = stage_id(100)
    with open_warehouse(fmt, out) as wh:
        commit(wh, [(a, [stage(a, shared, 1)])])
        got = commit(wh, [(a, [stage(a, stage_id(101), 2)]), (b, [stage(b, shared, 3)])])
        assert {o.status for o in got} == {"loaded"}
        # b, the owner now, re-fetched next to a failed a: b replaces itself; a keeps its rows.
        got = commit(wh, [(b, [stage(b, shared, 3)]), (a, [])], statuses={a: "failed"}, run_id="run-2")
        assert [o.status for o in got] == ["loaded", "failed"]
    owners = dict(rows(fmt, out, "SELECT call_stage_id::VARCHAR, call_id::VARCHAR FROM call_stages"))
    assert owners == {shared: b, stage_id(101): a}


@pytest.mark.parametrize("fmt", FORMATS)
def test_primary_keys_hold_after_conflicting_runs(tmp_path: Path, fmt: str) -> None:
    out = output(tmp_path, fmt)
    calls = [(call_id(c), [stage(call_id(c), stage_id(c % 5), c)]) for c in range(20)]  # 4 calls per stage id
    for run in range(3):
        with open_warehouse(fmt, out) as wh:
            for start in range(0, 20, 7):
                commit(wh, calls[start : start + 7], run_id=f"run-{run}")
    for table in schema.DATA_TABLES:
        keys = ", ".join(f"{k}::VARCHAR" for k in table.primary_key)
        dupes = rows(fmt, out, f"SELECT {keys}, count(*) FROM {table.name} GROUP BY ALL HAVING count(*) > 1")
        assert dupes == [], table.name
    assert rows(fmt, out, "SELECT count(*) FROM call_stages") == [(5,)]
    assert rows(fmt, out, "SELECT count(*) FROM etl_calls WHERE status = 'failed'") == [(15,)]


def test_a_duckdb_warehouse_created_with_primary_keys_on_the_data_tables_keeps_working(tmp_path: Path) -> None:
    """Files made before the data tables lost their keys: replacing calls (delete + insert
    of the same keys in one transaction) and conflicting stage ids still work."""
    import duckdb

    from pipeline.load.duckdb import STORAGE_VERSION

    out = tmp_path / "old.duckdb"
    con = duckdb.connect()
    con.execute(f"ATTACH '{out}' AS old (STORAGE_VERSION '{STORAGE_VERSION}')")
    for table in schema.TABLES.values():
        cols = ", ".join(f"{c.name} {c.sql_type}{'' if c.nullable else ' NOT NULL'}" for c in table.columns)
        con.execute(f"CREATE TABLE old.{table.name} ({cols}, PRIMARY KEY ({', '.join(table.primary_key)}))")
    con.close()
    calls = [(call_id(c), [stage(call_id(c), stage_id(c % 5), c), stage(call_id(c), stage_id(100 + c), c)]) for c in range(20)]
    for run in range(2):
        with open_warehouse("duckdb", out) as wh:
            for start in range(0, 20, 7):
                commit(wh, calls[start : start + 7], run_id=f"run-{run}")
    assert rows("duckdb", out, "SELECT count(*), count(DISTINCT call_stage_id) FROM call_stages") == [(10, 10)]  # 5 calls keep their 2 stages
    assert rows("duckdb", out, "SELECT count(*) FROM etl_calls WHERE status = 'failed'") == [(15,)]
    indexes = duckdb.connect(str(out), read_only=True).execute(
        "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'call_stages' AND constraint_type = 'PRIMARY KEY'")
    assert indexes.fetchall() == [(1,)]


# ----------------------------------------------------------------------------- 3. crashed runs


@pytest.mark.parametrize("fmt", FORMATS)
def test_open_marks_runs_left_running_as_crashed(tmp_path: Path, fmt: str) -> None:
    out = output(tmp_path, fmt)
    with open_warehouse(fmt, out) as wh:
        wh.save_run(RunRecord("run-dead", utcnow(), "0.1.0", {}))  # never finished: its process "died"
    with open_warehouse(fmt, out) as wh:
        pass
    assert rows(fmt, out, "SELECT run_id, status, finished_at FROM etl_runs") == [("run-dead", "crashed", None)]


# ----------------------------------------------------------------------------- 4. real causes


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root and mount rights): {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_disk_full_names_the_real_cause(tiny_disk: Path, fmt: str) -> None:
    out = output(tiny_disk, fmt)
    calls = [(call_id(c), [stage(call_id(c), stage_id(c), c, prose(50_000, c * 31))]) for c in range(200)]
    wh = open_warehouse(fmt, out)
    wh.open()
    with pytest.raises(WarehouseError) as err:
        try:
            for start in range(0, 200, 20):
                commit(wh, calls[start : start + 20])
            wh.save_run(RunRecord("run-1", utcnow(), "0.1.0", {}))
        finally:
            wh.close()
    message = str(err.value)
    assert "No space left on device" in message and "\n" not in message, message
    assert err.value.exit_code == 4
    with pytest.raises(WarehouseError, match="No space left on device"):
        wh.save_run(RunRecord("run-1", utcnow(), "0.1.0", {}))  # later writes repeat the first cause


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    source, view = tmp_path / "src", tmp_path / "ro"
    source.mkdir()
    view.mkdir()
    bind = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only (needs root and mount rights): {bind.stderr.strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_only_location_is_refused_at_open(read_only_dir: Path, fmt: str) -> None:
    with pytest.raises(OutputError, match="read-only file system") as err:
        open_warehouse(fmt, output(read_only_dir, fmt, "sub/out")).open()
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_existing_output_on_a_read_only_mount_is_refused_but_readable(tmp_path: Path, read_only_dir: Path, fmt: str) -> None:
    source = tmp_path / "src"
    with open_warehouse(fmt, output(source, fmt)) as wh:
        commit(wh, [(call_id(1), [stage(call_id(1), stage_id(1), 1)])])
        wh.save_run(RunRecord("run-1", utcnow(), "0.1.0", {}, status="succeeded", finished_at=utcnow()))
    with pytest.raises(OutputError, match="read-only file system"):
        open_warehouse(fmt, output(read_only_dir, fmt)).open()
    assert rows(fmt, output(read_only_dir, fmt), "SELECT count(*) FROM call_stages") == [(1,)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_under_a_file_is_refused_at_open(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(OutputError, match="is a file, not a folder") as err:
        open_warehouse(fmt, output(tmp_path / "plain" / "deeper", fmt)).open()
    assert err.value.exit_code == 2


def test_duckdb_output_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.duckdb").mkdir()
    with pytest.raises(OutputError, match="is a folder, not a DuckDB file"):
        open_warehouse("duckdb", tmp_path / "x.duckdb").open()


@pytest.mark.parametrize("fmt", FORMATS)
def test_object_storage_needs_delta(fmt: str) -> None:
    with pytest.raises(OutputError, match="needs a local disk; use --format delta for object storage") as err:
        open_warehouse(fmt, "s3://bucket/stages")
    assert err.value.exit_code == 2


# ----------------------------------------------------------------------------- 6. DuckDB 1.x readers


def test_duckdb_file_opens_in_the_duckdb_1x_cli(tmp_path: Path) -> None:
    binary = Path(sys.executable).parent / "duckdb"
    found = str(binary) if binary.exists() else shutil.which("duckdb")
    if found is None:
        pytest.skip("no duckdb CLI binary (pip install duckdb-cli)")
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    out = tmp_path / "out.duckdb"
    with open_warehouse("duckdb", out) as wh:
        commit(wh, [(call_id(c), [stage(call_id(c), stage_id(c), c)]) for c in range(3)])
    proc = subprocess.run(
        [found, "-readonly", "-csv", str(out), "-c", "SELECT count(*) FROM call_stages"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["count_star()", "3"], (version, proc.stderr)


# ----------------------------------------------------------------------------- measurement


if __name__ == "__main__":
    fmt_arg, out_arg, n_arg = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    export_big(fmt_arg, out_arg, n_arg)
    print(f"{fmt_arg}: {n_arg} calls committed, peak RSS {peak_rss_mb()} MB", flush=True)
    os._exit(0)

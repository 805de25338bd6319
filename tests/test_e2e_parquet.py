"""End to end with --format parquet: read back with DuckDB and pyarrow, compare with DuckDB output."""

from __future__ import annotations

import duckdb
import pyarrow.dataset as ds
import pytest

from conftest import expected_for, write_ids
from test_e2e_faults import _kill_loop

KEYS = {
    "call_stages": ["call_stage_id"],
    "stage_inactivity_messages": ["call_stage_id", "position"],
    "stage_voices": ["call_stage_id", "role"],
}


def parquet_figures(folder):
    con = duckdb.connect()
    def scan(table):
        return f"read_parquet('{folder}/{table}/**/*.parquet', hive_partitioning=true)"
    out = {}
    for table, key in KEYS.items():
        total, distinct = con.execute(f"SELECT count(*), count(DISTINCT ({', '.join(key)})) FROM {scan(table)}").fetchall()[0]
        assert total == distinct, f"duplicate keys in {table}"
        out[table] = total
    out["latest_tokens"], out["errors"] = con.execute(
        f"SELECT coalesce(sum(latest_token_count), 0), coalesce(sum(error_count), 0) FROM {scan('call_stages')}"
    ).fetchall()[0]
    return out


def assert_parquet_matches(folder, expected):
    figures = parquet_figures(folder)
    assert figures["call_stages"] == expected.stages
    assert figures["stage_inactivity_messages"] == expected.messages
    assert figures["stage_voices"] == expected.voices
    assert (figures["latest_tokens"], figures["errors"]) == (expected.latest_tokens, expected.errors)


def test_parquet_export_exact_idempotent_and_equal_to_duckdb(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=300, seed=13)
    ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids + box.data.deleted_call_ids))
    folder, db = tmp_path / "lake", tmp_path / "w.duckdb"
    common = ["--calls-file", ids, "--base-url", box.base_url, "--page-size", "4"]
    assert cli("run", *common, "--format", "parquet", "--output", str(folder)).code == 0
    expected = expected_for(box.data, box.data.call_ids)
    assert_parquet_matches(folder, expected)

    # pyarrow reads it with no help, and a date filter prunes to one partition folder.
    dataset = ds.dataset(folder / "call_stages", format="parquet", partitioning="hive")
    assert dataset.count_rows() == expected.stages
    dates = sorted({p.name for p in (folder / "call_stages").iterdir()})
    assert len(dates) > 3 and all(d.startswith("created_date=") for d in dates)
    one_day = dates[1].split("=")[1]
    pruned = list(dataset.get_fragments(filter=ds.field("created_date") == one_day))
    in_folder = list((folder / "call_stages" / f"created_date={one_day}").glob("*.parquet"))
    assert pruned and len(pruned) == len(in_folder)  # only that day's files are touched

    # A refresh rerun replaces rows, never duplicates them; only changed files move.
    files_before = sorted(p for p in folder.rglob("*.parquet"))
    assert cli("run", *common, "--format", "parquet", "--output", str(folder), "--refresh").code == 0
    assert_parquet_matches(folder, expected)
    assert len(list(folder.rglob("*.parquet"))) <= len(files_before) + 8

    # The same input into DuckDB holds identical rows, table by table.
    assert cli("run", *common, "--output", str(db)).code == 0
    from pipeline.load import query_connection

    lake = query_connection("parquet", folder)
    with duckdb.connect(str(db), read_only=True) as warehouse:
        for table, key in KEYS.items():
            order = ", ".join(key)
            query = f"SELECT * EXCLUDE (run_id, extracted_at) FROM {table} ORDER BY {order}" if table == "call_stages" \
                else f"SELECT * FROM {table} ORDER BY {order}"
            assert warehouse.execute(query).fetchall() == lake.execute(query).fetchall(), table
        q = "SELECT call_id, status, stage_count, attempts FROM etl_calls ORDER BY call_id"
        parquet_calls = lake.execute(q).fetchall()
        assert [r[:3] for r in warehouse.execute(q).fetchall()] == [r[:3] for r in parquet_calls]

    # No third-party TTS credential reaches any file of the dataset.
    from test_e2e_run import _generic_header_values

    secrets = _generic_header_values(box.data)
    assert secrets
    for path in folder.rglob("*"):  # file bytes (metadata, the index, the marker) ...
        if path.is_file():
            data = path.read_bytes()
            assert not [x for x in secrets if x.encode() in data], path
    decoded = duckdb.connect()  # ... and the decompressed contents of every table
    for table in ("call_stages", "stage_inactivity_messages", "stage_voices", "etl_calls", "etl_runs"):
        text = decoded.execute(
            f"SELECT string_agg(t::VARCHAR, '|') FROM read_parquet('{folder}/{table}/**/*.parquet') t"
        ).fetchall()[0][0]
        assert text and not [x for x in secrets if x in text], table

    # Status and reports work on the folder too.
    assert cli("status", "--output", str(folder), key=None).code == 0
    report = cli("report", "token_usage_by_model_day", "--output", str(folder), "--format", "csv", key=None)
    assert report.code == 0 and report.stdout.startswith("day,model")


def test_parquet_output_refuses_a_foreign_folder(tmp_path, cli):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8meow")
    res = cli("run", "--call-id", "00000000-0000-4000-8000-000000000001", "--format", "parquet",
              "--output", str(folder), "--base-url", "http://127.0.0.1:9")
    assert res.code == 2, res.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]


def test_kill_9_then_rerun_is_exact_parquet(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=150, seed=6, latency_ms=5)
    folder = _kill_loop(tmp_path, box, "parquet", kills=4, seed=3)
    assert_parquet_matches(folder, expected_for(box.data, box.data.call_ids))
    assert not [p for p in (folder / "call_stages").rglob("*") if p.is_file() and not p.name.endswith(".parquet")]


@pytest.mark.slow
def test_kill_9_many_times_parquet(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=300, seed=7, latency_ms=5, fault_rate=0.05, retry_after="0")
    folder = _kill_loop(tmp_path, box, "parquet", kills=25, seed=4)
    assert_parquet_matches(folder, expected_for(box.data, box.data.call_ids))

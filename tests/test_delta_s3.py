"""Delta Lake warehouse on S3: a moto server on 127.0.0.1 (no other address).

moto runs in a child process: some deltalake calls (history, restore) hold the GIL
while they wait for the store, which deadlocks a server thread in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from deltalake import DeltaTable

from pipeline.errors import OutputError, StagesError, WarehouseError
from pipeline.load import delta
from pipeline.load.delta import LOCK, MARKER, DeltaWarehouse, connect_views, maintain, storage_options
from pipeline.records import RunRecord
from test_delta import IDS, commit

SECRET = "s3cr3t-Key-that-must-never-be-written"
BUCKET = "warehouse-bucket"


_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request slows the server down
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test closes stdin
server.stop()
"""


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    child = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        yield int(child.stdout.readline())
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)


@pytest.fixture
def s3(moto_port: int, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[object]:
    host, port = "127.0.0.1", moto_port
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_S3_ALLOW_UNSAFE_RENAME", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing-access-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:  # one server for the module: empty the bucket for the next test
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            if page.get("Contents"):
                keys = [{"Key": item["Key"]} for item in page["Contents"]]
                client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=BUCKET)


URI = f"s3://{BUCKET}/exports/stages"
ROOT = Path(__file__).resolve().parents[1]


def s3_table(name: str) -> DeltaTable:
    return DeltaTable(f"{URI}/{name}", storage_options=storage_options(URI))


def test_commits_and_sql_over_s3(s3: object) -> None:
    with DeltaWarehouse(URI) as w:
        commit(w, IDS[:30], "run-1")
        commit(w, IDS[10:40], "run-2", drop_last=True)
        assert set(w.call_statuses()) == set(IDS[:40])
    con = connect_views(URI)
    total, distinct = con.sql("SELECT count(*), count(DISTINCT call_stage_id) FROM call_stages").fetchall()[0]
    assert total == distinct > 0
    assert con.sql("SELECT count(*), sum(attempts) FROM etl_calls").fetchall() == [(40, 60)]
    runs = con.execute("SELECT DISTINCT run_id FROM call_stages WHERE call_id::VARCHAR IN (SELECT unnest(?))", [IDS[10:40]])
    assert runs.fetchall() == [("run-2",)]
    con.close()
    assert s3_table("call_stages").metadata().partition_columns == ["created_date"]


def test_pathlib_collapsed_uri_is_accepted(s3: object) -> None:
    from pathlib import Path

    with DeltaWarehouse(Path(URI)) as w:
        commit(w, IDS[:3], "run-1")
    assert s3_table("etl_calls").to_pyarrow_table().num_rows == 3


def test_second_writer_refused_on_s3(s3: object) -> None:
    with DeltaWarehouse(URI):
        with pytest.raises(OutputError) as info:
            DeltaWarehouse(URI).open()
        assert info.value.exit_code == 2 and "pid" in str(info.value)
    with DeltaWarehouse(URI):  # released on close
        pass


_LIVE_WRITER = """
import sys, time
from datetime import UTC, datetime
from pipeline.load.delta import DeltaWarehouse
from pipeline.records import RunRecord
w = DeltaWarehouse(sys.argv[1])
w.open()
run = RunRecord("run-live", datetime.now(UTC), "0.1", {}, calls_requested=40, calls_loaded=12, calls_failed=1,
                stages_loaded=30)
w.save_run(run)
w.publish(run)
print("ready", flush=True)
time.sleep(600)
"""


def test_status_shows_the_live_s3_writer_and_settles_it_once_its_lock_expires(s3, cli, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with DeltaWarehouse(URI) as w:  # a finished run before the one in progress
        commit(w, IDS[:5], "run-1")
        finished = datetime(2026, 11, 30, 0, 1, tzinfo=UTC)
        w.save_run(RunRecord("run-1", finished, "0.1", {}, finished_at=finished, status="succeeded"))
    env = {name: os.environ[name] for name in os.environ if name.startswith("AWS_")}
    writer = subprocess.Popen([sys.executable, "-c", _LIVE_WRITER, URI], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        live = cli("status", "--output", URI, "--format", "json", env_extra=env)
        doc = json.loads(live.stdout)
        assert live.code == 0 and doc["healthy"], live.stdout + live.stderr
        assert doc["writing_now"]["pid"] == writer.pid
        published = {"run_id": "run-live", "calls_requested": 40, "calls_loaded": 12, "calls_failed": 1, "stages_loaded": 30}
        assert doc["writing_now"]["run"].items() >= published.items()
        assert {r["run_id"]: r["status"] for r in doc["last_runs"]} == {"run-1": "succeeded", "run-live": "running"}
        text = cli("status", "--output", URI, env_extra=env).stdout
        assert f"Run run-live is writing now (pid {writer.pid}" in text and "13/40 calls done" in text, text
        with pytest.raises(OutputError) as refused:  # a second writer still sees the lock
            DeltaWarehouse(URI).open()
        assert f"pid {writer.pid}" in str(refused.value)
    finally:
        writer.kill()  # kill -9: the lock object stays, no longer refreshed
        writer.wait()
    monkeypatch.setattr(delta, "LOCK_TTL_SECONDS", 0.5)
    time.sleep(1.1)  # the store stamps objects to the second: the lock is now a second old
    dead = cli("status", "--output", URI, "--format", "json", env_extra=env)
    doc = json.loads(dead.stdout)
    assert doc["writing_now"] is None and {r["run_id"]: r["status"] for r in doc["last_runs"]}["run-live"] == "crashed"
    con = connect_views(URI)  # recorded: status took the dead writer's lock over for a moment
    try:
        assert con.sql("SELECT status FROM etl_runs WHERE run_id = 'run-live'").fetchall() == [("crashed",)]
    finally:
        con.close()
    assert delta.read_s3_lock(URI) == (False, {})  # and released it


def test_writer_whose_lock_was_taken_over_stops(s3) -> None:  # type: ignore[no-untyped-def]
    w = DeltaWarehouse(URI)
    w.open()
    try:
        s3.put_object(Bucket=BUCKET, Key=f"exports/stages/{LOCK}", Body=b'{"pid": 1, "host": "other"}')
        w.publish(None)  # the refresh finds another writer's lock
        with pytest.raises(WarehouseError):
            commit(w, IDS[:5], "run-1")
    finally:
        w.close()
    assert s3.get_object(Bucket=BUCKET, Key=f"exports/stages/{LOCK}")["Body"].read() == b'{"pid": 1, "host": "other"}'


def test_crash_mid_batch_healed_on_s3(s3, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    with DeltaWarehouse(URI) as w:
        commit(w, IDS[:20], "run-1")
    rows_before = s3_table("call_stages").to_pyarrow_table().num_rows

    def crash(step: str) -> None:
        if step == "committed:call_stages":
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(delta, "CRASH_HOOK", crash)
    w = DeltaWarehouse(URI)
    w.open()
    with pytest.raises(RuntimeError):
        commit(w, IDS[:20], "run-2", drop_last=True)
    w.close()
    monkeypatch.setattr(delta, "CRASH_HOOK", None)
    with DeltaWarehouse(URI):
        pass
    stages = s3_table("call_stages").to_pyarrow_table()
    assert stages.num_rows == rows_before and set(stages["run_id"].to_pylist()) == {"run-1"}


def test_maintain_on_s3(s3: object) -> None:
    with DeltaWarehouse(URI) as w:
        for n in range(2):
            commit(w, IDS[n * 10 : n * 10 + 15], f"run-{n}")
    stages = s3_table("call_stages")
    before, rows = len(stages.file_uris()), stages.to_pyarrow_table().num_rows
    figures = maintain(URI, retention_hours=0)
    stages.update_incremental()
    assert figures["call_stages"]["files_after"] == len(stages.file_uris()) < before
    assert figures["call_stages"]["files_vacuumed"] > 0 and stages.to_pyarrow_table().num_rows == rows


def test_credentials_never_written_and_no_unsafe_rename(s3) -> None:  # type: ignore[no-untyped-def]
    import os

    assert "AWS_S3_ALLOW_UNSAFE_RENAME" not in (storage_options(URI) or {})
    with DeltaWarehouse(URI) as w:
        commit(w, IDS[:10], "run-1")
    assert "AWS_S3_ALLOW_UNSAFE_RENAME" not in os.environ
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert f"exports/stages/{MARKER}" in keys
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert SECRET.encode() not in body, key
        assert b"testing-access-key" not in body, key


def test_foreign_prefix_refused(s3) -> None:  # type: ignore[no-untyped-def]
    s3.put_object(Bucket=BUCKET, Key="exports/stages/someone-elses.csv", Body=b"a,b\n")
    with pytest.raises(OutputError):
        DeltaWarehouse(URI).open()
    with pytest.raises(StagesError):
        connect_views(URI)


def test_waiting_for_the_s3_lock_gives_up_after_wait_seconds(s3: object) -> None:
    with DeltaWarehouse(URI):
        with pytest.raises(OutputError) as info:
            DeltaWarehouse(URI, wait_for_lock=True, wait_seconds=0.5).open()
        assert "after waiting 0.5 s" in str(info.value)


def test_the_cli_exports_to_s3_exactly_and_status_report_tables_query_read_it(s3, start_sandbox, cli, tmp_path):
    from conftest import expected_for, write_ids

    box = start_sandbox(n_calls=24, seed=4, fault_rate=0.15)
    ids = write_ids(tmp_path / "ids.txt", box.data.call_ids)
    cfg = tmp_path / "fast.toml"
    cfg.write_text("backoff_initial_seconds = 0.005\nbackoff_max_seconds = 0.01\nretry_after_max_seconds = 0.01\n")
    env = {name: os.environ[name] for name in os.environ if name.startswith("AWS_")}
    for _ in range(2):  # the rerun replaces nothing it should not: exact both times
        res = cli("run", "--calls-file", str(ids), "--base-url", box.base_url, "--output", URI, "--refresh",
                  "--config", str(cfg), env_extra=env)
        assert res.code == 0, res.stderr
        con = connect_views(URI)
        try:
            stages, unique = con.execute("SELECT count(*), count(DISTINCT call_stage_id) FROM call_stages").fetchall()[0]
            options = con.execute("SELECT string_agg(options::VARCHAR, '') FROM etl_runs").fetchall()[0][0]
        finally:
            con.close()
        assert stages == unique == expected_for(box.data, box.data.call_ids).stages
        assert SECRET not in options and "testing-access-key" not in options
    status = cli("status", "--output", URI, env_extra=env)
    assert status.code == 0 and "OK" in status.stdout, status.stdout + status.stderr
    report = cli("report", "stages_per_call", "--output", URI, "--format", "json", env_extra=env)
    assert report.code == 0 and json.loads(report.stdout), report.stderr
    tables = cli("tables", "--output", URI, env_extra=env)
    assert tables.code == 0 and f"call_stages: {stages} rows" in tables.stdout, tables.stdout
    query = cli("query", "SELECT count(*) AS n FROM stage_voices", "--output", URI, "--format", "csv", env_extra=env)
    assert query.code == 0 and query.stdout.splitlines()[0] == "n", query.stdout

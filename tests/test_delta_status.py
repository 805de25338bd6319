"""`status` on a local Delta output while a writer holds it and after it is gone (S3: test_delta_s3)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from pipeline.load.delta import DeltaWarehouse, connect_views, read_writer_lock
from pipeline.records import RunRecord
from test_delta import IDS, commit

FINISHED = datetime(2026, 11, 30, 0, 1, tzinfo=UTC)


def stored_runs(out: Path) -> dict[str, str]:
    con = connect_views(out)
    try:
        return dict(con.sql("SELECT run_id, status FROM etl_runs").fetchall())
    finally:
        con.close()


def test_status_names_the_live_writer_then_records_its_run_crashed(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "lake"
    with DeltaWarehouse(out) as w:
        commit(w, IDS[:4], "run-1")
        w.save_run(RunRecord("run-1", FINISHED, "0.1", {}, finished_at=FINISHED, status="succeeded"))
    writer = DeltaWarehouse(out)
    writer.open()
    try:
        run = RunRecord("run-live", datetime.now(UTC), "0.1", {}, calls_requested=9, calls_loaded=4, stages_loaded=7)
        writer.save_run(run)
        writer.publish(run)
        held, doc = read_writer_lock(out)
        assert held and doc["run"]["run_id"] == "run-live"
        live = cli("status", "--output", str(out), "--format", "json")
        report = json.loads(live.stdout)
        assert live.code == 0 and report["healthy"], live.stdout + live.stderr
        assert report["writing_now"]["run"]["calls_loaded"] == 4
        assert {r["run_id"]: r["status"] for r in report["last_runs"]} == {"run-1": "succeeded", "run-live": "running"}
    finally:
        writer.close()  # the lock is free, the run never finished: its writer is gone
    gone = json.loads(cli("status", "--output", str(out), "--format", "json").stdout)
    assert gone["writing_now"] is None
    assert {r["run_id"]: r["status"] for r in gone["last_runs"]}["run-live"] == "crashed"
    assert stored_runs(out) == {"run-1": "succeeded", "run-live": "crashed"}
    assert read_writer_lock(out)[0] is False

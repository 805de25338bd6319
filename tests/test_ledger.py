"""Run bookkeeping (pipeline.ledger): run states, distinct-call counts, etl_calls merge, health."""

from __future__ import annotations

import gzip
import json
import typing
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import ledger, schema
from pipeline.config import Settings
from pipeline.errors import AuthError, UnreachableError, WarehouseError
from pipeline.load import open_warehouse, query_connection
from pipeline.log import Reporter
from pipeline.records import CallOutcome, RunRecord, utcnow
from pipeline.runner import RunInterrupted, run_replay
from pipeline.status import status_report

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
C1 = "11111111-1111-4111-8111-111111111111"
C2 = "22222222-2222-4222-8222-222222222222"
C3 = "33333333-3333-4333-8333-333333333333"
FORMATS = ("duckdb", "parquet", "delta")


def output(tmp_path, fmt):
    return tmp_path / ("out.duckdb" if fmt == "duckdb" else "out")


def run_record(run_id="run-1", started=NOW, options=None, **fields):
    return RunRecord(run_id, started, "0.1.0", options or {"format": "x"}, **fields)


def test_call_and_run_statuses_are_declared_once_and_match_the_schema_comments():
    assert ledger.CALL_STATUSES == typing.get_args(ledger.CallStatus) == ("loaded", "not_found", "failed")
    assert not hasattr(schema, "CALL_STATUSES")
    status_comment = next(c.description for c in schema.ETL_RUNS.columns if c.name == "status")
    assert all(state in status_comment for state in ledger.RUN_STATUSES)
    calls_comment = next(c.description for c in schema.ETL_CALLS.columns if c.name == "status")
    assert all(state in calls_comment for state in ledger.CALL_STATUSES)


@pytest.mark.parametrize(
    ("exc", "interrupted", "expected"),
    [
        (AuthError("HTTP 401: the API key was refused"), False, "auth_failed"),
        (UnreachableError("cannot reach 127.0.0.1"), False, "unreachable"),
        (KeyboardInterrupt(), False, "interrupted"),
        (WarehouseError("cannot write: No space left on device"), True, "interrupted"),
        (WarehouseError("cannot write: No space left on device"), False, "crashed"),
        (RuntimeError("a bug"), False, "crashed"),
        (RunInterrupted(15), True, "interrupted"),
    ],
)
def test_how_a_broken_off_run_ended(exc, interrupted, expected):
    assert ledger.status_after_error(exc, interrupted) == expected
    assert expected in ledger.RUN_STATUSES


def test_a_run_that_went_to_its_end_succeeded_only_without_failures_or_bad_lines():
    assert ledger.finished_status(0) == "succeeded"
    assert ledger.finished_status(1) == "partial"
    assert ledger.finished_status(0, bad_lines=2) == "partial"


def test_counts_are_per_distinct_call_and_a_later_outcome_replaces_the_earlier():
    run = run_record()
    for outcome in [
        CallOutcome(C1, "loaded", 7, None, NOW),
        CallOutcome(C2, "failed", None, "HTTP 503 after 6 attempts", NOW),
        CallOutcome(C1, "loaded", 3, None, NOW),  # re-read: 3 stages now, not 7 + 3
        CallOutcome(C2, "loaded", 5, None, NOW),
        CallOutcome(C3, "loaded", 2, None, NOW),
        CallOutcome(C3, "not_found", 0, None, NOW),
        CallOutcome(C3, "not_found", 0, None, NOW),
    ]:
        run.count(outcome)
    assert (run.calls_loaded, run.calls_not_found, run.calls_failed, run.stages_loaded) == (2, 1, 0, 8)
    assert len(run.tally) == 3 and C3 in run.tally and "nope" not in run.tally
    assert "tally" not in run.as_row() and "_tally" not in run.as_row()


def test_calls_are_told_apart_whether_their_ids_are_canonical_uuids_or_not():
    run = run_record()
    lettered = "abcdef01-2345-4678-9abc-def012345678"
    others = [lettered.upper(), "{" + lettered + "}", "call-1", lettered + " ", ""]
    for call_id in [lettered, *others, C2]:
        run.count(CallOutcome(call_id, "loaded", 1, None, NOW))
    run.count(CallOutcome(lettered, "failed", None, "x", NOW))  # replaces its own outcome only
    assert len(run.tally) == 2 + len(others) and (run.calls_loaded, run.calls_failed, run.stages_loaded) == (6, 1, 6)
    assert all(c in run.tally for c in [lettered, C2, *others]) and C3 not in run.tally and "ABCDEF01" not in run.tally


def test_a_loaded_call_that_fails_later_in_the_run_gives_back_its_stages():
    run = run_record()
    run.count(CallOutcome(C1, "loaded", 40_000, None, NOW))
    run.count(CallOutcome(C1, "failed", None, "stage x is already owned by call y", NOW))
    assert (run.calls_loaded, run.calls_failed, run.stages_loaded) == (0, 1, 0)


def test_finish_stamps_the_end():
    run = run_record()
    ledger.finish(run, "partial", NOW + timedelta(seconds=3))
    assert (run.status, run.finished_at) == ("partial", NOW + timedelta(seconds=3))


def test_the_run_row_holds_its_options_as_sorted_json():
    run = run_record(options={"b": [1, {"z": "ü"}], "a": None})
    table = ledger.run_table(run)
    assert table.schema.equals(schema.ETL_RUNS.arrow_schema)
    assert json.loads(table["options"][0].as_py()) == {"a": None, "b": [1, {"z": "ü"}]}
    assert table["options"][0].as_py().index('"a"') < table["options"][0].as_py().index('"b"')


def runs_table(rows):
    return pa.Table.from_pylist([ledger.run_row(r) for r in rows], schema=schema.ETL_RUNS.arrow_schema)


def test_only_running_runs_become_crashed_and_keep_a_null_finish():
    runs = runs_table([
        run_record("a", NOW),
        run_record("b", NOW + timedelta(hours=1), status="succeeded", finished_at=NOW + timedelta(hours=2)),
        run_record("c", NOW + timedelta(hours=3), calls_loaded=4),
    ])
    crashed = ledger.crashed_runs(runs)
    assert crashed.column("run_id").to_pylist() == ["a", "c"]
    assert set(crashed.column("status").to_pylist()) == {"crashed"}
    assert crashed.column("finished_at").to_pylist() == [None, None]
    assert crashed.column("calls_loaded").to_pylist() == [0, 4]
    assert ledger.crashed_runs(runs_table([])).num_rows == 0


def test_the_latest_run_is_the_last_started_not_the_last_in_storage():
    runs = runs_table([run_record("new", NOW + timedelta(days=1), status="partial"), run_record("old", NOW, status="succeeded")])
    assert ledger.latest_run(runs) == {"run_id": "new", "status": "partial", "finished_at": None}
    assert ledger.latest_run(runs_table([])) is None


def test_live_state_carries_progress_and_rfc3339_times():
    run = run_record(calls_requested=10, calls_loaded=3, stages_loaded=9)
    last = {"run_id": "run-0", "status": "crashed", "finished_at": NOW}
    state = ledger.live_state("parquet", run, last)
    assert state["format"] == "parquet"
    assert state["last_finished"] == {"run_id": "run-0", "status": "crashed", "finished_at": "2026-11-21T12:00:00.000000Z"}
    assert last["finished_at"] is NOW  # the caller's record is not changed
    assert state["run"] == {
        "run_id": "run-1", "started_at": "2026-11-21T12:00:00.000000Z", "status": "running", "calls_requested": 10,
        "calls_loaded": 3, "calls_not_found": 0, "calls_failed": 0, "stages_loaded": 9,
    }
    assert ledger.live_state("duckdb", None, None) == {"format": "duckdb", "last_finished": None, "run": None}


def test_health_is_the_most_recent_finished_run_and_ghosts_are_crashed():
    runs = [
        {"run_id": "now", "status": "running", "finished_at": None},
        {"run_id": "dead", "status": "running", "finished_at": None},
        {"run_id": "ok", "status": "succeeded", "finished_at": NOW},
    ]
    assert ledger.last_finished(runs, "now")["run_id"] == "ok"
    assert ledger.is_healthy(ledger.last_finished(runs, "now"))
    assert ledger.settle_ghosts(runs) and [r["status"] for r in runs] == ["crashed", "crashed", "succeeded"]
    assert not ledger.settle_ghosts(runs)
    assert ledger.last_finished(runs, None) == {"run_id": "now", "status": "crashed", "finished_at": None}
    assert not ledger.is_healthy(ledger.last_finished(runs, None))
    assert not ledger.is_healthy(None) and ledger.last_finished([], None) is None


def test_the_etl_calls_merge_counts_attempts_and_keeps_what_a_failure_cannot_know():
    earlier = NOW - timedelta(days=1)
    first = ledger.outcomes_table([CallOutcome(C1, "loaded", 4, None, earlier), CallOutcome(C2, "not_found", 0, None, earlier)], "r1")
    stored = ledger.merged_etl_calls(first, schema.ETL_CALLS.arrow_schema.empty_table())
    again = ledger.outcomes_table(
        [CallOutcome(C1.upper(), "failed", None, "HTTP 500", NOW), CallOutcome(C3, "failed", None, "timeout", NOW),
         CallOutcome(C2, "loaded", 7, None, NOW)], "r2"
    )
    merged = ledger.merged_etl_calls(again, stored.filter(pc.not_equal(stored["call_id"], C3)))
    assert merged.schema.equals(schema.ETL_CALLS.arrow_schema)
    rows = {r["call_id"].lower(): r for r in merged.to_pylist()}
    assert rows[C1] | {"call_id": C1} == {
        "call_id": C1, "status": "failed", "stage_count": 4, "attempts": 2, "last_run_id": "r2",
        "last_attempt_at": NOW, "last_success_at": earlier, "error": "HTTP 500",
    }
    assert (rows[C3]["attempts"], rows[C3]["stage_count"], rows[C3]["last_success_at"]) == (1, None, None)
    assert (rows[C2]["status"], rows[C2]["stage_count"], rows[C2]["attempts"], rows[C2]["last_success_at"]) == ("loaded", 7, 2, NOW)
    assert [r["call_id"] for r in merged.to_pylist()] == [C1, C3, C2]  # canonical ids, in the batch's order


def test_the_watermark_row_is_rfc3339_text():
    row = ledger.watermark_row(datetime(2026, 3, 1, 5, 6, 7, 89, tzinfo=timezone(timedelta(hours=2)))).to_pylist()[0]
    assert (row["key"], row["value"]) == (ledger.WATERMARK_KEY, "2026-03-01T03:06:07.000089Z")


def landing_line(call_id, status, stages, fetched_at="2026-11-21T00:00:00Z"):
    page = {"next": None, "results": stages} if status == 200 else None
    url = f"https://api.ultravox.ai/api/calls/{call_id}/stages?pageSize=100"
    return json.dumps({"call_id": call_id, "status": status, "fetched_at": fetched_at, "url": url, "page": page})


def stage(call_id, n):
    return {
        "callId": call_id, "callStageId": f"{call_id[:-4]}{n:04d}", "created": "2026-11-20T10:00:00Z",
        "errorCount": 0, "experimentalSettings": None, "initialState": {}, "initialTokenCount": 10,
        "latestTokenCount": 15, "temperature": 0.4, "model": "fixie-ai/ultravox",
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_replay_of_a_killed_run_and_its_rerun_counts_each_call_once(tmp_path, fmt):
    raw = tmp_path / "raw"
    raw.mkdir()
    ids = [f"{n:08d}-aaaa-4aaa-8aaa-{n:012d}" for n in range(1, 21)]
    # The killed run landed the first 12 calls; the re-run landed all 20 again, C-12 now gone (404).
    (raw / "20261121T000000Z-aaaaaa.jsonl").write_text(
        "".join(landing_line(c, 200, [stage(c, 1), stage(c, 2)]) + "\n" for c in ids[:12])
    )
    with gzip.open(raw / "20261121T010000Z-bbbbbb.jsonl.gz", "wt") as fh:
        for c in ids:
            fh.write(landing_line(c, 404 if c == ids[11] else 200, [stage(c, 1)], "2026-11-21T01:00:00Z") + "\n")
    out = output(tmp_path, fmt)
    settings = Settings(format=fmt, output=str(out), batch_stages=5)  # many batches: duplicates meet across them
    result = run_replay(raw, settings, Reporter(progress=False))
    run = result.run
    assert (run.calls_requested, run.calls_loaded, run.calls_not_found, run.calls_failed) == (20, 19, 1, 0)
    assert run.stages_loaded == 19 and run.status == "succeeded"
    con = query_connection(fmt, out)
    try:
        stored = con.execute(
            "SELECT calls_requested, calls_loaded, calls_not_found, stages_loaded, status FROM etl_runs"
        ).fetchall()
        stages = con.execute("SELECT count(*) FROM call_stages").fetchall()[0][0]
    finally:
        con.close()
    assert stored == [(20, 19, 1, 19, "succeeded")] and stages == 19


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_backend_stores_what_the_ledger_builds(tmp_path, fmt):
    out = output(tmp_path, fmt)
    with open_warehouse(fmt, out) as wh:
        wh.save_run(run_record("run-dead", NOW, calls_requested=5))
        wh.commit_calls({}, [CallOutcome(C1, "not_found", 0, None, NOW)], "run-dead")
    with open_warehouse(fmt, out) as wh:  # the lock is free: run-dead's writer is gone
        assert wh._last_finished_run() == {"run_id": "run-dead", "status": "crashed", "finished_at": None}
        ok = run_record("run-ok", NOW + timedelta(hours=1), calls_requested=1)
        ok.count(CallOutcome(C1, "not_found", 0, None, NOW))
        ledger.finish(ok, "succeeded", NOW + timedelta(hours=1, seconds=2))
        wh.save_run(ok)
        wh.upsert(schema.ETL_STATE, ledger.watermark_row(NOW))
        assert wh.read_state(ledger.WATERMARK_KEY) == "2026-11-21T12:00:00.000000Z"
    text, healthy = status_report(fmt, out, "json")
    doc = json.loads(text)
    assert healthy and doc["last_finished_run"]["run_id"] == "run-ok"
    assert doc["last_finished_run"]["finished_at"] == "2026-11-21T13:00:02.000000Z"
    assert doc["last_success_at"] == "2026-11-21T13:00:02.000000Z"
    assert [(r["run_id"], r["status"], r["started_at"]) for r in doc["last_runs"]] == [
        ("run-ok", "succeeded", "2026-11-21T13:00:00.000000Z"), ("run-dead", "crashed", "2026-11-21T12:00:00.000000Z"),
    ]
    assert doc["failed_calls_sample"] == [] and "+00:00" not in text


def test_status_json_prints_every_timestamp_rfc3339(tmp_path):
    out = tmp_path / "out.duckdb"
    with open_warehouse("duckdb", out) as wh:
        failing = run_record("run-p", utcnow() - timedelta(hours=1), calls_requested=1)
        wh.commit_calls({}, [CallOutcome(C2, "failed", None, "HTTP 503 after 6 attempts", NOW)], failing.run_id)
        failing.count(CallOutcome(C2, "failed", None, "HTTP 503 after 6 attempts", NOW))
        ledger.finish(failing, "partial")
        wh.save_run(failing)
    text, healthy = status_report("duckdb", out, "json")
    doc = json.loads(text)
    assert not healthy and doc["last_success_at"] is None
    assert doc["failed_calls_sample"][0]["last_attempt_at"] == "2026-11-21T12:00:00.000000Z"
    finished = doc["last_runs"][0]["finished_at"]
    assert finished.endswith("Z") and "T" in finished and doc["last_finished_run"]["finished_at"] == finished

"""Call discovery: --since/--until, --incremental with watermark and overlap, deleted calls."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import duckdb

from conftest import KEY, expected_for
from pipeline.sandbox import Sandbox, SandboxOptions, SyntheticData


def created_of(data):
    return {cid: datetime.fromisoformat(data.call_for(cid)["created"]) for cid in data.call_ids}


def query(db, sql, params=()):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_since_until_lists_calls_and_fills_calls_table(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=150, seed=31)
    created = created_of(box.data)
    days = sorted({c.date() for c in created.values()})
    since, until = days[2], days[4]
    wanted = [c for c, when in created.items() if since <= when.date() <= until]
    db = tmp_path / "w.duckdb"
    res = cli("run", "--since", since.isoformat(), "--until", until.isoformat(), "--output", str(db),
              "--base-url", box.base_url, "--page-size", "7")
    assert res.code == 0, res.stderr
    listed = {r[0] for r in query(db, "SELECT call_id::VARCHAR FROM calls")}
    assert listed == set(wanted)
    assert {r[0] for r in query(db, "SELECT call_id::VARCHAR FROM etl_calls WHERE status = 'loaded'")} == set(wanted)
    figures = query(db, "SELECT count(*), coalesce(sum(error_count), 0) FROM call_stages")[0]
    expected = expected_for(box.data, wanted)
    assert figures == (expected.stages, expected.errors)
    # Listed call fields that matter for analysis, exactly as served.
    one = wanted[0]
    served = box.data.call_for(one)
    row = query(db, "SELECT end_reason, billed_duration, agent_id, metadata::VARCHAR FROM calls WHERE call_id = ?", [one])[0]
    assert row[0] == served["endReason"] and row[1] == served["billedDuration"] and row[2] == served["agentId"]
    # Stages join to their call's outcome.
    joined = query(db, "SELECT count(*) FROM call_stages s JOIN calls c USING (call_id)")[0][0]
    assert joined == expected.stages
    # Combined with explicit IDs.
    extra = next(c for c in box.data.call_ids if c not in wanted)
    res = cli("run", "--since", since.isoformat(), "--until", until.isoformat(), "--call-id", extra,
              "--output", str(db), "--base-url", box.base_url)
    assert res.code == 0, res.stderr
    assert query(db, "SELECT status FROM etl_calls WHERE call_id = ?", [extra]) == [("loaded",)]


def test_incremental_watermark_overlap_new_calls_and_deletions(tmp_path):
    data = SyntheticData(n_calls=300, seed=32)
    created = created_of(data)
    ordered = sorted(created.values())
    data.listed_before = ordered[-60]  # the newest 60 calls do not exist yet
    db = tmp_path / "w.duckdb"
    from conftest import invoke_cli as cli

    box = Sandbox(data, SandboxOptions(api_key=KEY)).start()
    try:
        first = cli("run", "--incremental", "--output", str(db), "--base-url", box.base_url)
        assert first.code == 0, first.stderr
        visible = [c for c, when in created.items() if when < data.listed_before]
        assert len(query(db, "SELECT * FROM calls")) == len(visible)
        watermark = max(created[c] for c in visible)
        stored = query(db, "SELECT value FROM etl_state WHERE key = 'watermark_created'")[0][0]
        assert datetime.fromisoformat(stored) == watermark

        # Time passes: 60 new calls appear, and one loaded call is deleted.
        data.listed_before = None
        box.stop()
        doomed = visible[0]
        data.mark_deleted(doomed, "2025-06-20T00:00:00Z")
        box = Sandbox(data, SandboxOptions(api_key=KEY)).start()
        second = cli("run", "--incremental", "--output", str(db), "--base-url", box.base_url)
        assert second.code == 0, second.stderr
        window_start = watermark - timedelta(hours=24)
        listed_again = {c for c, when in created.items() if when.date() >= window_start.date()}
        refetched = {c for c in listed_again if created[c] >= window_start} - {doomed}
        assert box.stats.stage_requests >= len(refetched)
        runs = query(db, "SELECT calls_requested FROM etl_runs ORDER BY started_at")
        assert runs[-1][0] == len(refetched)  # new calls + overlap window, nothing older
        new = [c for c, when in created.items() if when >= ordered[-60]]
        assert set(new) <= refetched
        loaded = {r[0] for r in query(db, "SELECT call_id::VARCHAR FROM etl_calls WHERE status = 'loaded'")}
        assert set(new) <= loaded
        # The deleted call lost its stages, is recorded, and flagged in calls.
        assert query(db, "SELECT count(*) FROM call_stages WHERE call_id = ?", [doomed])[0][0] == 0
        assert query(db, "SELECT status, error FROM etl_calls WHERE call_id = ?", [doomed]) == [("not_found", "deleted in Ultravox")]
        assert query(db, "SELECT deleted_at IS NOT NULL FROM calls WHERE call_id = ?", [doomed]) == [(True,)]
        # Everything still exact for the calls that exist.
        alive = [c for c in data.call_ids if c != doomed]
        expected = expected_for(data, alive)
        assert query(db, "SELECT count(*) FROM call_stages")[0][0] == expected.stages
        assert query(db, "SELECT count(*) = count(DISTINCT call_id) FROM calls")[0][0]
    finally:
        box.stop()


def test_keep_deleted_flags_without_removing(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=80, seed=33)
    db = tmp_path / "w.duckdb"
    assert cli("run", "--incremental", "--output", str(db), "--base-url", box.base_url).code == 0
    doomed = box.data.call_ids[5]
    box.data.mark_deleted(doomed, "2025-06-20T00:00:00Z")
    stages = len(box.data.stages_for(doomed))
    res = cli("run", "--incremental", "--keep-deleted", "--output", str(db), "--base-url", box.base_url)
    assert res.code == 0, res.stderr
    assert query(db, "SELECT count(*) FROM call_stages WHERE call_id = ?", [doomed])[0][0] == stages
    assert query(db, "SELECT deleted_at FROM calls WHERE call_id = ?", [doomed])[0][0] == datetime(2025, 6, 20, tzinfo=timezone.utc)


def test_stop_between_listing_and_loading_lists_again(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=60, seed=34)
    db = tmp_path / "w.duckdb"
    # Listing succeeds, then the stages endpoint rejects the key: the run stops (exit 3)
    # after storing the listed calls and before loading them. The watermark must not move.
    stopper = Sandbox(box.data, SandboxOptions(api_key=KEY, page_hook=lambda *_: (403, {}, b'{"detail": "no"}'))).start()
    try:
        res = cli("run", "--incremental", "--output", str(db), "--base-url", stopper.base_url)
        assert res.code == 3, res.stderr
    finally:
        stopper.stop()
    assert query(db, "SELECT count(*) FROM calls")[0][0] == 60
    assert query(db, "SELECT count(*) FROM etl_state")[0][0] == 0
    res = cli("run", "--incremental", "--output", str(db), "--base-url", box.base_url)
    assert res.code == 0, res.stderr
    assert query(db, "SELECT count(*) FROM call_stages")[0][0] == expected_for(box.data, box.data.call_ids).stages


def test_failed_calls_outside_the_window_are_retried_by_incremental_runs(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=60, seed=35)
    db = tmp_path / "w.duckdb"
    created = created_of(box.data)
    oldest = min(created, key=created.get)
    broken = Sandbox(box.data, SandboxOptions(api_key=KEY, always_fail=frozenset([oldest]))).start()
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text("max_attempts = 2\nbackoff_initial_seconds = 0.01\nbackoff_max_seconds = 0.02\n")
        res = cli("run", "--incremental", "--output", str(db), "--base-url", broken.base_url, "--config", str(cfg))
        assert res.code == 1, res.stderr
    finally:
        broken.stop()
    res = cli("run", "--incremental", "--output", str(db), "--base-url", box.base_url)
    assert res.code == 0, res.stderr
    assert query(db, "SELECT status FROM etl_calls WHERE call_id = ?", [oldest]) == [("loaded",)]
    assert query(db, "SELECT count(*) FROM call_stages")[0][0] == expected_for(box.data, box.data.call_ids).stages


def test_bad_dates_exit_2(tmp_path, cli):
    res = cli("run", "--since", "2025-13-01", "--output", str(tmp_path / "w.duckdb"))
    assert res.code == 2 and "--since" in res.stderr
    res = cli("run", "--until", "2025-06-01", "--output", str(tmp_path / "w.duckdb"))
    assert res.code == 2 and "--until needs" in res.stderr


def test_incremental_into_parquet(tmp_path, start_sandbox, cli):
    from pipeline.load import query_connection

    box = start_sandbox(n_calls=80, seed=36)
    folder = tmp_path / "lake"
    doomed = box.data.call_ids[3]
    for _ in range(2):
        res = cli("run", "--incremental", "--format", "parquet", "--output", str(folder), "--base-url", box.base_url)
        assert res.code == 0, res.stderr
        box.data.mark_deleted(doomed, "2025-06-20T00:00:00Z")
    con = query_connection("parquet", folder)
    assert con.execute("SELECT count(*), count(DISTINCT call_id) FROM calls").fetchall()[0] == (80, 80)
    assert con.execute("SELECT count(*) FROM etl_state WHERE key = 'watermark_created'").fetchall()[0][0] == 1
    assert con.execute("SELECT count(*) FROM call_stages WHERE call_id = ?", [doomed]).fetchall()[0][0] == 0
    assert con.execute("SELECT deleted_at IS NOT NULL FROM calls WHERE call_id = ?", [doomed]).fetchall()[0][0]
    alive = [c for c in box.data.call_ids if c != doomed]
    assert con.execute("SELECT count(*) FROM call_stages").fetchall()[0][0] == expected_for(box.data, alive).stages

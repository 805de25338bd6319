"""Raw landing zone → replay without the API, and the status command."""

from __future__ import annotations

import gzip
import json

import duckdb

from conftest import expected_for, write_ids
from test_e2e_run import CONTENT, assert_matches

C1 = "11111111-1111-4111-8111-111111111111"


def stage(call_id, n, tokens=10):
    return {
        "callId": call_id, "callStageId": f"{call_id[:-4]}{n:04d}", "created": "2026-11-20T10:00:00Z",
        "errorCount": 0, "experimentalSettings": None, "initialState": {}, "initialTokenCount": tokens,
        "latestTokenCount": tokens + 5, "temperature": 0.4, "model": "fixie-ai/ultravox",
    }


def line(call_id, status, page, url=None):
    url = url or f"https://api.ultravox.ai/api/calls/{call_id}/stages?pageSize=100"
    return json.dumps({"call_id": call_id, "status": status, "fetched_at": "2026-11-21T00:00:00Z", "url": url, "page": page})


def test_live_run_and_replay_give_identical_tables(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=150, seed=11)
    ids = write_ids(tmp_path / "ids.txt", box.data.call_ids + box.data.deleted_call_ids[:2])
    live, replayed, raw = tmp_path / "live.duckdb", tmp_path / "replayed.duckdb", tmp_path / "raw"
    res = cli("run", "--calls-file", str(ids), "--output", str(live), "--base-url", box.base_url,
              "--raw-dir", str(raw), "--page-size", "3")
    assert res.code == 0, res.stderr
    files = list(raw.glob("*.jsonl.gz"))
    assert len(files) == 1 and not list(raw.glob(".*partial"))
    lines = [json.loads(x) for x in gzip.decompress(files[0].read_bytes()).splitlines()]
    assert {x["status"] for x in lines} == {200, 404}
    assert all(set(x) == {"call_id", "status", "fetched_at", "url", "page"} for x in lines)

    box.stop()  # replay must not need the API
    res = cli("replay", str(raw), "--output", str(replayed), key=None)
    assert res.code == 0, res.stderr
    assert_matches(replayed, expected_for(box.data, box.data.call_ids))
    with duckdb.connect(str(live), read_only=True) as a, duckdb.connect(str(replayed), read_only=True) as b:
        assert a.execute(CONTENT).fetchall() == b.execute(CONTENT).fetchall()
        q = "SELECT call_id::VARCHAR, status, stage_count FROM etl_calls ORDER BY 1"
        assert a.execute(q).fetchall() == b.execute(q).fetchall()


def test_replay_hand_written_files_later_lines_win_bad_lines_reported(tmp_path, cli):
    raw = tmp_path / "raw"
    raw.mkdir()
    c2 = "22222222-2222-4222-8222-222222222222"
    (raw / "a.jsonl").write_text("\n".join([
        line(C1, 200, {"next": None, "results": [stage(C1, 1), stage(C1, 2)]}),
        line(c2, 200, {"next": None, "results": [stage(c2, 1)]}),
        "{not json",
    ]) + "\n")
    with gzip.open(raw / "b.jsonl.gz", "wt") as fh:
        fh.write(line(C1, 200, {"next": f"https://x/api/calls/{C1}/stages?cursor=p2", "results": [stage(C1, 3, 100)]}) + "\n")
        fh.write(line(C1, 200, {"next": None, "results": [stage(C1, 4, 100)]}, url=f"https://x/api/calls/{C1}/stages?cursor=p2") + "\n")
        fh.write(line(c2, 404, None) + "\n")
    db = tmp_path / "w.duckdb"
    res = cli("replay", str(raw), "--output", str(db), key=None)
    assert res.code == 1, res.stderr
    assert f"{raw / 'a.jsonl'}:3" in res.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        stages = con.execute("SELECT call_id::VARCHAR, stage_index, initial_token_count FROM call_stages ORDER BY 1, 2").fetchall()
        assert stages == [(C1, 0, 100), (C1, 1, 100)]  # the later fetch of C1 replaced the earlier one
        statuses = dict(con.execute("SELECT call_id::VARCHAR, status FROM etl_calls").fetchall())
        assert statuses == {C1: "loaded", c2: "not_found"}


def test_status_reports_runs_and_failures(tmp_path, start_sandbox, cli):
    from pipeline.sandbox import Sandbox, SandboxOptions

    box = start_sandbox(n_calls=12)
    failing = box.data.call_ids[0]
    broken = Sandbox(box.data, SandboxOptions(api_key="uvx-e2e-7f3a9c-DO-NOT-LEAK", always_fail=frozenset([failing])))
    broken.start()
    cfg = tmp_path / "c.toml"
    cfg.write_text("max_attempts = 2\nbackoff_initial_seconds = 0.01\nbackoff_max_seconds = 0.02\n")
    db = tmp_path / "w.duckdb"
    ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids))
    try:
        assert cli("run", "--calls-file", ids, "--output", str(db), "--base-url", broken.base_url, "--config", str(cfg)).code == 1
    finally:
        broken.stop()
    res = cli("status", "--output", str(db), key=None)
    assert res.code == 1, res.stderr
    assert "ATTENTION" in res.stdout and failing in res.stdout and "HTTP 500" in res.stdout
    doc = json.loads(cli("status", "--output", str(db), "--format", "json", key=None).stdout)
    assert doc["healthy"] is False and doc["failed_calls"] == 1
    assert cli("run", "--calls-file", ids, "--output", str(db), "--base-url", box.base_url).code == 0
    res = cli("status", "--output", str(db), key=None)
    assert res.code == 0 and "OK" in res.stdout
    doc = json.loads(cli("status", "--output", str(db), "--format", "json", key=None).stdout)
    assert doc["healthy"] is True and doc["failed_calls"] == 0 and doc["hours_since_last_success"] < 1
    missing = cli("status", "--output", str(tmp_path / "nope.duckdb"), key=None)
    assert missing.code == 2 and "no warehouse" in missing.stderr

"""End to end: the real CLI against the simulated API on 127.0.0.1, then SQL on the file."""

from __future__ import annotations

import json

import duckdb
import pytest

from conftest import KEY, expected_for, write_ids

FIGURES = """
SELECT (SELECT count(DISTINCT call_id) FROM call_stages),
       (SELECT count(*) FROM call_stages),
       (SELECT count(*) FROM stage_inactivity_messages),
       (SELECT count(*) FROM stage_voices),
       (SELECT coalesce(sum(latest_token_count), 0) FROM call_stages),
       (SELECT coalesce(sum(initial_token_count), 0) FROM call_stages),
       (SELECT coalesce(sum(error_count), 0) FROM call_stages)
"""
KEYS_UNIQUE = """
SELECT (SELECT count(*) = count(DISTINCT call_stage_id) FROM call_stages)
   AND (SELECT count(*) = count(DISTINCT (call_stage_id, position)) FROM stage_inactivity_messages)
   AND (SELECT count(*) = count(DISTINCT (call_stage_id, role)) FROM stage_voices)
   AND (SELECT count(*) = count(DISTINCT call_id) FROM etl_calls)
"""
# Everything except the columns that say when/which run wrote a row.
CONTENT = """
SELECT md5(string_agg(t::VARCHAR, '|' ORDER BY t::VARCHAR)) FROM (
  SELECT * EXCLUDE (run_id, extracted_at) FROM call_stages) t
UNION ALL SELECT md5(string_agg(t::VARCHAR, '|' ORDER BY t::VARCHAR)) FROM stage_inactivity_messages t
UNION ALL SELECT md5(string_agg(t::VARCHAR, '|' ORDER BY t::VARCHAR)) FROM stage_voices t
"""


def figures(db):
    with duckdb.connect(str(db), read_only=True) as con:
        row = con.execute(FIGURES).fetchall()[0]
        assert con.execute(KEYS_UNIQUE).fetchall()[0][0], "primary keys not unique"
        content = [r[0] for r in con.execute(CONTENT).fetchall()]
    return row, content


def assert_matches(db, expected):
    (calls_with_stages, stages, messages, voices, latest, initial, errors), _ = figures(db)
    assert (stages, messages, voices) == (expected.stages, expected.messages, expected.voices)
    assert (latest, initial, errors) == (expected.latest_tokens, expected.initial_tokens, expected.errors)


def test_export_300_calls_exact_and_idempotent(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=300, seed=7)  # two blocks of pinned calls: every shape
    ids = write_ids(tmp_path / "ids.txt", box.data.call_ids)
    db = tmp_path / "stages.duckdb"
    first = cli("run", "--calls-file", str(ids), "--output", str(db), "--base-url", box.base_url)
    assert first.code == 0, first.stderr
    expected = expected_for(box.data, box.data.call_ids)
    assert_matches(db, expected)
    assert "300 calls (300 loaded, 0 not found, 0 failed)" in first.stderr
    _, content_1 = figures(db)

    # Second run: everything already loaded → skipped, nothing fetched, identical contents.
    box.reset_stats()
    second = cli("run", "--calls-file", str(ids), "--output", str(db), "--base-url", box.base_url)
    assert second.code == 0, second.stderr
    assert "300 call(s) already loaded, skipped" in second.stderr
    assert box.stats.stage_requests == 0
    assert figures(db)[1] == content_1

    # --refresh re-fetches everything and still leaves identical contents, no duplicates.
    third = cli("run", "--calls-file", str(ids), "--output", str(db), "--base-url", box.base_url, "--refresh")
    assert third.code == 0, third.stderr
    assert box.stats.stage_requests >= 300
    assert figures(db)[1] == content_1
    assert_matches(db, expected)

    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT status, count(*) FROM etl_calls GROUP BY ALL").fetchall() == [("loaded", 300)]
        assert con.execute("SELECT max(attempts) FROM etl_calls").fetchall()[0][0] == 2
        runs = con.execute("SELECT status, calls_requested, calls_loaded, stages_loaded FROM etl_runs ORDER BY started_at").fetchall()
        assert runs == [("succeeded", 300, 300, expected.stages), ("succeeded", 0, 0, 0),
                        ("succeeded", 300, 300, expected.stages)]
        options = con.execute("SELECT options FROM etl_runs LIMIT 1").fetchall()[0][0]
        assert json.loads(options)["concurrency"] == 16


def test_unknown_calls_are_not_found_and_duplicates_warned(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=100)
    assert box.data.deleted_call_ids
    missing = "00000000-0000-4000-8000-00000000dead"
    ids = box.data.call_ids[:5] + box.data.call_ids[:2] + [missing] + box.data.deleted_call_ids[:1]
    db = tmp_path / "w.duckdb"
    res = cli("run", "--calls-file", str(write_ids(tmp_path / "ids.txt", ids)), "--output", str(db), "--base-url", box.base_url)
    assert res.code == 0, res.stderr
    assert "2 duplicate call ID(s) ignored" in res.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        rows = dict(con.execute("SELECT call_id::VARCHAR, status FROM etl_calls").fetchall())
    assert rows[missing] == "not_found" and len(rows) == 7


def test_calls_from_stdin_and_call_id_flags(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=10)
    db = tmp_path / "w.duckdb"
    stdin = "# from a pipe\r\n" + "\r\n".join(box.data.call_ids[:3]).upper() + "\r\n"
    res = cli("run", "--calls-file", "-", "--call-id", box.data.call_ids[4], "--output", str(db),
              "--base-url", box.base_url, stdin=stdin)
    assert res.code == 0, res.stderr
    assert_matches(db, expected_for(box.data, box.data.call_ids[:3] + [box.data.call_ids[4]]))


def test_malformed_ids_exit_2_and_nothing_fetched(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=10)
    path = tmp_path / "ids.txt"
    path.write_text(f"{box.data.call_ids[0]}\nnot-a-uuid\n{box.data.call_ids[1]}\n1234\n")
    db = tmp_path / "w.duckdb"
    res = cli("run", "--calls-file", str(path), "--output", str(db), "--base-url", box.base_url)
    assert res.code == 2
    assert f"{path}:2" in res.stderr and f"{path}:4" in res.stderr
    assert box.stats.requests == 0 and not db.exists()
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no call IDs given"),
        (["--calls-file", "MISSING"], "cannot read calls file"),
        (["--call-id", "x", "--concurrency", "0"], "'concurrency' must be greater than 0"),
        (["--call-id", "00000000-0000-4000-8000-000000000001", "--base-url", "http://api.example.com"], "refusing plain http"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, cli, args, message):
    (tmp_path / "EMPTY").write_text("# nothing here\n\n")
    args = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in args]
    res = cli("run", *args, "--output", str(tmp_path / "w.duckdb"))
    assert res.code == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_empty_calls_file_is_nothing_to_do(tmp_path, cli):
    (tmp_path / "EMPTY").write_text("# nothing here\n\n")
    res = cli("run", "--calls-file", str(tmp_path / "EMPTY"), "--output", str(tmp_path / "w.duckdb"))
    assert res.code == 0, res.stderr
    assert res.stderr.strip().splitlines() == [f"nothing to do: {tmp_path / 'EMPTY'} lists no call IDs"]
    assert not (tmp_path / "w.duckdb").exists()


def test_missing_key_exit_2_and_bad_key_exit_3(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=50)
    ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids))
    db = str(tmp_path / "w.duckdb")
    res = cli("run", "--calls-file", ids, "--output", db, "--base-url", box.base_url, key=None)
    assert res.code == 2 and "ULTRAVOX_API_KEY" in res.stderr and box.stats.requests == 0
    res = cli("run", "--calls-file", ids, "--output", db, "--base-url", box.base_url, key="wrong-key")
    assert res.code == 3, res.stderr
    assert "error: API key rejected" in res.stderr and "Traceback" not in res.stderr
    assert box.stats.requests <= 16  # stopped at once: at most the requests already in flight
    assert "wrong-key" not in res.stderr


def test_unreachable_api_exit_3(tmp_path, cli):
    res = cli("run", "--call-id", "00000000-0000-4000-8000-000000000001", "--output", str(tmp_path / "w.duckdb"),
              "--base-url", "http://127.0.0.1:9", "--config", str(_fast_config(tmp_path)))
    assert res.code == 3, res.stderr
    assert "cannot reach the API" in res.stderr


def _fast_config(tmp_path):
    path = tmp_path / "fast.toml"
    path.write_text("max_attempts = 2\nbackoff_initial_seconds = 0.01\nbackoff_max_seconds = 0.02\n")
    return path


def test_failed_calls_exit_1_then_next_run_retries_only_them(tmp_path, start_sandbox, cli):
    from pipeline.sandbox import Sandbox, SandboxOptions

    box = start_sandbox(n_calls=60, seed=3)
    failing = frozenset(box.data.call_ids[:3])
    broken = Sandbox(box.data, SandboxOptions(api_key=KEY, always_fail=failing))
    broken.start()
    try:
        ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids))
        db = tmp_path / "w.duckdb"
        config = str(_fast_config(tmp_path))
        res = cli("run", "--calls-file", ids, "--output", str(db), "--base-url", broken.base_url, "--config", config)
        assert res.code == 1, res.stderr
        assert res.stderr.count("failed: HTTP 500") == 3
        with duckdb.connect(str(db), read_only=True) as con:
            failed = con.execute("SELECT call_id::VARCHAR, error FROM etl_calls WHERE status = 'failed'").fetchall()
            assert {c for c, _ in failed} == failing and all("HTTP 500" in e for _, e in failed)
            assert con.execute("SELECT status FROM etl_runs").fetchall()[0][0] == "partial"
    finally:
        broken.stop()
    box.reset_stats()
    res = cli("run", "--calls-file", ids, "--output", str(db), "--base-url", box.base_url, "--config", config)
    assert res.code == 0, res.stderr
    assert "57 call(s) already loaded, skipped" in res.stderr
    assert "3 calls (3 loaded" in res.stderr
    assert_matches(db, expected_for(box.data, box.data.call_ids))


def test_json_logs_and_no_secret_anywhere(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=40)
    db = tmp_path / "w.duckdb"
    raw = tmp_path / "raw"
    res = cli("run", "--calls-file", str(write_ids(tmp_path / "ids.txt", box.data.call_ids)), "--output", str(db),
              "--base-url", box.base_url, "--log-format", "json", "--raw-dir", str(raw), "--debug")
    assert res.code == 0, res.stderr
    events = [json.loads(line) for line in res.stderr.splitlines()]
    assert events[-1]["event"] == "run_finished" and events[-1]["calls_loaded"] == 40
    blobs = [res.stdout.encode(), res.stderr.encode()] + [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert not [b for b in blobs if KEY.encode() in b]
    # Third-party TTS credentials served by the sandbox never reach the warehouse.
    secrets = _generic_header_values(box.data)
    assert secrets, "sandbox data should contain generic voice headers"
    import gzip

    for path in [db, *raw.rglob("*.gz")]:
        data = path.read_bytes() if path.suffix != ".gz" else gzip.decompress(path.read_bytes())
        assert not [s for s in secrets if s.encode() in data], path


def _generic_header_values(data):
    values = set()
    for cid in data.call_ids:
        for stage in data.stages_for(cid):
            for field in ("externalVoice", "voiceOverrides"):
                voice = stage.get(field) or {}
                generic = voice.get("generic") if isinstance(voice, dict) else None
                if generic:
                    values.update(v for v in (generic.get("headers") or {}).values() if len(v) > 8)
    return values


def test_key_in_config_file_refused(tmp_path, cli):
    cfg = tmp_path / "c.toml"
    cfg.write_text('api_key = "sk-live-abc"\n')
    res = cli("run", "--config", str(cfg), "--call-id", "00000000-0000-4000-8000-000000000001")
    assert res.code == 2 and "environment" in res.stderr and "sk-live-abc" not in res.stderr


def test_output_that_is_not_duckdb_is_left_alone(tmp_path, cli):
    target = tmp_path / "notes.duckdb"
    target.write_text("my precious notes")
    res = cli("run", "--call-id", "00000000-0000-4000-8000-000000000001", "--output", str(target),
              "--base-url", "http://127.0.0.1:9")
    assert res.code == 2 and "not a DuckDB file" in res.stderr
    assert target.read_text() == "my precious notes"


def test_help_of_every_command(cli):
    top = cli("--help")
    assert top.code == 0
    for command in ("run", "demo", "replay", "report", "status", "sandbox"):
        assert command in top.stdout
        res = cli(command, "--help")
        assert res.code == 0 and "Usage:" in res.stdout


def test_progress_bar_when_asked_and_one_summary_line(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=30)
    ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids))
    shown = cli("run", "--calls-file", ids, "--output", str(tmp_path / "a.duckdb"), "--base-url", box.base_url, "--progress")
    assert shown.code == 0
    assert "calls 30/30" in shown.stderr and "stages" in shown.stderr and "retries" in shown.stderr
    # Not a terminal and no --progress: no bar, exactly one summary line.
    quiet = cli("run", "--calls-file", ids, "--output", str(tmp_path / "b.duckdb"), "--base-url", box.base_url)
    assert quiet.code == 0 and "calls 30/30" not in quiet.stderr
    assert len(quiet.stderr.strip().splitlines()) == 1 and quiet.stderr.startswith("succeeded: 30 calls")

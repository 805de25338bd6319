"""The CLI in-process (click's CliRunner) against the sandbox: exit codes, JSON logs, help, formats."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import click
import duckdb
import pytest
from click.testing import CliRunner

from conftest import KEY, expected_for, write_ids
from pipeline import cli as cli_module
from pipeline.cli import cli, detect_format, warehouse_at

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def invoke(*args: str, key: str | None = KEY, stdin: str | None = None):
    runner = CliRunner()
    env = {"ULTRAVOX_API_KEY": key} if key is not None else {"ULTRAVOX_API_KEY": ""}
    return runner.invoke(cli, list(args), env=env, input=stdin, catch_exceptions=False)


def query(db, sql, params=()):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def _ids(tmp_path, ids):
    return str(write_ids(tmp_path / "ids.txt", ids))


def test_a_bug_is_exit_4_with_one_line_and_the_run_recorded_crashed(tmp_path, start_sandbox, monkeypatch):
    box = start_sandbox(n_calls=20)
    db = tmp_path / "w.duckdb"

    def broken_transform(*_args, **_kwargs):
        raise RuntimeError("transform exploded")

    monkeypatch.setattr("pipeline.batch.transform_calls", broken_transform)
    res = invoke("run", "--calls-file", _ids(tmp_path, box.data.call_ids), "--output", str(db), "--base-url", box.base_url)
    assert res.exit_code == 4, res.stderr
    assert res.stderr.strip().splitlines() == [
        "internal error: RuntimeError: transform exploded; rerun with --debug for a traceback"
    ]
    assert query(db, "SELECT status FROM etl_runs") == [("crashed",)]

    debug = invoke("run", "--calls-file", _ids(tmp_path, box.data.call_ids), "--output", str(db),
                   "--base-url", box.base_url, "--debug")
    assert debug.exit_code == 4  # --debug adds the traceback, never changes the code
    assert "Traceback (most recent call last)" in debug.stderr and "broken_transform" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("internal error: RuntimeError")


def test_a_library_error_of_several_lines_is_shown_as_its_first_line(tmp_path, start_sandbox, monkeypatch):
    box = start_sandbox(n_calls=5)

    def broken_transform(*_args, **_kwargs):
        raise RuntimeError("Function 'x' has no kernel\n\nAt:\n  pyarrow/error.pxi(92): check_status\n" + "y" * 5000)

    monkeypatch.setattr("pipeline.batch.transform_calls", broken_transform)
    res = invoke("run", "--calls-file", _ids(tmp_path, box.data.call_ids), "--output", str(tmp_path / "w.duckdb"),
                 "--base-url", box.base_url)
    assert res.exit_code == 4
    assert res.stderr.strip().splitlines() == [
        "internal error: RuntimeError: Function 'x' has no kernel; rerun with --debug for a traceback"
    ]


def test_debug_keeps_usage_exit_code_and_never_shows_the_key(tmp_path, start_sandbox):
    res = invoke("run", "--output", str(tmp_path / "w.duckdb"), "--debug")
    assert res.exit_code == 2
    assert "Traceback" in res.stderr and "no call IDs given" in res.stderr
    box = start_sandbox(n_calls=5)
    wrong = "uvx-wrong-key-5e1f0d"
    res = invoke("run", "--calls-file", _ids(tmp_path, box.data.call_ids), "--output", str(tmp_path / "w.duckdb"),
                 "--base-url", box.base_url, "--debug", key=wrong)
    assert res.exit_code == 3, res.stderr
    assert "Traceback" in res.stderr and wrong not in res.stderr + res.stdout


def test_json_logs_every_line_one_object_with_start_progress_finish(tmp_path, start_sandbox, monkeypatch):
    monkeypatch.setattr("pipeline.log.JSON_PROGRESS_EVERY", 0.0)  # a progress event at every call
    box = start_sandbox(n_calls=30)
    res = invoke("run", "--calls-file", _ids(tmp_path, box.data.call_ids), "--output", str(tmp_path / "w.duckdb"),
                 "--base-url", box.base_url, "--log-format", "json", "--progress")
    assert res.exit_code == 0, res.stderr
    events = [json.loads(line) for line in res.stderr.splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "run_started" and names[-1] == "run_finished"
    assert events[0]["calls_total"] == 30
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["calls_done"] == 30 and progress[-1]["calls_total"] == 30
    assert {"stages", "requests", "retries", "requests_per_second"} <= set(progress[-1])
    assert progress[-1]["requests"] >= 30
    assert all(RFC3339.match(e["ts"]) for e in events)
    assert RFC3339.match(events[-1]["started_at"]) and RFC3339.match(events[-1]["finished_at"])


def test_json_logs_errors_are_json_too(tmp_path):
    res = invoke("run", "--output", str(tmp_path / "w.duckdb"), "--log-format", "json")
    assert res.exit_code == 2
    [line] = res.stderr.splitlines()
    error = json.loads(line)
    assert error["level"] == "error" and error["event"] == "error" and error["exit_code"] == 2
    assert "no call IDs given" in error["message"] and RFC3339.match(error["ts"])


def test_json_logs_from_the_config_file_apply_to_errors_after_it_is_read(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('log_format = "json"\n')
    res = invoke("run", "--config", str(cfg), "--call-id", "00000000-0000-4000-8000-000000000001",
                 "--output", str(tmp_path / "w.duckdb"), key=None)
    assert res.exit_code == 2
    assert json.loads(res.stderr)["message"].startswith("error: no API key")


def test_text_warnings_clear_the_bar_and_the_bar_fits_the_terminal(tmp_path, start_sandbox, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setattr("pipeline.log.BAR_REDRAW_EVERY", 0.0)
    box = start_sandbox(n_calls=25)
    from pipeline.sandbox import Sandbox, SandboxOptions

    failing = frozenset(box.data.call_ids[:2])
    broken = Sandbox(box.data, SandboxOptions(api_key=KEY, always_fail=failing)).start()
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text("max_attempts = 1\n")
        res = invoke("run", "--calls-file", _ids(tmp_path, box.data.call_ids), "--output", str(tmp_path / "w.duckdb"),
                     "--base-url", broken.base_url, "--progress", "--config", str(cfg))
    finally:
        broken.stop()
    assert res.exit_code == 1, res.stderr
    lines = res.stderr.split("\n")
    warnings = [line for line in lines if "warning: call" in line]
    assert len(warnings) == 2
    # A warning starts on a cleared line, never glued to the end of a bar.
    assert all(w.split("\r\033[K")[-1].startswith("warning: call") for w in warnings)
    draws = [d for line in lines for d in line.split("\r\033[K") if d.startswith("[")]
    assert draws and all(len(d) <= 39 for d in draws)
    summary = lines[-2]
    assert summary.split("\r\033[K")[-1].startswith("partial: 25 calls")


def test_empty_calls_file_is_nothing_to_do_but_no_input_is_exit_2(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing today\n\n")
    res = invoke("run", "--calls-file", str(empty), "--output", str(tmp_path / "w.duckdb"))
    assert res.exit_code == 0, res.stderr
    assert res.stderr.strip() == f"nothing to do: {empty} lists no call IDs"
    assert not (tmp_path / "w.duckdb").exists()
    res = invoke("run", "--calls-file", "-", "--output", str(tmp_path / "w.duckdb"), stdin="")
    assert res.exit_code == 0 and "nothing to do" in res.stderr
    res = invoke("run", "--output", str(tmp_path / "w.duckdb"))
    assert res.exit_code == 2 and "no call IDs given" in res.stderr


def test_run_report_and_status_detect_an_existing_parquet_output(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=20, seed=3)
    lake = tmp_path / "lake"
    ids = _ids(tmp_path, box.data.call_ids[:10])
    first = invoke("run", "--calls-file", ids, "--format", "parquet", "--output", str(lake), "--base-url", box.base_url)
    assert first.exit_code == 0, first.stderr
    more = _ids(tmp_path, box.data.call_ids)
    second = invoke("run", "--calls-file", more, "--output", str(lake) + "/", "--base-url", box.base_url)
    assert second.exit_code == 0, second.stderr  # no --format: the Parquet folder is detected
    assert "10 call(s) already loaded, skipped" in second.stderr
    assert not list(tmp_path.glob("*.duckdb")) and not (lake / "call_stages" / "_delta_log").exists()
    status = invoke("status", "--output", str(lake), "--format", "json")
    assert status.exit_code == 0, status.stderr
    report = invoke("report", "token_growth_by_model", "--output", str(lake), "--format", "csv")
    assert report.exit_code == 0, report.stderr
    assert report.stdout.count("\n") >= 2


def test_detect_format_of_each_output_kind(tmp_path):
    (tmp_path / "db.duckdb").write_bytes(b"x")
    (tmp_path / "pq" / "call_stages").mkdir(parents=True)
    (tmp_path / "dl" / "call_stages" / "_delta_log").mkdir(parents=True)
    assert detect_format(str(tmp_path / "db.duckdb")) == "duckdb"
    assert detect_format(str(tmp_path / "pq")) == "parquet"
    assert detect_format(str(tmp_path / "dl")) == "delta"
    assert detect_format("s3://bucket/prefix") == "delta"
    assert detect_format(str(tmp_path / "nothing")) is None
    assert warehouse_at(str(tmp_path / "dl")) == ("delta", str(tmp_path / "dl"))
    assert warehouse_at(str(tmp_path / "dl"), "parquet") == ("parquet", str(tmp_path / "dl"))
    assert warehouse_at(str(tmp_path / "nothing")) == ("duckdb", str(tmp_path / "nothing"))


def test_wait_seconds_gives_up_with_exit_2_naming_the_wait(tmp_path, start_sandbox):
    from pipeline.lock import OutputLock

    box = start_sandbox(n_calls=5)
    db = tmp_path / "w.duckdb"
    ids = _ids(tmp_path, box.data.call_ids)
    assert invoke("run", "--calls-file", ids, "--output", str(db), "--base-url", box.base_url).exit_code == 0
    holder = OutputLock(tmp_path / "w.duckdb.lock")
    holder.acquire()
    try:
        res = invoke("run", "--calls-file", ids, "--output", str(db), "--base-url", box.base_url,
                     "--refresh", "--wait-seconds", "0.3")
    finally:
        holder.release()
    assert res.exit_code == 2, res.stderr
    assert "after waiting 0.3 s" in res.stderr
    res = invoke("run", "--calls-file", ids, "--output", str(db), "--base-url", box.base_url,
                 "--refresh", "--wait-seconds", "5")
    assert res.exit_code == 0, res.stderr


def test_settled_deleted_calls_are_not_committed_again(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=40, seed=33)
    db = tmp_path / "w.duckdb"
    assert invoke("run", "--incremental", "--output", str(db), "--base-url", box.base_url).exit_code == 0
    doomed = box.data.call_ids[5]
    box.data.mark_deleted(doomed, "2025-06-20T00:00:00Z")
    for _ in range(3):
        res = invoke("run", "--incremental", "--output", str(db), "--base-url", box.base_url)
        assert res.exit_code == 0, res.stderr
    rows = query(db, "SELECT status, error, attempts FROM etl_calls WHERE call_id = ?", [doomed])
    assert rows == [("not_found", "deleted in Ultravox", 2)]  # loaded once, settled once
    assert query(db, "SELECT count(*) FROM call_stages WHERE call_id = ?", [doomed]) == [(0,)]


def test_a_key_that_cannot_be_sent_is_exit_2_before_any_request(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=5)
    res = invoke("run", "--calls-file", _ids(tmp_path, box.data.call_ids), "--output", str(tmp_path / "w.duckdb"),
                 "--base-url", box.base_url, key="uvx-key\x01with-control")
    assert res.exit_code == 2, res.stderr
    assert box.stats.requests == 0 and "\x01" not in res.stderr


def _commands():
    return sorted(cli.commands.items())


@pytest.mark.parametrize("name, command", _commands())
def test_every_command_has_an_example_and_every_option_help(name, command):
    res = invoke(name, "--help")
    assert res.exit_code == 0
    assert "Example:" in res.stdout and f"ultravox-stages {name}" in res.stdout
    undocumented = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
    assert not undocumented


def test_top_level_help_cuts_no_description_and_run_help_names_the_key():
    top = invoke("--help")
    commands = top.stdout.split("Commands:")[1]
    assert "..." not in commands and "…" not in commands
    assert set(cli.commands) <= {line.split()[0] for line in commands.strip().splitlines()}
    assert "ULTRAVOX_API_KEY" in invoke("run", "--help").stdout
    assert "4 warehouse or internal error" in top.stdout


def test_broken_pipe_on_stdout_ends_quietly(tmp_path):
    # The reader is gone before the command writes anything: its first write hits EPIPE.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "report"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 0, stderr
    assert stderr == ""


def test_stdout_closed_in_process_is_quiet(monkeypatch):
    def gone(*_args, **_kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli_module.click, "echo", gone)
    res = invoke("report")
    assert res.exit_code == 0 and res.stderr == ""


def test_expected_figures_in_process(tmp_path, start_sandbox):
    from test_e2e_run import assert_matches

    box = start_sandbox(n_calls=50, seed=12)
    db = tmp_path / "w.duckdb"
    res = invoke("run", "--calls-file", _ids(tmp_path, box.data.call_ids), "--output", str(db), "--base-url", box.base_url)
    assert res.exit_code == 0, res.stderr
    assert_matches(db, expected_for(box.data, box.data.call_ids))


def test_sandbox_hostile_and_prompt_options_reach_the_simulated_api(monkeypatch):
    from pipeline import sandbox as sb

    served = {}
    monkeypatch.setattr(sb, "serve", lambda data, options, host, port: served.update(data=data, options=options))
    res = invoke("sandbox", "--calls", "7", "--hostile", "echo_key", "--hostile", "lone_surrogate",
                 "--hostile-share", "0.5", "--big-prompts", "--huge-prompt-calls", "1")
    assert res.exit_code == 0, res.stderr
    options, data = served["options"], served["data"]
    assert options.hostile == ("echo_key", "lone_surrogate") and options.hostile_share == 0.5
    assert data.big_prompts and data.huge_prompt_calls == 1 and len(data.call_ids) == 7
    bad = invoke("sandbox", "--hostile", "no_such_kind")
    assert bad.exit_code == 2 and "no_such_kind" in bad.stderr


def test_bad_flags_are_one_json_line_when_json_logs_are_asked_for(cli):
    res = cli("run", "--log-format", "json", "--concurrency", "many")
    assert res.code == 2
    [line] = res.stderr.splitlines()
    error = json.loads(line)
    assert error["event"] == "error" and error["exit_code"] == 2 and "--concurrency" in error["message"]
    text = cli("run", "--concurrency", "many")
    assert text.code == 2 and "Usage:" in text.stderr
    assert cli("--version").code == 0 and cli("run", "--help").code == 0


def test_replay_rebuilds_the_same_warehouse_and_ends_like_run(tmp_path, start_sandbox, monkeypatch):
    from test_e2e_run import figures

    monkeypatch.setattr("pipeline.log.JSON_PROGRESS_EVERY", 0.0)
    box = start_sandbox(n_calls=40, seed=14)
    db, raw = tmp_path / "w.duckdb", tmp_path / "raw"
    res = invoke("run", "--calls-file", _ids(tmp_path, box.data.call_ids), "--output", str(db),
                 "--base-url", box.base_url, "--raw-dir", str(raw))
    assert res.exit_code == 0, res.stderr
    rebuilt = tmp_path / "rebuilt.duckdb"
    res = invoke("replay", str(raw), "--output", str(rebuilt), "--log-format", "json")
    assert res.exit_code == 0, res.stderr
    events = [json.loads(line) for line in res.stderr.splitlines()]
    assert events[0]["event"] == "run_started" and events[-1]["event"] == "run_finished"
    assert [e for e in events if e["event"] == "progress"][-1]["calls_done"] == 40
    assert figures(rebuilt)[1] == figures(db)[1]
    text = invoke("replay", str(raw), "--output", str(tmp_path / "again.duckdb"), "--progress")
    assert text.exit_code == 0
    assert text.stderr.split("\r\033[K")[-1].startswith("succeeded: 40 calls")


def test_an_outage_stops_the_run_with_exit_3_recorded_unreachable(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=200, seed=15)
    from pipeline.sandbox import Sandbox, SandboxOptions

    down = Sandbox(box.data, SandboxOptions(api_key=KEY, always_fail=frozenset(box.data.call_ids))).start()
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text("outage_calls = 5\nmax_attempts = 2\nbackoff_initial_seconds = 0.001\nbackoff_max_seconds = 0.002\n")
        db = tmp_path / "w.duckdb"
        res = invoke("run", "--calls-file", _ids(tmp_path, box.data.call_ids), "--output", str(db),
                     "--base-url", down.base_url, "--config", str(cfg), "--concurrency", "2")
    finally:
        down.stop()
    assert res.exit_code == 3, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")
    [(status, failed)] = query(db, "SELECT status, calls_failed FROM etl_runs")
    assert status == "unreachable" and failed < 200  # stopped early, no retry storm
    assert down.stats.stage_requests < 200


def test_tables_query_and_maintain_on_a_detected_delta_output(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=30, seed=16)
    lake = tmp_path / "delta"
    ids = box.data.call_ids
    res = invoke("run", "--calls-file", _ids(tmp_path, ids[:15]), "--format", "delta", "--output", str(lake),
                 "--base-url", box.base_url)
    assert res.exit_code == 0, res.stderr
    res = invoke("run", "--calls-file", _ids(tmp_path, ids), "--output", str(lake), "--base-url", box.base_url)
    assert res.exit_code == 0, res.stderr  # the Delta folder is detected: no --format
    expected = expected_for(box.data, ids)
    tables = json.loads(invoke("tables", "--output", str(lake), "--format", "json").stdout)
    rows = {t["name"]: t["rows"] for t in tables} if isinstance(tables, list) else {}
    assert rows.get("call_stages") == expected.stages, tables
    counted = invoke("query", "SELECT count(*) AS n FROM call_stages", "--output", str(lake), "--format", "csv")
    assert counted.exit_code == 0 and counted.stdout.split() == ["n", str(expected.stages)]
    refused = invoke("query", "DELETE FROM call_stages", "--output", str(lake))
    assert refused.exit_code == 2
    maintained = invoke("maintain", "--output", str(lake), "--retention-hours", "0")
    assert maintained.exit_code == 0, maintained.stderr
    assert "call_stages:" in maintained.stdout
    again = invoke("query", "SELECT count(*) AS n FROM call_stages", "--output", str(lake), "--format", "csv")
    assert again.stdout.split() == ["n", str(expected.stages)]


def test_maintain_refuses_an_output_that_is_not_delta(tmp_path):
    (tmp_path / "w.duckdb").write_bytes(b"")
    res = invoke("maintain", "--output", str(tmp_path / "w.duckdb"))
    assert res.exit_code == 2 and "Delta" in res.stderr

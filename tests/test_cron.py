"""Cron-style operation: real signals on the real CLI in a subprocess, exit codes, ghost runs.
What follows a stopped run (status, the rerun) runs in-process."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from conftest import KEY, expected_for, write_ids
from conftest import invoke_cli as run_cli
from test_e2e_run import assert_matches

#: Small batches, so a run commits (and lands raw pages) many times before it ends.
CONFIG = "batch_stages = 20\nmax_attempts = 3\nbackoff_initial_seconds = 0.01\nbackoff_max_seconds = 0.02\n"
START_DEADLINE_SECONDS = 60


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ULTRAVOX_API_KEY", "ULTRAVOX_STAGES_DEBUG")}
    env["ULTRAVOX_API_KEY"] = KEY
    return env


class Running:
    """The CLI in a subprocess, its stderr collected by a thread (never blocks the test)."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code, "".join(self.lines)


def _setup(tmp_path: Path, box, fmt: str = "duckdb"):
    out = tmp_path / ("w.duckdb" if fmt == "duckdb" else "w-lake")
    raw = tmp_path / "raw"
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids))
    args = ["run", "--calls-file", ids, "--output", str(out), "--base-url", box.base_url, "--format", fmt,
            "--config", str(cfg), "--raw-dir", str(raw), "--concurrency", "2"]
    return out, raw, args


def _wait_until_committing(running: Running, raw: Path) -> None:
    """Until the run has landed (and so is committing) batches: a kill before that proves nothing."""
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while True:
        partial = list(raw.glob(".*.partial")) if raw.exists() else []
        if partial and partial[0].stat().st_size > 200:
            return
        assert running.proc.poll() is None, "the run ended before it could be stopped: " + "".join(running.lines)
        assert time.monotonic() < deadline, "the run never started committing"
        time.sleep(0.05)


def _wait_until_requesting(running: Running, box, requests_before: int) -> None:
    """Until the sandbox has served the run a request: proof the CLI had started."""
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while box.stats.requests == requests_before:
        assert running.proc.poll() is None, "the run ended before asking anything: " + "".join(running.lines)
        assert time.monotonic() < deadline, "the run never reached the API"
        time.sleep(0.01)


def _query(db: Path, sql: str):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def _landed_call_ids(raw: Path) -> list[str]:
    ids = []
    for path in sorted(raw.glob("*.jsonl.gz")):
        ids += [json.loads(line)["call_id"] for line in gzip.decompress(path.read_bytes()).splitlines()]
    return ids


def _no_more_latency(box) -> None:
    """The latency only keeps the stopped run busy; what follows it needs none."""
    box.options.latency_ms = 0


def _stop_and_check(tmp_path, box, sig: int, expected_code: int, log_format: str):
    db, raw, args = _setup(tmp_path, box)
    running = Running(args + ["--log-format", log_format])
    _wait_until_committing(running, raw)
    running.proc.send_signal(sig)
    code, stderr = running.finish()
    _no_more_latency(box)
    assert code == expected_code, stderr
    last = stderr.strip().splitlines()[-1]
    name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
    if log_format == "json":
        event = json.loads(last)
        assert event["event"] == "interrupted" and event["exit_code"] == expected_code
        assert name in event["message"]
        assert all(json.loads(line) for line in stderr.strip().splitlines())
    else:
        assert last.startswith(f"interrupted by {name}: ") and "run again" in last
    [(status, loaded, requested)] = _query(db, "SELECT status, calls_loaded, calls_requested FROM etl_runs")
    assert status == "interrupted"
    assert 0 < loaded < requested == len(box.data.call_ids)  # stopped mid-way, after real commits
    # The raw file is closed properly: renamed into place, holding exactly the committed calls.
    assert not list(raw.glob(".*"))
    committed = {r[0] for r in _query(db, "SELECT call_id::VARCHAR FROM etl_calls")}
    landed = _landed_call_ids(raw)
    assert set(landed) == committed and len(committed) == loaded + _query(
        db, "SELECT count(*) FROM etl_calls WHERE status <> 'loaded'")[0][0]

    assert run_cli("status", "--output", str(db)).code == 1  # the last run did not succeed
    rest = run_cli(*args)
    assert rest.code == 0, rest.stderr
    assert f"{len(committed)} call(s) already loaded, skipped" in rest.stderr
    assert_matches(db, expected_for(box.data, box.data.call_ids))  # exact, primary keys unique
    assert sorted(set(_landed_call_ids(raw))) == sorted(box.data.call_ids)
    assert run_cli("status", "--output", str(db)).code == 0


def test_sigterm_commits_what_was_fetched_records_interrupted_exit_143(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=80, seed=51, latency_ms=60)
    _stop_and_check(tmp_path, box, signal.SIGTERM, 143, "json")


def test_ctrl_c_is_the_same_with_exit_130_and_one_text_line(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=80, seed=52, latency_ms=60)
    _stop_and_check(tmp_path, box, signal.SIGINT, 130, "text")


def test_kill_9_leaves_a_ghost_that_status_and_the_next_run_mark_crashed(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=80, seed=53, latency_ms=60)
    db, raw, args = _setup(tmp_path, box)
    running = Running(args)
    _wait_until_committing(running, raw)
    running.proc.send_signal(signal.SIGKILL)
    running.finish()
    _no_more_latency(box)
    status = run_cli("status", "--output", str(db), "--format", "json")
    assert status.code == 1, status.stdout + status.stderr
    rest = run_cli(*args)
    assert rest.code == 0, rest.stderr
    runs = _query(db, "SELECT status FROM etl_runs ORDER BY started_at")
    assert runs == [("crashed",), ("succeeded",)]
    assert_matches(db, expected_for(box.data, box.data.call_ids))
    assert not list(raw.glob(".*"))


@pytest.mark.slow
def test_sigterm_at_random_moments_then_rerun_is_exact(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=200, seed=54, latency_ms=20)
    db, raw, args = _setup(tmp_path, box)
    rng = random.Random(7)
    for _ in range(10):  # a fixed number of rounds
        requests_before = box.stats.requests
        running = Running(args + ["--refresh"])
        _wait_until_requesting(running, box, requests_before)
        time.sleep(rng.uniform(0, 1.5))  # fetching or committing
        running.proc.send_signal(signal.SIGTERM)
        code, stderr = running.finish()
        assert code in (0, 143), stderr
        assert "Traceback" not in stderr
        assert not list(raw.glob(".*.partial"))
    final = run_cli(*args)
    assert final.code == 0, final.stderr
    assert_matches(db, expected_for(box.data, box.data.call_ids))
    statuses = {r[0] for r in _query(db, "SELECT status FROM etl_runs")}
    assert statuses <= {"interrupted", "succeeded"}

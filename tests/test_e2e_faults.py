"""Faults, crashes and overlapping runs: the warehouse ends exact every time."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from conftest import KEY, expected_for, invoke_cli, write_ids
from test_e2e_run import assert_matches, figures

RETRY_FAST = (
    "max_attempts = 12\ncall_retry_budget = 60\nbackoff_initial_seconds = 0.005\n"
    "backoff_max_seconds = 0.05\nretry_after_max_seconds = 0.05\n"
)


def config(tmp_path, text=RETRY_FAST):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_400_calls_at_20_percent_faults_exact(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=400, seed=21, fault_rate=0.2, retry_after="0")
    db = tmp_path / "w.duckdb"
    ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids))
    res = cli("run", "--calls-file", ids, "--output", str(db), "--base-url", box.base_url,
              "--config", config(tmp_path), "--page-size", "5")
    assert res.code == 0, res.stderr
    assert_matches(db, expected_for(box.data, box.data.call_ids))
    with duckdb.connect(str(db), read_only=True) as con:
        retries = con.execute("SELECT http_retries FROM etl_runs").fetchall()[0][0]
    assert retries > 40  # the faults really happened and were retried (about one request in four)


def _spawn_run(args, env):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "ULTRAVOX_API_KEY"}
    env["ULTRAVOX_API_KEY"] = KEY
    return env


def _wait_until_fetching(proc, box, fetched_before):
    """Proof the CLI had started: the sandbox has served it a stages request."""
    deadline = time.monotonic() + 60  # a hang guard, not a timing assertion
    while box.stats.stage_requests == fetched_before:
        assert proc.poll() is None, f"the run ended before fetching anything: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the run never fetched a call"
        time.sleep(0.01)


def _kill_loop(tmp_path, box, fmt, kills, seed):
    rng = random.Random(seed)
    out = tmp_path / ("w.duckdb" if fmt == "duckdb" else "w-parquet")
    ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids))
    cfg = tmp_path / "c.toml"
    cfg.write_text(RETRY_FAST + "batch_stages = 40\n")
    args = ["--calls-file", ids, "--output", str(out), "--base-url", box.base_url, "--format", fmt,
            "--config", str(cfg), "--refresh", "--concurrency", "4"]
    for _ in range(kills):
        fetched_before = box.stats.stage_requests
        proc = _spawn_run(args, _env())
        _wait_until_fetching(proc, box, fetched_before)
        time.sleep(rng.uniform(0, 0.5))  # fetching, transforming or committing
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = invoke_cli("run", *args[:-3])  # the rerun needs no process of its own
    assert final.code == 0, final.stderr
    return out


def test_kill_9_at_random_moments_then_rerun_is_exact_duckdb(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=150, seed=4, latency_ms=5)
    db = _kill_loop(tmp_path, box, "duckdb", kills=2, seed=1)  # many more in test_kill_9_many_times_duckdb
    assert_matches(db, expected_for(box.data, box.data.call_ids))


@pytest.mark.slow
def test_kill_9_many_times_duckdb(tmp_path, start_sandbox):
    box = start_sandbox(n_calls=300, seed=5, latency_ms=5, fault_rate=0.05, retry_after="0")
    db = _kill_loop(tmp_path, box, "duckdb", kills=25, seed=2)
    assert_matches(db, expected_for(box.data, box.data.call_ids))


def test_a_cap_far_above_the_servers_limit_is_learnt_from_the_first_429s(tmp_path, start_sandbox, cli):
    """The CLI with --max-rps 1000 against a server admitting 50 requests/s, among other
    faults: the rate ramps from 200/s, meets the limit once and stays under it (a client
    that kept its pace would have about three requests in four answered 429), and the
    warehouse is exact."""
    box = start_sandbox(n_calls=150, seed=8, latency_ms=20, rate_limit_rps=50, fault_rate=0.05, retry_after="0",
                        faults=("500", "503", "reset", "truncated", "invalid_json"))
    db = tmp_path / "w.duckdb"
    ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids))
    cfg = config(tmp_path, "max_attempts = 12\ncall_retry_budget = 60\nbackoff_initial_seconds = 0.005\nbackoff_max_seconds = 0.05\n")
    res = cli("run", "--calls-file", ids, "--output", str(db), "--base-url", box.base_url, "--config", cfg,
              "--max-rps", "1000", "--page-size", "5")
    assert res.code == 0, res.stderr
    assert_matches(db, expected_for(box.data, box.data.call_ids))
    requests = sum(box.stats.by_status.values())
    assert 0 < box.stats.throttled <= 0.1 * requests, (box.stats.throttled, requests)


def test_killed_while_big_prompts_wait_in_the_wal_for_a_checkpoint_then_rerun_is_exact(tmp_path):
    """100 KB prompts make the DuckDB output hold off DuckDB's own checkpoints until a row
    group's worth of stages came in: what was committed before a kill -9 is only in the
    WAL, and a SIGTERM stops while stages wait there. The rerun ends exact, every prompt
    whole."""
    from pipeline.sandbox import Sandbox, SandboxOptions, SyntheticData

    box = Sandbox(SyntheticData(n_calls=120, seed=6, big_prompts=True), SandboxOptions(api_key=KEY, latency_ms=5))
    box.start()
    try:
        db = tmp_path / "w.duckdb"
        wal = tmp_path / "w.duckdb.wal"
        ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids))
        cfg = tmp_path / "c.toml"
        cfg.write_text(RETRY_FAST + "batch_stages = 40\n")
        args = ["--calls-file", ids, "--output", str(db), "--base-url", box.base_url, "--config", str(cfg),
                "--refresh", "--concurrency", "4"]
        for sig, code in [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)]:
            fetched_before = box.stats.stage_requests
            proc = _spawn_run(args, _env())
            _wait_until_fetching(proc, box, fetched_before)  # opened: the last WAL is replayed and gone
            deadline = time.monotonic() + 60  # a hang guard, not a timing assertion
            while not (wal.exists() and wal.stat().st_size > 1 << 20):  # committed, long strings in the WAL
                assert proc.poll() is None, f"the run ended before committing big prompts: {proc.stderr.read()}"
                assert time.monotonic() < deadline, "no commit reached the WAL"
                time.sleep(0.005)
            proc.send_signal(sig)
            assert proc.wait() == code, proc.stderr.read()
        final = invoke_cli("run", *args[:-3])
        assert final.code == 0, final.stderr
        assert_matches(db, expected_for(box.data, box.data.call_ids))
        served = sorted(len(s["systemPrompt"] or "") for c in box.data.call_ids for s in box.data.stages_for(c))
        with duckdb.connect(str(db), read_only=True) as con:
            stored = sorted(n for (n,) in con.execute("SELECT coalesce(length(system_prompt), 0) FROM call_stages").fetchall())
        assert stored == served and served[-1] >= 100_000
    finally:
        box.stop()


def test_overlapping_run_exits_2_naming_the_holder_or_waits(tmp_path, start_sandbox, cli):
    box = start_sandbox(n_calls=60, latency_ms=100)
    db = tmp_path / "w.duckdb"
    ids = str(write_ids(tmp_path / "ids.txt", box.data.call_ids))
    args = ["--calls-file", ids, "--output", str(db), "--base-url", box.base_url, "--concurrency", "2"]
    first = _spawn_run(args, _env())
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "w.duckdb.lock").exists() or not (tmp_path / "w.duckdb.lock").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = cli("run", *args)
        assert second.code == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "--wait" in second.stderr
        box.options.latency_ms = 0  # the latency only kept the first run holding the lock
        waited = cli("run", *args, "--wait")
        assert waited.code == 0, waited.stderr
    finally:
        first.wait(timeout=60)
    assert first.returncode == 0
    assert_matches(db, expected_for(box.data, box.data.call_ids))
    assert figures(db)[0][1] == expected_for(box.data, box.data.call_ids).stages

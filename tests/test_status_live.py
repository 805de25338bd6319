"""`status` and `report` while another process is writing the output, and after it died."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.load import open_warehouse, query_connection
from pipeline.records import RunRecord, utcnow
from test_warehouse_hardening import call_id, commit, stage, stage_id

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("duckdb", "parquet")

#: A writer stopped mid-run: 3 of 10 calls committed, progress published, then asleep.
WRITER = """
import sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
from pipeline.load import open_warehouse
from pipeline.records import RunRecord, utcnow
from test_warehouse_hardening import call_id, commit, stage, stage_id
wh = open_warehouse(sys.argv[1], Path(sys.argv[2]))
wh.open()
run = RunRecord("run-live", utcnow(), "0.1.0", {})
run.calls_requested = 10
wh.save_run(run)
wh.publish(run)
for c in (11, 12, 13):
    for outcome in commit(wh, [(call_id(c), [stage(call_id(c), stage_id(c), c)])], run_id=run.run_id):
        run.count(outcome)
wh.publish(run)
print("ready", flush=True)
time.sleep(300)
"""


def output(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("out.duckdb" if fmt == "duckdb" else "out")


def finished_run(out: Path, fmt: str, status: str) -> None:
    with open_warehouse(fmt, out) as wh:
        commit(wh, [(call_id(1), [stage(call_id(1), stage_id(1), 1)])], run_id="run-done")
        wh.save_run(RunRecord("run-done", utcnow(), "0.1.0", {}, status=status, finished_at=utcnow()))


@pytest.fixture
def start_writer() -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(fmt: str, out: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, fmt, str(out), str(ROOT)], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def stored_runs(fmt: str, out: Path) -> dict[str, str]:
    con = query_connection(fmt, out)
    try:
        return dict(con.execute("SELECT run_id, status FROM etl_runs").fetchall())
    finally:
        con.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_status_during_a_run_names_it_and_stays_healthy(tmp_path: Path, fmt: str, cli, start_writer) -> None:
    out = output(tmp_path, fmt)
    finished_run(out, fmt, "succeeded")
    writer = start_writer(fmt, out)
    res = cli("status", "--output", str(out), key=None)
    assert res.code == 0, res.stdout + res.stderr
    assert "OK" in res.stdout and "Run run-live is writing now" in res.stdout and f"pid {writer.pid}" in res.stdout
    assert "3/10 calls done (3 loaded" in res.stdout
    doc = json.loads(cli("status", "--output", str(out), "--format", "json", key=None).stdout)
    assert doc["healthy"] is True and doc["last_finished_run"]["run_id"] == "run-done"
    assert doc["writing_now"]["pid"] == writer.pid and doc["writing_now"]["run"]["calls_loaded"] == 3


def test_report_during_a_duckdb_run_says_so_in_one_line(tmp_path: Path, cli, start_writer) -> None:
    out = output(tmp_path, "duckdb")
    finished_run(out, "duckdb", "succeeded")
    writer = start_writer("duckdb", out)
    res = cli("report", "stages_per_call", "--output", str(out), key=None)
    assert res.code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        f"a run is writing this output (run run-live, pid {writer.pid}); try again when it finishes"
    ), res.stderr


@pytest.mark.parametrize("fmt", FORMATS)
def test_status_during_a_run_after_a_failed_run_is_unhealthy(tmp_path: Path, fmt: str, cli, start_writer) -> None:
    out = output(tmp_path, fmt)
    finished_run(out, fmt, "partial")
    start_writer(fmt, out)
    res = cli("status", "--output", str(out), key=None)
    assert res.code == 1 and "did not succeed (partial)" in res.stdout and "run-live" in res.stdout


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_killed_run_is_reported_and_recorded_crashed(tmp_path: Path, fmt: str, cli, start_writer) -> None:
    out = output(tmp_path, fmt)
    finished_run(out, fmt, "succeeded")
    writer = start_writer(fmt, out)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    res = cli("status", "--output", str(out), key=None)
    assert res.code == 1 and "did not succeed (crashed)" in res.stdout, res.stdout + res.stderr
    assert stored_runs(fmt, out) == {"run-done": "succeeded", "run-live": "crashed"}  # status took the free lock
    doc = json.loads(cli("status", "--output", str(out), "--format", "json", key=None).stdout)
    assert doc["healthy"] is False and doc["writing_now"] is None
    assert doc["last_finished_run"]["run_id"] == "run-live" and doc["last_finished_run"]["status"] == "crashed"


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    source, view = tmp_path / "src", tmp_path / "ro"
    source.mkdir()
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount (needs root and mount rights)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only")
        yield source, view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_dead_run_on_a_read_only_output_is_reported_crashed(read_only_view, fmt: str, cli, start_writer) -> None:
    source, view = read_only_view
    finished_run(output(source, fmt), fmt, "succeeded")
    writer = start_writer(fmt, output(source, fmt))
    writer.kill()
    writer.wait()
    res = cli("status", "--output", str(output(view, fmt)), key=None)
    assert res.code == 1 and "crashed" in res.stdout, res.stdout + res.stderr
    assert stored_runs(fmt, output(view, fmt))["run-live"] == "running"  # nothing could be written

"""`replay` reads and transforms in a second process: its failures, stop signals and
kill -9 must end both processes cleanly and leave the warehouse exact."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from click.testing import CliRunner

import pipeline.replay_reader as replay_reader
from pipeline import columns
from conftest import eventually
from pipeline.batch import PreparedBatch
from pipeline.cli import cli
from pipeline.load import lock_file, query_connection
from pipeline.replay_reader import ReaderError, ReplayReader, messages
from pipeline.sandbox import SyntheticData, write_landing_zone

ROOT = Path(__file__).resolve().parent.parent


def _landing_zone(raw: Path, n_calls: int, seed: int = 5) -> SyntheticData:
    data = SyntheticData(n_calls=n_calls, seed=seed)
    write_landing_zone(raw, ((call_id, data.stages_for(call_id)) for call_id in data.call_ids))
    return data


def _readers_of(raw: Path) -> list[int]:
    """Pids of live reader processes working on ``raw`` (their command line names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if b"pipeline.replay_reader" in cmdline and str(raw).encode() in cmdline and "zombie" not in state:
            pids.append(int(entry.name))
    return pids


def _live_run(lock: Path) -> dict:
    """The run as its lock file publishes it ({} before it has started)."""
    try:
        return json.loads(lock.read_text() or "{}").get("run") or {}
    except (OSError, ValueError):
        return {}


def _calls_committed(lock: Path) -> int:
    return int(_live_run(lock).get("calls_loaded") or 0)


def _stored(db: Path, sql: str):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")


def test_replay_from_a_script_without_a_main_guard_loads_everything_and_leaves_no_reader(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    data = _landing_zone(raw, 120)
    db = tmp_path / "w.duckdb"
    # A second process started by multiprocessing's spawn would run this script again.
    script = tmp_path / "replay_it.py"
    script.write_text(
        "from pathlib import Path\n"
        "from pipeline.config import Settings\n"
        "from pipeline.log import Reporter\n"
        "from pipeline.runner import run_replay\n"
        f"result = run_replay(Path({str(raw)!r}), Settings(output={str(db)!r}, replay_batch_stages=100), Reporter(progress=False))\n"
        "print('loaded', result.run.stages_loaded)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    expected = sum(len(data.stages_for(c)) for c in data.call_ids)
    assert done.stdout.split() == ["loaded", str(expected)]
    assert _stored(db, "SELECT count(*), count(DISTINCT call_stage_id) FROM call_stages") == [(expected, expected)]
    assert _readers_of(raw) == []


def test_a_reader_that_dies_fails_the_replay_with_one_line_exit_4_and_the_run_crashed(tmp_path: Path, monkeypatch) -> None:
    raw = tmp_path / "raw"
    _landing_zone(raw, 60)
    started = ReplayReader.__init__

    def start_then_die(self, *args, **kwargs):
        started(self, *args, **kwargs)
        self._process.kill()  # as the OOM killer would

    monkeypatch.setattr(ReplayReader, "__init__", start_then_die)
    db = tmp_path / "w.duckdb"
    result = CliRunner().invoke(cli, ["replay", str(raw), "--output", str(db), "--no-progress"])
    assert result.exit_code == 4, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "replay reader process died" in lines[0] and "Traceback" not in result.stderr
    assert _stored(db, "SELECT status FROM etl_runs") == [("crashed",)]
    assert _readers_of(raw) == []


def _rows(tables) -> dict[str, list[dict]]:
    """Rows by table (Arrow tables or the reader's columns), without the batch's extraction time."""
    tables = {name: t if isinstance(t, pa.Table) else columns.to_arrow(t) for name, t in tables.items()}
    return {name: t.drop_columns([c for c in ("extracted_at",) if c in t.column_names]).to_pylist() for name, t in tables.items()}


def _reader_in_fork(*args) -> ReplayReader:
    """The reader's main function in a forked child (it sets signal dispositions), and
    the committing end of its pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            replay_reader._reader_main(write_fd, *args)
        finally:
            os._exit(0)
    os.close(write_fd)
    reader = object.__new__(ReplayReader)
    reader._conn = replay_reader.Connection(read_fd, writable=False)
    reader._process = _Forked(pid)
    return reader


class _Forked:
    """The Popen methods ReplayReader uses, for a forked child."""

    stdin = None  # the forked reader reads at once

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def test_a_reader_killed_in_the_middle_of_a_table_frame_is_a_dead_reader_not_a_traceback(tmp_path: Path, monkeypatch) -> None:
    raw = tmp_path / "raw"
    _landing_zone(raw, 30)
    real = replay_reader._write_all

    def die_halfway(fd, view):
        if len(view) > 1000:  # a table's bytes, not its length
            real(fd, view[: len(view) // 2])
            os._exit(137)  # as the OOM killer would, mid-write
        real(fd, view)

    monkeypatch.setattr(replay_reader, "_write_all", die_halfway)
    with _reader_in_fork(str(raw), 40, 1 << 20, "run-y") as reader:
        with pytest.raises(ReaderError) as died:
            list(messages([reader], lambda: False))
    assert str(died.value) == "the replay reader process died (exit code 137); run replay again"


def test_a_failure_inside_the_reader_reaches_the_replay_as_one_line(tmp_path: Path, monkeypatch) -> None:
    def broken(*_args, **_kwargs):
        raise MemoryError("no room for the batch of prompt text")
        yield  # a generator, like the real one

    monkeypatch.setattr(replay_reader, "read_batches", broken)
    with _reader_in_fork(str(tmp_path), 10, 1000, "run-x") as reader:
        with pytest.raises(ReaderError) as failed:
            next(messages([reader], lambda: False))
    # The exception's own text is not shown: it may quote data.
    assert str(failed.value) == "the replay reader failed (MemoryError); run replay again, and report it if it happens again"
    assert failed.value.exit_code == 4


def test_messages_carry_tables_outcomes_and_bad_lines_through_the_pipe(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    data = _landing_zone(raw, 30)
    (raw / "hand.jsonl").write_text("not json\n")
    expected = list(replay_reader.read_batches(raw, 40, 1 << 20, "run-y"))
    received = []
    with _reader_in_fork(str(raw), 40, 1 << 20, "run-y") as reader:
        received = [message for _, message in messages([reader], lambda: False)]
    assert len(received) == len(expected) > 2
    for got, want in zip(received, expected, strict=True):
        assert [(b.where, b.reason) for b in got.bad_lines] == [(b.where, b.reason) for b in want.bad_lines]
        if want.batch is None:
            assert got.batch is None
            continue
        assert got.batch.outcomes == want.batch.outcomes
        assert _rows(got.batch.tables) == _rows(want.batch.tables)
    assert sum(len(m.bad_lines) for m in received) == 1
    assert sum(o.stage_count or 0 for m in received if m.batch for o in m.batch.outcomes) == sum(
        len(data.stages_for(c)) for c in data.call_ids)


def test_table_frames_cross_a_pipe_intact_bigger_than_the_pipe_with_nulls_and_every_type() -> None:
    from pipeline import schema

    def voices(n: int, text: int) -> columns.TableColumns:
        values = {"call_stage_id": [f"s{i}" for i in range(n)], "call_id": ["c"] * n, "role": ["external"] * n,
                  "provider": [None if i % 3 else "lmnt" for i in range(n)], "voice_id": [os.urandom(text).hex()] * n,
                  "model": ["m\u00fc"] * n, "speed": [None if i % 2 else i / 4 for i in range(n)],
                  "settings": [b'{"v":"\xc3\xa9"}'] * n}
        built = [columns.utf8(values[c.name]) if c.sql_type == schema.JSON else columns.column(c.sql_type, values[c.name])
                 for c in schema.STAGE_VOICES.columns]
        return columns.TableColumns("stage_voices", n, built)

    sizes = [(3, 1 << 20), (1, 5), (0, 0), (1000, 3000), (7, 2 << 20)]  # frames above the 1 MiB pipe take turns
    tables = [voices(n, text) for n, text in sizes]
    expected = [columns.to_arrow(t) for t in tables]
    read_fd, write_fd = os.pipe()
    receiving, sending = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    sender = replay_reader._FrameSender(sending)
    got: list[pa.Table] = []

    def receive() -> None:
        for _ in tables:
            _, _, layouts = pickle.loads(receiving.recv_bytes())
            got.extend(replay_reader._read_table(read_fd, layout) for layout in layouts)

    thread = threading.Thread(target=receive)
    thread.start()
    for table in tables:
        sender.send(replay_reader.ReplayMessage([], PreparedBatch({"stage_voices": table}, [], [], 1, 0)))
    thread.join(timeout=30)
    receiving.close()
    sending.close()
    assert [t.equals(w) for t, w in zip(got, expected, strict=True)] == [True] * len(sizes)
    assert got[0]["provider"].null_count == 2 and got[3]["speed"].null_count == 500
    # Fixed-width values stay 8-byte aligned inside the received buffer.
    assert all(buf.address % 8 == 0 for t in got for c in t.columns for chunk in c.chunks for buf in chunk.buffers() if buf)


@pytest.fixture(scope="module")
def big_landing_zone(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("big") / "raw"
    _landing_zone(raw, 800, seed=11)
    return raw


def test_sigterm_during_replay_commits_whole_batches_exits_143_and_ends_the_reader(tmp_path: Path, big_landing_zone: Path) -> None:
    db = tmp_path / "w.duckdb"
    config = tmp_path / "small-batches.toml"
    # Small batches, so the reader waits for the commits (a batch's bytes are read ahead) and is alive at the signal.
    config.write_text("replay_batch_stages = 100\nreplay_batch_bytes = 65536\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "replay", str(big_landing_zone), "--output", str(db), "--config", str(config),
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert eventually(lambda: _calls_committed(lock_file("duckdb", db)) > 0 or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    assert _readers_of(big_landing_zone) != []
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "interrupted" and "SIGTERM" in events[-1]["message"]
    assert _readers_of(big_landing_zone) == []
    (status, stages), = _stored(db, "SELECT status, stages_loaded FROM etl_runs")
    assert status == "interrupted"
    # Whole calls only: every call's stored stages are all its stages.
    assert _stored(db, "SELECT count(*) FROM etl_calls c WHERE status = 'loaded' AND stage_count <> "
                       "(SELECT count(*) FROM call_stages s WHERE s.call_id = c.call_id)") == [(0,)]
    assert _stored(db, "SELECT count(*) FROM call_stages") == [(stages,)]


@pytest.mark.parametrize("fmt", ["duckdb", "parquet"])
def test_kill_9_of_replay_takes_the_reader_with_it_and_a_rerun_is_exact(tmp_path: Path, big_landing_zone: Path, fmt: str) -> None:
    """Killed at three moments after its first commit (Parquet: also while folders are
    gathered and written from the batch's slices), then run again to the end."""
    out = tmp_path / ("w.duckdb" if fmt == "duckdb" else "w")
    config = tmp_path / "small-batches.toml"
    # Small batches, so the reader waits for the commits (a batch's bytes are read ahead) and is alive at the kill.
    config.write_text("replay_batch_stages = 100\nreplay_batch_bytes = 65536\n")
    command = [sys.executable, "-m", "pipeline", "replay", str(big_landing_zone), "--format", fmt, "--output", str(out),
               "--config", str(config), "--no-progress"]
    lock = lock_file(fmt, out)
    for delay in (0.0, 0.15, 0.35):  # fixed rounds
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        assert eventually(lambda: (_readers_of(big_landing_zone) != [] and _calls_committed(lock) > 0)
                          or proc.poll() is not None)
        assert proc.poll() is None
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert eventually(lambda: _readers_of(big_landing_zone) == [])
    rerun = subprocess.run(command[:command.index("--config")] + ["--no-progress"], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    with query_connection(fmt, out) as con:
        assert con.execute("SELECT count(*) = count(DISTINCT call_stage_id) FROM call_stages").fetchall() == [(True,)]
        assert con.execute("SELECT status FROM etl_runs ORDER BY started_at").fetchall() == [("crashed",)] * 3 + [("succeeded",)]
        data = SyntheticData(n_calls=800, seed=11)
        assert con.execute("SELECT count(*) FROM call_stages").fetchall() == [(sum(len(data.stages_for(c)) for c in data.call_ids),)]
        for table in ("stage_inactivity_messages", "stage_voices"):  # no child row without its stage
            orphans = f"SELECT count(*) FROM {table} t ANTI JOIN call_stages s USING (call_stage_id)"
            assert con.execute(orphans).fetchall() == [(0,)]


def test_shares_of_the_landing_zone_take_every_call_once_and_report_each_bad_line_once(tmp_path: Path) -> None:
    from pipeline.raw import Share, read_landing_zone

    raw = tmp_path / "raw"
    data = _landing_zone(raw, 90)
    some = data.call_ids[0]
    # Hand-written lines: the call id not first (decoded to be placed), a bad call id, not JSON.
    page = json.dumps({"next": None, "results": data.stages_for(some)})
    (raw / "zz-hand.jsonl").write_text(
        f'{{"status": 200, "page": {page}, "call_id": "{some.upper()}", "url": "u"}}\n'
        '{"call_id": "not-a-uuid", "status": 200, "page": {"results": []}}\n'
        "not json\n"
    )
    whole_bad: list = []
    whole = [(f.call_id, len(f.stages())) for f in read_landing_zone(raw, whole_bad.append)]
    parts, bad = [], []
    for index in range(3):
        parts.extend((f.call_id, len(f.stages())) for f in read_landing_zone(raw, bad.append, Share(index, 3)))
    assert sorted(parts) == sorted(whole) and len({c for c, _ in parts}) == len(parts) - 1  # `some` twice: two files
    assert sorted((b.where, b.reason) for b in bad) == sorted((b.where, b.reason) for b in whole_bad)
    assert len(whole_bad) == 2


def test_two_readers_give_the_tables_one_reader_gives(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _landing_zone(raw, 150)
    (raw / "zz-bad.jsonl").write_text("not json\n")
    tables = {}
    for readers in (1, 2):
        db = tmp_path / f"r{readers}.duckdb"
        config = tmp_path / f"r{readers}.toml"
        config.write_text(f"replay_readers = {readers}\nreplay_batch_stages = 60\n")
        result = CliRunner().invoke(cli, ["replay", str(raw), "--output", str(db), "--config", str(config), "--no-progress"])
        assert result.exit_code == 1, result.output  # the bad line
        assert result.stderr.count("not json") + result.stderr.count("zz-bad.jsonl:1") >= 1
        assert result.stderr.count("zz-bad.jsonl:1") == 1
        tables[readers] = {
            name: _stored(db, f"SELECT * EXCLUDE (run_id, extracted_at) FROM {name} ORDER BY ALL" if name == "call_stages"
                          else f"SELECT * FROM {name} ORDER BY ALL")
            for name in ("call_stages", "stage_inactivity_messages", "stage_voices")
        }
        assert _readers_of(raw) == []
    assert tables[1] == tables[2] and len(tables[1]["call_stages"]) > 100


def test_a_replay_refused_for_a_locked_output_leaves_no_reader_behind(tmp_path: Path) -> None:
    from pipeline.load.duckdb import DuckDBWarehouse

    raw = tmp_path / "raw"
    _landing_zone(raw, 20)
    db = tmp_path / "w.duckdb"
    with DuckDBWarehouse(db):  # another run holds the output
        result = CliRunner().invoke(cli, ["replay", str(raw), "--output", str(db), "--no-progress"])
        assert result.exit_code == 2 and "another run is writing to this output" in result.stderr
        assert _readers_of(raw) == []


def test_big_prompts_in_whole_batches_and_a_60_mb_prompt_replay_exactly(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    data = SyntheticData(n_calls=30, seed=9, big_prompts=True, huge_prompt_calls=1)
    write_landing_zone(raw, ((c, data.stages_for(c)) for c in data.call_ids))
    db = tmp_path / "w.duckdb"
    result = CliRunner().invoke(cli, ["replay", str(raw), "--output", str(db), "--no-progress"])
    assert result.exit_code == 0, result.output
    expected = sum(len(data.stages_for(c)) for c in data.call_ids)
    (stages, unique, longest), = _stored(db, "SELECT count(*), count(DISTINCT call_stage_id), max(length(system_prompt)) "
                                             "FROM call_stages")
    assert stages == unique == expected and longest >= 60_000_000
    huge, = data.huge_prompt_call_ids()
    assert _stored(db, f"SELECT status FROM etl_calls WHERE call_id = '{huge}'") == [("loaded",)]
    sent = {s["callStageId"]: hashlib.md5((s.get("systemPrompt") or "").encode()).hexdigest()
            for c in data.call_ids for s in data.stages_for(c)}
    stored = dict(_stored(db, "SELECT call_stage_id::VARCHAR, md5(coalesce(system_prompt, '')) FROM call_stages"))
    assert stored == sent  # every prompt's text, the 60 MB one included
    assert _readers_of(raw) == []


def _calls_in_shares(data: SyntheticData, count: int) -> list[str]:
    """One call id of ``data`` for each of ``count`` reader shares."""
    from pipeline.raw import Share

    return [next(c for c in data.call_ids if Share(index, count).takes(c)) for index in range(count)]


@pytest.mark.parametrize("fmt", ["duckdb", "parquet"])
@pytest.mark.parametrize("readers", [1, 2])
def test_a_stage_id_under_two_calls_of_one_commit_fails_the_later_call_alone(tmp_path: Path, fmt: str, readers: int) -> None:
    data = SyntheticData(n_calls=40, seed=9)
    first, second = _calls_in_shares(data, 2)
    stolen = data.stages_for(second)[0] | {"callStageId": data.stages_for(first)[0]["callStageId"]}
    calls = [(c, data.stages_for(c)) for c in data.call_ids if c != second] + [(second, [stolen, *data.stages_for(second)[1:]])]
    raw = tmp_path / "raw"
    write_landing_zone(raw, calls)
    out = tmp_path / ("w.duckdb" if fmt == "duckdb" else "w")
    config = tmp_path / "c.toml"
    config.write_text(f"replay_readers = {readers}\n")
    result = CliRunner().invoke(cli, ["replay", str(raw), "--output", str(out), "--format", fmt, "--config", str(config), "--no-progress"])
    assert result.exit_code == 1, result.output
    with query_connection(fmt, out) as con:
        failed = con.execute("SELECT call_id::VARCHAR, error FROM etl_calls WHERE status = 'failed'").fetchall()
        # One reader commits in file order; two hand in their parts in the order they finish them.
        loser, keeper = (second, first) if readers == 1 or failed[0][0] == second else (first, second)
        assert [call for call, _ in failed] == [loser]
        assert stolen["callStageId"] in failed[0][1] and keeper in failed[0][1]
        assert con.execute("SELECT count(*), count(DISTINCT call_stage_id) FROM call_stages").fetchone() == (
            sum(len(s) for c, s in calls if c != loser),) * 2
        assert con.execute("SELECT count(*) FROM call_stages WHERE call_id = ?", [loser]).fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM etl_calls WHERE status = 'loaded'").fetchone() == (len(calls) - 1,)


def _prepared(calls: list[tuple[str, list[dict]]]):
    from pipeline.batch import prepare_batch
    from pipeline.records import CallFetch

    return prepare_batch([CallFetch(c, "loaded", pages=[{"next": None, "results": s, "total": len(s)}]) for c, s in calls], "run")


def test_merged_batches_keep_a_stage_id_under_one_call_and_the_later_fetch_of_a_call() -> None:
    from pipeline.parts import merge_batches as merge

    data = SyntheticData(n_calls=6, seed=3)
    a, b, c, d = data.call_ids[:4]
    stolen = data.stages_for(c)[0] | {"callStageId": data.stages_for(a)[0]["callStageId"]}
    refetched = data.stages_for(b)[:1]
    merged = merge([
        _prepared([(a, data.stages_for(a)), (b, data.stages_for(b))]),
        _prepared([(c, [stolen, *data.stages_for(c)[1:]]), (b, refetched), (d, data.stages_for(d))]),
    ])
    outcomes = {o.call_id: o for o in merged.outcomes}
    assert len(merged.outcomes) == 4 and outcomes[c].status == "failed" and stolen["callStageId"] in outcomes[c].error
    assert [outcomes[x].status for x in (a, b, d)] == ["loaded"] * 3 and outcomes[b].stage_count == 1
    stages = merged.tables["call_stages"]
    per_call = {x: stages["call_id"].to_pylist().count(x) for x in (a, b, c, d)}
    assert per_call == {a: len(data.stages_for(a)), b: 1, c: 0, d: len(data.stages_for(d))}
    for name, table in merged.tables.items():
        assert c not in table["call_id"].to_pylist(), name
    voices_of_b = [r for r in merged.tables["stage_voices"].to_pylist() if r["call_id"] == b]
    assert {r["call_stage_id"] for r in voices_of_b} <= {refetched[0]["callStageId"]}


@pytest.mark.parametrize("fmt", ["duckdb", "parquet"])
def test_a_full_disk_mid_replay_exits_4_in_one_line_leaves_no_reader_and_a_rerun_is_exact(
    tmp_path: Path, monkeypatch, fmt: str
) -> None:
    import errno

    import pipeline.load.duckdb as duckdb_output
    import pipeline.load.parquet as parquet_output

    raw = tmp_path / "raw"
    _landing_zone(raw, 300)
    config = tmp_path / "c.toml"
    config.write_text("replay_batch_stages = 150\n")  # several commits; the disk fills during the third
    out = tmp_path / ("w.duckdb" if fmt == "duckdb" else "w")
    writes = {"n": 0}

    def full_disk(real):
        def write(*args, **kwargs):
            writes["n"] += 1
            if writes["n"] >= 3 * (1 if fmt == "duckdb" else 20):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)
        return write

    if fmt == "duckdb":
        monkeypatch.setattr(duckdb_output.DuckDBWarehouse, "_insert_batch", full_disk(duckdb_output.DuckDBWarehouse._insert_batch))
    else:
        monkeypatch.setattr(parquet_output._StreamedFile, "_flush", full_disk(parquet_output._StreamedFile._flush))
    args = ["replay", str(raw), "--output", str(out), "--format", fmt, "--config", str(config), "--no-progress"]
    failed = CliRunner().invoke(cli, args)
    assert failed.exit_code == 4, failed.output
    [line] = failed.stderr.strip().splitlines()
    assert line.startswith("error: cannot write to") and "No space left on device" in line
    assert eventually(lambda: _readers_of(raw) == [])
    monkeypatch.undo()
    with query_connection(fmt, out) as con:  # whole batches before the failure, none after
        committed = con.execute("SELECT count(DISTINCT call_id) FROM call_stages").fetchone()[0]
        assert 0 < committed < 300 and con.execute("SELECT count(*) FROM etl_calls").fetchone()[0] >= committed
    rerun = CliRunner().invoke(cli, args)
    assert rerun.exit_code == 0, rerun.output
    with query_connection(fmt, out) as con:  # the dead run's record is marked by the next writer
        assert sorted(con.execute("SELECT status FROM etl_runs").fetchall()) == [("crashed",), ("succeeded",)]
    clean = tmp_path / ("clean.duckdb" if fmt == "duckdb" else "clean")
    assert CliRunner().invoke(cli, [*args[:3], str(clean), *args[4:]]).exit_code == 0
    sql = "SELECT * EXCLUDE (run_id, extracted_at) FROM call_stages ORDER BY call_stage_id"
    with query_connection(fmt, out) as con, query_connection(fmt, clean) as clean_con:
        assert con.execute(sql).fetchall() == clean_con.execute(sql).fetchall()
        assert con.execute("SELECT count(*), count(DISTINCT call_stage_id) FROM call_stages").fetchone()[0] > 300


def test_replay_of_a_cut_gzip_file_loads_its_lines_before_the_cut_and_every_other_file(tmp_path: Path) -> None:
    data = SyntheticData(n_calls=80, seed=12)
    calls = [(c, data.stages_for(c)) for c in data.call_ids]
    write_landing_zone(tmp_path / "a", calls[:60], run_id="a")
    raw = tmp_path / "raw"
    write_landing_zone(raw, calls[60:], run_id="b")
    body = (tmp_path / "a" / "a.jsonl.gz").read_bytes()
    (raw / "a.jsonl.gz").write_bytes(body[: len(body) * 2 // 3])  # a killed copy, cut mid-stream
    db = tmp_path / "w.duckdb"
    result = CliRunner().invoke(cli, ["replay", str(raw), "--output", str(db), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "a.jsonl.gz:" in result.stderr and "unreadable from here on" in result.stderr
    loaded = {row[0] for row in _stored(db, "SELECT call_id::VARCHAR FROM etl_calls WHERE status = 'loaded'")}
    assert {c for c, _ in calls[60:]} <= loaded
    assert 20 < len(loaded & {c for c, _ in calls[:60]}) < 60
    assert _stored(db, "SELECT count(*) = count(DISTINCT call_stage_id) FROM call_stages") == [(True,)]

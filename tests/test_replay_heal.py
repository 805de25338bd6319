"""`replay` of a landing zone whose last run was killed: the partial file's complete lines load."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.raw import RawWriter
from pipeline.records import CallFetch
from pipeline.sandbox import SyntheticData


def _fetch(data: SyntheticData, call_id: str) -> CallFetch:
    stages = data.stages_for(call_id)
    page = {"next": None, "previous": None, "results": stages, "total": len(stages)}
    return CallFetch(call_id, "loaded", pages=[page], page_urls=[f"https://api.ultravox.ai/api/calls/{call_id}/stages"])


def test_replay_heals_a_killed_runs_partial_file_and_exits_0(tmp_path: Path) -> None:
    data = SyntheticData(n_calls=40, seed=3)
    ids = list(data.call_ids)
    raw = tmp_path / "raw"
    writer = RawWriter(raw, "killed-run")
    writer.write([_fetch(data, c) for c in ids[:20]])
    writer.write([_fetch(data, c) for c in ids[20:]])
    # What kill -9 leaves: the partial file as it was after the last fsync, plus a cut tail.
    left = tmp_path / "left.partial"
    shutil.copy(writer.partial_path, left)
    with left.open("ab") as tail:
        tail.write(b"\x1f\x8b\x08\x00garbage-of-an-unflushed-block")
    writer.close()
    writer.final_path.unlink()
    shutil.move(left, writer.partial_path)

    out = tmp_path / "w.duckdb"
    result = CliRunner().invoke(cli, ["replay", str(raw), "--output", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "partial" in result.stderr or "kept" in result.stderr
    assert not list(raw.glob(".*.partial"))
    with duckdb.connect(str(out), read_only=True) as con:
        calls = con.execute("SELECT count(DISTINCT call_id) FROM call_stages").fetchall()[0][0]
    assert calls == sum(1 for c in ids if data.stages_for(c))

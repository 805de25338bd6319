"""The benchmark's smoke run: every comparison runs end to end, and its figures are sane
(right row counts, plausible memory). Speed is never asserted here: that belongs to the
full run, `python bench/run_bench.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


#: Rows each part of the smoke run must print.
LABELS = {
    "extraction": ("extract 40 calls", "end to end"),
    "replay": ("replay 500 stages → duckdb", "replay 2,000 stages → parquet", "floor: gunzip + decoding the lines only",
               "floor: reading + transforming", "floor: DuckDB warehouse", "floor: pyarrow writing",
               "memory growth, replay → duckdb", "1/4 with 100 KB prompts, 1% 1 MB) → duckdb, peak RSS"),
    "exports": ("export 300 calls", "memory growth, export", "100 KB prompts, 1% 1 MB) → duckdb",
                "100 KB prompts, 1% 1 MB) → parquet", "100 KB prompts, 1% 1 MB) → delta"),
}


@pytest.mark.parametrize("part", sorted(LABELS))
def test_bench_smoke_rows_are_sane(tmp_path: Path, part: str) -> None:
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run_bench.py"), "--smoke", "--part", part,
                           "--json", str(rows_file)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["what"]: row for row in json.loads(rows_file.read_text())}
    for label in LABELS[part]:
        assert any(label in what for what in rows), f"missing bench row {label!r}: {list(rows)}"
        assert label in done.stdout
    for what, row in rows.items():
        if "expected_stages" in row:
            assert row["stages"] == row["expected_stages"], what
        if "stages" in row:
            assert row["stages"] > 0, what
        if "rss_mb" in row:
            assert 20 < row["rss_mb"] < 4096, what
        if "reader_rss_mb" in row:  # replay's reader process was there and measured
            assert 20 < row["reader_rss_mb"] < 4096, what


def test_replay_cpu_measures_one_replay_with_both_processes(tmp_path: Path) -> None:
    from pipeline.sandbox import SyntheticData, write_landing_zone

    data = SyntheticData(n_calls=30, seed=2)
    write_landing_zone(tmp_path / "raw", ((c, data.stages_for(c)) for c in data.call_ids))
    stages = sum(len(data.stages_for(c)) for c in data.call_ids)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "replay_cpu.py"), "parquet", str(tmp_path / "raw"),
                           str(tmp_path / "out"), "replay_batch_stages=20"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip()
    assert line.startswith(f"parquet {{'replay_batch_stages': 20}} {stages} stages: wall "), line
    committing, reader = (int(mb) for mb in line.removesuffix(" MB").split("peak RSS ")[1].split(" + reader "))
    assert 30 < committing < 1000 and 20 < reader < 1000

"""The benchmark's smoke run (issue 9: CI runs a tiny version): every comparison runs
end to end and prints its row. Figures are not asserted here (timings belong to the
benchmark, never to tests); the full run is `python bench/run_bench.py`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_prints_every_row() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run_bench.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for row in ("extract 40 calls", "end to end", "replay 500 stages → duckdb", "replay 2,000 stages → parquet",
                "floor: gunzip + json.loads only", "floor: DuckDB storing", "export 1,000 calls",
                "memory growth, replay → duckdb", "memory growth, export"):
        assert row in out, f"missing bench row {row!r}:\n{out}"

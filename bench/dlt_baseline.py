"""dlt on the same landing zone as `replay`: the general-purpose loader we compare with.

    python bench/dlt_baseline.py RAW_DIR WORK_DIR

Loads every stage of the landing zone into DuckDB with dlt's parquet loader (append,
dlt's default and its fastest disposition; nested voices and messages become dlt child
tables) and prints "stages seconds peak_rss_mb". Needs `pip install "dlt[duckdb,parquet]"`.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path


def stages(raw_dir: Path):
    for path in sorted(raw_dir.rglob("*.jsonl.gz")):
        with gzip.open(path, "rb") as lines:
            for line in lines:
                record = json.loads(line)
                if record.get("status") == 200 and record.get("page"):
                    yield from record["page"]["results"]


def main() -> None:
    import dlt

    raw_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pipeline = dlt.pipeline(
        pipeline_name="bench_stages",
        pipelines_dir=str(work / "pipelines"),
        destination=dlt.destinations.duckdb(str(work / "dlt.duckdb")),
        dataset_name="stages",
        progress="log" if "--verbose" in sys.argv else None,
    )
    pipeline.run(dlt.resource(stages(raw_dir), name="call_stages"), loader_file_format="parquet")
    seconds = time.monotonic() - started
    import duckdb

    with duckdb.connect(str(work / "dlt.duckdb"), read_only=True) as con:
        count = con.execute("SELECT count(*) FROM stages.call_stages").fetchall()[0][0]
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(count, seconds, hwm_kb // 1024)


if __name__ == "__main__":
    main()

"""Write-only cost of DuckDB settings for the tables the transform produces.

    python bench/duckdb_settings.py RAW_DIR WORK_DIR [--batch-stages N] [--only NAME ...]

The landing zone is transformed once (pipeline.transform, in batches like the
runner's) and each batch's three Arrow tables are saved as Arrow IPC files. Then each
variant loads them into a fresh DuckDB file in its own process, the way the loader
commits (per batch: delete the batch's calls, insert, commit), and prints one line:
variant, stages, seconds, CPU seconds, peak RSS (VmHWM) in MB, file MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import Settings  # noqa: E402  (after the path insert above)
from pipeline.load.duckdb import ROW_GROUP_SIZE  # noqa: E402

#: (connection config, ATTACH options, SET statements); the data tables have no primary key
Variant = tuple[dict[str, object], str, tuple[str, ...]]
PRODUCT = Settings()


def _tuned(row_group: int, compression: str, memory: str, threads: int) -> Variant:
    """Small row groups, a fixed compression (or DuckDB's choice: "auto"), insertion order not kept."""
    sets = ("SET preserve_insertion_order=false",)
    if compression != "auto":
        sets = (f"SET force_compression='{compression}'", *sets)
    return {"memory_limit": memory, "threads": threads}, f"ROW_GROUP_SIZE {row_group}", sets


VARIANTS: dict[str, Variant] = {
    # the loader's own settings, whatever they are now
    "product": _tuned(ROW_GROUP_SIZE, "zstd", PRODUCT.duckdb_memory_limit, 1),
    # DuckDB's defaults, with the 1 GB checkpoint threshold the loader once used
    "defaults-256MB": ({"memory_limit": "256MB", "checkpoint_threshold": "1GB"}, "", ()),
    "defaults-64MB": ({"memory_limit": "64MB", "checkpoint_threshold": "1GB"}, "", ()),
    **{f"rg{rows}-{compression}-{mb}MB-{threads}t": _tuned(rows, compression, f"{mb}MB", threads)
       for rows, compression, mb, threads in (
           (2048, "zstd", 64, 1), (2048, "zstd", 64, 2), (4096, "zstd", 96, 1), (4096, "zstd", 96, 2),
           (2048, "zstd", 96, 1), (2048, "auto", 64, 1), (2048, "fsst", 64, 1), (2048, "uncompressed", 64, 1))},
}


def prepare(raw_dir: Path, work: Path, batch_stages: int) -> int:
    """Transform the landing zone into IPC files, one per batch and table."""
    import pyarrow as pa

    from pipeline.raw import read_landing_zone
    from pipeline.records import utcnow
    from pipeline.transform import transform_calls

    work.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[str, list]] = []
    count = batches = pending_stages = 0

    def flush() -> None:
        nonlocal batches, pending_stages
        tables = transform_calls(pending, "bench", utcnow()).tables
        for name, table in tables.items():
            with pa.OSFile(str(work / f"{batches:05d}-{name}.arrow"), "wb") as sink:
                with pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
        batches += 1
        pending.clear()
        pending_stages = 0

    for fetch in read_landing_zone(raw_dir, lambda bad: None):
        stages = fetch.stages()
        pending.append((fetch.call_id, stages))
        count += len(stages)
        pending_stages += len(stages)
        if pending_stages >= batch_stages:
            flush()
    if pending:
        flush()
    return count


_CHILD = r"""
import json, sys, time
from pathlib import Path
import duckdb, pyarrow as pa
from pipeline import schema
from pipeline.load.duckdb import STORAGE_VERSION
config, attach, sets = json.loads(sys.argv[1])
work, target = Path(sys.argv[2]), sys.argv[3]
con = duckdb.connect(config=config)
con.execute(f"ATTACH '{target}' AS w (STORAGE_VERSION '{STORAGE_VERSION}'{', ' + attach if attach else ''})")
con.execute("USE w")
for statement in sets:
    con.execute(statement)
for table in schema.DATA_TABLES:
    con.execute(table.create_sql())
names = sorted({p.name.split("-", 1)[0] for p in work.glob("*.arrow")})
stages = 0
started = time.monotonic()
for batch in names:
    con.execute("BEGIN")
    for table in schema.DATA_TABLES:
        rows = pa.ipc.open_file(str(work / f"{batch}-{table.name}.arrow")).read_all()
        if table.name == "call_stages":
            stages += rows.num_rows
        con.register("batch_rows", rows)
        con.execute(f"DELETE FROM {table.name} WHERE call_id IN (SELECT DISTINCT call_id::UUID FROM batch_rows)")
        con.execute(f"INSERT INTO {table.name} BY NAME SELECT * FROM batch_rows")
        con.unregister("batch_rows")
    con.execute("COMMIT")
con.close()
seconds = time.monotonic() - started
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(stages, round(seconds, 2), hwm // 1024)
"""


def run_variant(name: str, work: Path, out_dir: Path) -> str:
    config, attach, sets = VARIANTS[name]
    target = out_dir / f"{name}.duckdb"
    target.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([config, attach, list(sets)]), str(work),
                           str(target)], capture_output=True, text=True, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line] or proc.stderr.splitlines()[-1:]
        return f"{name} failed: {errors[-1][:300]}"
    stages, seconds, rss = proc.stdout.split()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    size = target.stat().st_size >> 20
    target.unlink()
    return f"{name} stages={stages} seconds={seconds} cpu={cpu:.2f} peak_rss_mb={rss} file_mb={size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--batch-stages", type=int, default=PRODUCT.replay_batch()[0])
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(VARIANTS))
    args = parser.parse_args()
    batches = args.work / "batches"
    if not any(batches.glob("*.arrow")):
        started = time.monotonic()
        stages = prepare(args.raw_dir, batches, args.batch_stages)
        print(f"prepared {stages} stages in {time.monotonic() - started:.1f} s", flush=True)
    for name in args.only or VARIANTS:
        print(run_variant(name, batches, args.work), flush=True)


if __name__ == "__main__":
    main()

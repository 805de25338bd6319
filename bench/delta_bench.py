"""Commit time per batch of the Delta output, locally and on S3 (moto on 127.0.0.1).

    python bench/delta_bench.py                      # 10 batches of 2,000 stages, then 5 re-commits
    python bench/delta_bench.py --batches 4 --targets local,s3

Each target runs in its own process: "RSS0" is its RSS once the synthetic data is
ready and one batch transformed (before any commit), "peak" its VmHWM at the end. Batches are
synthetic calls (``SyntheticData``) grouped to ~2,000 stages and transformed before the
clock starts; the timed part is ``commit_calls`` only. Phase "new" commits fresh calls
(appends), phase "replace" re-commits earlier batches (delete + insert per call). For
comparison the same batches go to the Parquet output and to Delta with a VACUUM
(retention 0) after every commit ("delta+vacuum": a Delta table kept as small as the
Parquet folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


def _batches(n_batches: int, stages_per_batch: int) -> list[list[str]]:
    from pipeline.sandbox import SyntheticData

    data = SyntheticData(n_calls=n_batches * stages_per_batch, seed=11)
    batches, current, count = [], [], 0
    for call_id in data.call_ids:
        current.append(call_id)
        count += len(data.stages_for(call_id))
        if count >= stages_per_batch:
            batches.append(current)
            current, count = [], 0
            if len(batches) == n_batches:
                break
    return batches


def child(target: str, location: str, n_batches: int, stages_per_batch: int, replaces: int) -> None:
    """Commit the batches into ``location``; print one JSON line per batch, then RSS."""
    from pipeline.load import open_warehouse
    from pipeline.load.delta import DeltaWarehouse
    from pipeline.records import CallOutcome
    from pipeline.sandbox import SyntheticData
    from pipeline.transform import transform_calls

    data = SyntheticData(n_calls=n_batches * stages_per_batch, seed=11)
    batches = _batches(n_batches, stages_per_batch)
    now = datetime.now(timezone.utc)
    fmt = "parquet" if target == "parquet" else "delta"
    warehouse = DeltaWarehouse(location) if fmt == "delta" else open_warehouse("parquet", location)
    plan = [("new", b) for b in batches] + [("replace", b) for b in batches[:replaces]]
    warm = transform_calls([(c, data.stages_for(c)) for c in batches[0]], "warm-up", now)
    del warm
    print(json.dumps({"rss_before_mb": _kb("VmRSS") // 1024}), flush=True)
    with warehouse:
        for n, (phase, ids) in enumerate(plan):
            run_id = f"bench-{n}"
            now = datetime.now(timezone.utc)  # one extraction time per batch, as in a run
            result = transform_calls([(c, data.stages_for(c)) for c in ids], run_id, now)
            outcomes = [CallOutcome(c, "loaded", result.stage_counts[c], None, now) for c in ids]
            started = time.perf_counter()
            warehouse.commit_calls(result.tables, outcomes, run_id)
            if target == "delta+vacuum":
                for table in warehouse.tables.tables.values():  # type: ignore[attr-defined]
                    table.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False)
            seconds = time.perf_counter() - started
            stages = result.tables["call_stages"].num_rows
            print(json.dumps({"phase": phase, "stages": stages, "seconds": seconds}), flush=True)
    print(json.dumps({"rss_mb": _kb("VmHWM") // 1024}), flush=True)


def _kb(field: str) -> int:
    """VmRSS/VmHWM of this process (ru_maxrss would carry a parent's figure over exec)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(f"{field}:"))


def run_target(target: str, location: str, args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    command = [sys.executable, __file__, "--child", target, "--location", location, "--batches", str(args.batches),
               "--stages", str(args.stages), "--replaces", str(args.replaces)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{target} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def start_moto() -> tuple[subprocess.Popen, dict[str, str]]:
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="bench", aws_secret_access_key="bench-secret").create_bucket(Bucket="bench-bucket")
    return server, env


def summarise(target: str, rows: list[dict]) -> list[str]:
    rss = next(r["rss_mb"] for r in rows if "rss_mb" in r)
    before = next(r["rss_before_mb"] for r in rows if "rss_before_mb" in r)
    lines = []
    for phase in ("new", "replace"):
        times = [r["seconds"] for r in rows if r.get("phase") == phase]
        stages = [r["stages"] for r in rows if r.get("phase") == phase]
        if not times:
            continue
        lines.append(
            f"{target:<14} {phase:<8} {len(times):>7} {round(statistics.mean(stages)):>8} "
            f"{statistics.median(times):>9.3f} {max(times):>8.3f} {sum(times):>8.2f} {before:>10} {rss:>8}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--stages", type=int, default=2000, help="stages per batch")
    parser.add_argument("--replaces", type=int, default=5, help="batches committed a second time")
    parser.add_argument("--targets", default="delta,delta+vacuum,parquet,s3")
    parser.add_argument("--child")
    parser.add_argument("--location")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.location, args.batches, args.stages, args.replaces)
        return
    header = f"{'target':<14} {'phase':<8} {'batches':>7} {'stages':>8} {'median s':>9} {'max s':>8} {'total s':>8} {'RSS0 MB':>10} {'peak MB':>8}"
    lines = [header, "-" * len(header)]
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            server = None
            if target == "s3":
                server, aws = start_moto()
                env |= aws
                location = "s3://bench-bucket/delta"
            else:
                location = str(Path(tmp) / target.replace("+", "-"))
            try:
                lines += summarise(target, run_target(target if target != "s3" else "delta", location, args, env))
            finally:
                if server is not None:
                    assert server.stdin is not None
                    server.stdin.close()
                    server.wait(timeout=30)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

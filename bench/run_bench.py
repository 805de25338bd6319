"""Benchmarks: every comparison side by side in one invocation, printed as a table.

    python bench/run_bench.py            # full run (a few minutes on 2 cores)
    python bench/run_bench.py --smoke    # tiny sizes, for CI: proves the bench runs

Everything talks only to the simulated API on 127.0.0.1. Figures are ratios within one
run (ours vs a sequential baseline; achieved vs the server's limit), so they hold on a
noisy machine. Peak RSS is measured in a fresh child process per measurement.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import Settings  # noqa: E402
from pipeline.log import Reporter  # noqa: E402
from pipeline.runner import run_export  # noqa: E402
from pipeline.sandbox import Sandbox, SandboxOptions, SyntheticData  # noqa: E402

KEY = "bench-key"


def extraction_near_limit(calls: int, latency_ms: float, limit_rps: float, concurrency: int) -> dict[str, object]:
    """Target 1: achieved requests/s ≥ 90% of min(concurrency / latency, R), ≤ 2% 429s."""
    data = SyntheticData(n_calls=calls, seed=1)
    options = SandboxOptions(api_key=KEY, latency_ms=latency_ms, rate_limit_rps=limit_rps)
    with tempfile.TemporaryDirectory() as tmp, Sandbox(data, options) as box:
        settings = Settings(base_url=box.base_url, output=f"{tmp}/x.duckdb", concurrency=concurrency,
                            max_rps=1000.0, page_size=100)
        started = time.monotonic()
        result = run_export(settings, list(data.call_ids), KEY, Reporter(progress=False))
        seconds = time.monotonic() - started
        requests = box.stats.requests
        throttled = box.stats.throttled
    ceiling = min(concurrency / (latency_ms / 1000), limit_rps)
    achieved = requests / seconds
    return {
        "what": f"extract {calls} calls, {latency_ms:.0f} ms latency, server limit {limit_rps:.0f} req/s, concurrency {concurrency}",
        "figure": f"{achieved:.0f} req/s = {achieved / ceiling:.0%} of {ceiling:.0f}; 429s {throttled}/{requests} = {throttled / max(requests, 1):.1%}",
        "target": "≥ 90% of ceiling, ≤ 2% 429",
        "ok": achieved >= 0.9 * ceiling and throttled <= 0.02 * requests and result.run.calls_failed == 0,
    }


def sequential_baseline(base_url: str, call_ids: list[str], db_path: str) -> float:
    """What a script written in an afternoon does: one request at a time, row-by-row inserts."""
    import duckdb
    import httpx

    started = time.monotonic()
    con = duckdb.connect(db_path)
    con.execute("CREATE TABLE call_stages (call_stage_id VARCHAR, call_id VARCHAR, stage_index INTEGER, "
                "model VARCHAR, initial_token_count BIGINT, latest_token_count BIGINT, error_count BIGINT, raw JSON)")
    with httpx.Client(headers={"X-API-Key": KEY}) as client:
        for call_id in call_ids:
            url: str | None = f"{base_url}/api/calls/{call_id}/stages?pageSize=100"
            index = 0
            while url:
                page = client.get(url).json()
                for stage in page["results"]:
                    con.execute("INSERT INTO call_stages VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                        stage["callStageId"], call_id, index, stage.get("model"), stage.get("initialTokenCount"),
                        stage.get("latestTokenCount"), stage.get("errorCount"), json.dumps(stage)])
                    index += 1
                url = page.get("next")
    con.close()
    return time.monotonic() - started


def end_to_end_vs_sequential(calls: int, latency_ms: float) -> dict[str, object]:
    """Target 2: ≥ 20× faster than the sequential baseline on the same sandbox."""
    data = SyntheticData(n_calls=calls, seed=2)
    with tempfile.TemporaryDirectory() as tmp, Sandbox(data, SandboxOptions(api_key=KEY, latency_ms=latency_ms)) as box:
        baseline = sequential_baseline(box.base_url, list(data.call_ids), f"{tmp}/baseline.duckdb")
        settings = Settings(base_url=box.base_url, output=f"{tmp}/ours.duckdb", concurrency=64, max_rps=5000.0)
        started = time.monotonic()
        run_export(settings, list(data.call_ids), KEY, Reporter(progress=False))
        ours = time.monotonic() - started
    return {
        "what": f"end to end {calls} calls at {latency_ms:.0f} ms: ours (concurrency 64) vs sequential + row inserts",
        "figure": f"ours {ours:.2f}s vs baseline {baseline:.2f}s = {baseline / ours:.1f}×",
        "target": "≥ 20×",
        "ok": baseline / ours >= 20,
    }


def write_landing_zone(directory: Path, calls: int) -> int:
    """A landing zone as `run --raw-dir` writes it: one gz jsonl line per page."""
    data = SyntheticData(n_calls=calls, seed=5)
    stages = 0
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / "bench.jsonl.gz", "wt", compresslevel=1) as fh:
        for call_id in data.call_ids:
            results = data.stages_for(call_id)
            stages += len(results)
            page = {"next": None, "previous": None, "results": results, "total": len(results)}
            fh.write(json.dumps({"call_id": call_id, "status": 200, "fetched_at": "2026-11-25T00:00:00Z",
                                 "url": f"https://api.ultravox.ai/api/calls/{call_id}/stages?pageSize=100",
                                 "page": page}) + "\n")
    return stages


_CHILD = r"""
import resource, sys, time
from pathlib import Path
from pipeline.config import Settings
from pipeline.log import Reporter
from pipeline.runner import run_replay
fmt, raw, out = sys.argv[1:4]
started = time.monotonic()
result = run_replay(Path(raw), Settings(format=fmt, output=out), Reporter(progress=False))
seconds = time.monotonic() - started
print(result.run.stages_loaded, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def replay_throughput(calls: int, fmt: str, landing: Path, tmp: Path) -> tuple[int, float, int]:
    out = tmp / (f"replay-{calls}.duckdb" if fmt == "duckdb" else f"replay-{calls}-parquet")
    proc = subprocess.run([sys.executable, "-c", _CHILD, fmt, str(landing), str(out)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    stages, seconds, rss_mb = proc.stdout.split()
    return int(stages), float(seconds), int(rss_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = parser.parse_args()
    small = args.smoke
    rows: list[dict[str, object]] = []
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}", flush=True)

    rows.append(extraction_near_limit(40 if small else 400, 50, 100, 16))
    rows.append(end_to_end_vs_sequential(20 if small else 200, 50))
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sizes = [250, 2500] if small else [2500, 25000]
        peaks: dict[str, list[int]] = {}
        for calls in sizes:
            landing = tmp / f"landing-{calls}"
            write_landing_zone(landing, calls)
            for fmt in ("duckdb", "parquet"):
                stages, seconds, rss = replay_throughput(calls, fmt, landing, tmp)
                peaks.setdefault(fmt, []).append(rss)
                rows.append({
                    "what": f"replay {stages:,} stages → {fmt}",
                    "figure": f"{stages / seconds:,.0f} stages/s ({seconds:.2f}s), peak RSS {rss} MB",
                    "target": "≥ 75,000 stages/s, ≤ 300 MB",
                    "ok": stages / seconds >= 75_000 and rss <= 300,
                })
        for fmt, (low, high) in peaks.items():
            rows.append({
                "what": f"memory growth {fmt}: {sizes[0]:,} vs {sizes[1]:,} calls",
                "figure": f"{low} MB → {high} MB ({high / low:.2f}×)",
                "target": "flat (≤ 1.5×)",
                "ok": high <= 1.5 * low,
            })

    width = max(len(str(r["what"])) for r in rows)
    print(f"\n{'benchmark'.ljust(width)}  {'figure':<60}  {'target':<28}  met")
    for r in rows:
        print(f"{str(r['what']).ljust(width)}  {str(r['figure']):<60}  {str(r['target']):<28}  {'yes' if r['ok'] else 'NO'}")


if __name__ == "__main__":
    main()

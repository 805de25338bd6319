"""Benchmarks: every comparison side by side in one invocation, printed as a table.

    python bench/run_bench.py            # full run (a few minutes on 2 cores)
    python bench/run_bench.py --smoke    # tiny sizes, for CI: proves the bench runs

Everything talks only to the simulated API on 127.0.0.1. Figures are ratios within one
run (ours vs a sequential baseline; achieved vs the server's limit), so they hold on a
noisy machine. Peak RSS is measured in a fresh child process per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import Settings  # noqa: E402
from pipeline.log import Reporter  # noqa: E402
from pipeline.runner import run_export  # noqa: E402
from pipeline.sandbox import Sandbox, SandboxOptions, SyntheticData  # noqa: E402
from pipeline.sandbox import write_landing_zone as land_calls  # noqa: E402

from memcg import MemoryCgroup, drop_page_cache  # noqa: E402  (bench/ is on sys.path when run as a script)

KEY = "bench-key"
#: The memory target of a replay: both processes and their page cache, in one cgroup.
REPLAY_LIMIT_MB = 300
#: Interleaved rounds of dlt and both replays in the full run (see replay_rows).
REPLAY_ROUNDS = 3


def extraction_near_limit(calls: int, latency_ms: float, limit_rps: float, concurrency: int,
                          max_rps: float = 1000.0) -> dict[str, object]:
    """Target 1: achieved requests/s ≥ 90% of min(concurrency / latency, R), ≤ 2% 429s.

    The sandbox runs in its own process, as `ultravox-stages sandbox --rate-limit R`
    (an in-process one would share the interpreter lock with the client). --max-rps is
    set far above R, so the client's adaptive rate, not the cap, has to find R.
    Achieved = requests answered without 429 per second of the whole run_export
    (warehouse open and final commit included); 429s over every request sent.

    One cost is fixed per run: when the server's one-second burst runs out, most of
    the requests then in flight (about concurrency × (1 − R / pace)) are answered 429
    before any client can know. main() therefore measures 10 seconds of traffic
    (1000 calls at R = 100) rather than 4 (400 calls, a quarter of them the burst)."""
    from pipeline.sandbox import SandboxProcess

    with tempfile.TemporaryDirectory() as tmp, SandboxProcess(
        n_calls=calls, seed=1, api_key=KEY, latency_ms=latency_ms, rate_limit_rps=limit_rps
    ) as box:
        settings = Settings(base_url=box.base_url, output=f"{tmp}/x.duckdb", concurrency=concurrency,
                            max_rps=max_rps, page_size=100)
        started = time.monotonic()
        result = run_export(settings, box.call_ids, KEY, Reporter(progress=False))
        seconds = time.monotonic() - started
    assert result.stats is not None
    requests, throttled = result.stats.requests, result.stats.throttled
    ceiling = min(concurrency / (latency_ms / 1000), limit_rps)
    achieved = (requests - throttled) / seconds
    return {
        "what": f"extract {calls} calls, {latency_ms:.0f} ms latency, server limit {limit_rps:.0f} req/s, concurrency {concurrency}, --max-rps {max_rps:.0f}",
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
    """Target 2: ≥ 20× faster than the sequential baseline on the same sandbox, which has
    no rate limit: `ultravox-stages run --concurrency 64 --max-rps 5000`."""
    return _end_to_end(calls, latency_ms, ["--concurrency", "64", "--max-rps", "5000"], 20, seed=2,
                       label="ours (CLI, concurrency 64)")


def end_to_end_at_the_key_limit(calls: int, latency_ms: float) -> dict[str, object]:
    """The issue's workload: small pages (the server sends at most 2 stages a page), a
    quarter of the prompts ~100 KB, a server limited to the key's 200 requests/s, and
    `ultravox-stages run` with its defaults (--max-rps 195). Target ≥ 12×; the figure
    also shows the most any client can reach there: the baseline's time over the
    requests' time at 200/s."""
    return _end_to_end(calls, latency_ms, [], 12, seed=3, label="ours (CLI, defaults)", rate_limit_rps=200,
                       big_prompts=True, max_page_size=2)


def _end_to_end(calls: int, latency_ms: float, options: list[str], target: float, *, seed: int, label: str,
                rate_limit_rps: float | None = None, **sandbox: Any) -> dict[str, object]:
    """Ours vs the sequential baseline, both against one sandbox in its own process
    (`ultravox-stages sandbox`). Ours is the real CLI in a child process, interpreter
    start-up included. A first, untimed run of ours warms the sandbox (it builds and
    caches each page on first request), so both sides are measured against the same
    warm server; ours is the mean of two timed runs, each after a pause that refills a
    rate-limited server's burst. Both must load the same number of stages."""
    import duckdb

    from pipeline.sandbox import SandboxProcess

    with tempfile.TemporaryDirectory() as tmp, SandboxProcess(
        n_calls=calls, seed=seed, api_key=KEY, latency_ms=latency_ms, rate_limit_rps=rate_limit_rps, **sandbox
    ) as box:
        ids = Path(tmp) / "ids.txt"
        ids.write_text("".join(f"{c}\n" for c in box.call_ids))

        def ours(name: str) -> float:
            command = [sys.executable, "-m", "pipeline", "run", "--calls-file", str(ids), "--base-url", box.base_url,
                       "--output", f"{tmp}/{name}.duckdb", *options, "--no-progress"]
            if rate_limit_rps:
                time.sleep(1.5)  # the server's one-second burst refills
            started = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "ULTRAVOX_API_KEY": KEY})
            if done.returncode != 0:
                raise RuntimeError(f"ultravox-stages run exited {done.returncode}: {done.stderr[-500:]}")
            return time.monotonic() - started

        ours("warm-up")
        runs = [ours("ours1"), ours("ours2")]
        baseline = sequential_baseline(box.base_url, box.call_ids, f"{tmp}/baseline.duckdb")
        stages = []
        for name in ("ours2", "baseline"):
            with duckdb.connect(f"{tmp}/{name}.duckdb", read_only=True) as con:
                stages.append(con.execute("SELECT count(*) FROM call_stages").fetchall()[0][0])
        with duckdb.connect(f"{tmp}/ours2.duckdb", read_only=True) as con:
            requests = con.execute("SELECT http_requests FROM etl_runs").fetchall()[0][0]
    mean = sum(runs) / len(runs)
    figure = f"ours {mean:.2f}s ({runs[0]:.2f}, {runs[1]:.2f}) vs baseline {baseline:.2f}s = {baseline / mean:.1f}×"
    if rate_limit_rps:
        figure += f"; {requests} requests: at most {baseline / (requests / rate_limit_rps):.1f}× at {rate_limit_rps:.0f}/s"
    return {
        "what": f"end to end {calls} calls ({stages[0]:,} stages{', small pages, 100 KB prompts' if sandbox else ''}) "
                f"at {latency_ms:.0f} ms{f', server limit {rate_limit_rps:.0f}/s' if rate_limit_rps else ''}: "
                f"{label} vs sequential + row inserts",
        "figure": figure,
        "target": f"≥ {target:.0f}×",
        "ok": baseline / mean >= target and stages[0] == stages[1],
        "stages": stages[0],
        "expected_stages": stages[1],
    }


def write_landing_zone(directory: Path, n_stages: int) -> int:
    """A landing zone of ``n_stages`` realistic stages, written by the tool's own
    RawWriter exactly as ``run --raw-dir`` writes it (gz jsonl, a line per page). The
    stages come from bench/transform_bench.py: prompts of 0.5-4 KB, 0-5 inactivity
    messages, one or two voices of every provider (generic ones with secret headers),
    ~3.3 KB of JSON a stage, calls of 1-5 stages spread over 30 days."""
    from transform_bench import make_calls

    land_calls(directory, make_calls(n_stages), "bench-landing")
    return n_stages


_CHILD = r"""
import sys, time
from pathlib import Path
from pipeline.config import Settings
from pipeline.log import Reporter
from pipeline.runner import run_replay
fmt, raw, out = sys.argv[1:4]
started = time.monotonic()
result = run_replay(Path(raw), Settings(format=fmt, output=out), Reporter(progress=False))
seconds = time.monotonic() - started
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child of a big
# parent (this bench holds 100,000 generated stages) would report the parent's RSS.
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(result.run.stages_loaded, seconds, hwm_kb // 1024, (result.reader_peak_rss_kb or 0) // 1024)
"""

# Floors: what this machine needs for parts of the job, with the product's own code and settings.
_FLOORS = r"""
import sys, time
from pathlib import Path
import pyarrow.parquet as pq
from pipeline.columns import to_arrow
from pipeline.config import Settings
from pipeline.load import open_warehouse
from pipeline.load.parquet import _write_options
from pipeline.raw import landing_files, _decode_line, _file_lines
from pipeline.replay_reader import read_batches
from pipeline.runner import READER_PART_BYTES, READER_PART_STAGES
from pipeline.schema import DATA_TABLES
raw, tmp = Path(sys.argv[1]), Path(sys.argv[2])
settings = Settings()
started = time.monotonic()
for path in landing_files(raw):
    for line in _file_lines(path):
        _decode_line(line)
parse = time.monotonic() - started
started = time.monotonic()
for message in read_batches(raw, READER_PART_STAGES, READER_PART_BYTES, "floor"):
    pass
transform = time.monotonic() - started
def arrow_batches(batch_stages, batch_bytes):
    # The reader sends columns; the committing process receives them as Arrow tables.
    batches = [m.batch for m in read_batches(raw, batch_stages, batch_bytes, "floor") if m.batch]
    for batch in batches:
        batch.tables = {name: to_arrow(columns) for name, columns in batch.tables.items()}
    return batches
batches = arrow_batches(*settings.replay_batch())
warehouse = open_warehouse("duckdb", tmp / "floor.duckdb", memory_limit=settings.duckdb_memory_limit)
started = time.monotonic()
with warehouse:
    for batch in batches:
        warehouse.commit_calls(batch.tables, batch.outcomes, "floor")
duck = time.monotonic() - started
batches = arrow_batches(*Settings(format="parquet").replay_batch())
started = time.monotonic()
for n, batch in enumerate(batches):
    for table in DATA_TABLES:
        rows = batch.tables[table.name]
        pq.write_table(rows, tmp / f"floor-{table.name}-{n}.parquet", **_write_options(rows.column_names, fresh=True))
parquet = time.monotonic() - started
print(parse, transform, duck, parquet)
"""


def replay_throughput(
    label: str, fmt: str, landing: Path, tmp: Path, group: MemoryCgroup | None = None, timeout: float | None = None
) -> tuple[int, float, int, int]:
    """(stages, seconds, peak RSS MB of the committing process, of the reader process);
    run inside ``group`` if given."""
    out = tmp / (f"replay-{label}.duckdb" if fmt == "duckdb" else f"replay-{label}-parquet")
    proc = subprocess.run([sys.executable, "-c", _CHILD, fmt, str(landing), str(out)], capture_output=True, text=True,
                          check=True, cwd=ROOT, timeout=timeout, preexec_fn=None if group is None else group.join)
    _remove(out)
    stages, seconds, rss_mb, reader_mb = proc.stdout.split()
    return int(stages), float(seconds), int(rss_mb), int(reader_mb)


def _remove(path: Path) -> None:
    """A measured run's output, gone (the rounds would otherwise fill the disk)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        Path(f"{path}.wal").unlink(missing_ok=True)


def replay_in_memory_limit(label: str, fmt: str, landing: Path, tmp: Path, limit_mb: int = REPLAY_LIMIT_MB) -> dict[str, object]:
    """The replay in a memory cgroup of ``limit_mb`` (both processes and their page cache,
    each page once) against the same replay in a cgroup without a limit; each starts
    with the page cache dropped, so both read their libraries from disk alike."""
    what = f"replay {int(label):,} stages → {fmt} in a {limit_mb} MB memory cgroup (both processes, page cache included)"
    target = "finishes, ≤ 1.25× the time"
    runs: dict[int | None, tuple[float, int, int]] = {}
    timeout: float | None = None
    for limit in (None, limit_mb):
        group = MemoryCgroup.create(f"ultravox-bench-{os.getpid()}", None if limit is None else limit << 20)
        if group is None:
            return {"what": what, "figure": "not measured: no memory cgroup can be made here (root and a memory controller)",
                    "target": "(needs root)", "ok": None}
        dropped = drop_page_cache()
        try:
            stages, seconds, _, _ = replay_throughput(f"{label}-cgroup-{limit}", fmt, landing, tmp, group, timeout)
            runs[limit] = seconds, group.peak_bytes() >> 20, group.oom_kills()
        except subprocess.TimeoutExpired:
            return {"what": what, "figure": f"not done in {timeout:.0f}s (thrashing)", "target": target, "ok": False}
        except subprocess.CalledProcessError as exc:
            return {"what": what, "figure": f"failed (exit {exc.returncode}), {group.oom_kills()} OOM kills",
                    "target": target, "ok": False}
        finally:
            group.remove()
        timeout = 20 * seconds + 60
    (free, free_peak, _), (limited, peak, kills) = runs[None], runs[limit_mb]
    figure = (f"{limited:.2f}s vs {free:.2f}s without a limit ({limited / free:.2f}×; that one peaked at {free_peak} MB), "
              f"peak {peak} MB, {kills} OOM kills" + ("" if dropped else " (page cache not dropped first)"))
    return {"what": what, "figure": figure, "target": target, "ok": kills == 0 and limited <= 1.25 * free,
            "stages": stages, "expected_stages": int(label), "seconds": limited}


def dlt_throughput(landing: Path, tmp: Path, label: str) -> tuple[int, float, int] | None:
    """dlt loading the same landing zone into DuckDB (bench/dlt_baseline.py); None without dlt."""
    import importlib.util

    if importlib.util.find_spec("dlt") is None:
        return None
    out = tmp / f"dlt-{label}"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "dlt_baseline.py"), str(landing), str(out)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    _remove(out)
    stages, seconds, rss_mb = proc.stdout.split()
    return int(stages), float(seconds), int(rss_mb)


def floors(landing: Path, tmp: Path, n_stages: int) -> list[dict[str, object]]:
    """Side by side with the replay, each part of it alone, with the product's code and
    settings: reading (gunzip + decoding each line), reading and transforming into
    the reader's parts of batches, and storing the ready batches (DuckDB warehouse commits;
    Parquet files written as the Parquet output writes a commit's new files)."""
    proc = subprocess.run([sys.executable, "-c", _FLOORS, str(landing), str(tmp)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    parse, transform, duck, parquet = (float(x) for x in proc.stdout.split())
    parts = [
        ("gunzip + decoding the lines only", parse),
        ("reading + transforming into parts of batches only (the reader process)", transform),
        ("DuckDB warehouse committing ready batches only", duck),
        ("pyarrow writing ready Parquet-sized batches only (one file per table and batch)", parquet),
    ]
    return [{"what": f"floor: {what}, {n_stages:,} stages", "figure": f"{n_stages / seconds:,.0f} stages/s ({seconds:.2f}s)",
             "target": "(for scale)", "ok": None} for what, seconds in parts]


# The CLI's peak RSS as its parent sees it: this small wrapper forks it (a fork of the
# big bench process would carry the bench's RSS into ru_maxrss, see _CHILD).
_PEAK_RSS = r"""
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""


def export_memory(calls: int, tmp: Path, fmt: str = "duckdb", big_prompts: bool = False) -> tuple[int, int]:
    """Peak RSS of the real CLI (`python -m pipeline run`) exporting ``calls`` calls from
    the sandbox (no latency) into ``fmt``; returns (stages loaded, MB). ``big_prompts``:
    a quarter of the stages carry ~100 KB prompts and about 1% of calls ~1 MB ones."""
    from pipeline.load import query_connection
    from pipeline.sandbox import write_call_ids

    data = SyntheticData(n_calls=calls, seed=9, big_prompts=big_prompts)
    ids = tmp / f"calls-{calls}.txt"
    write_call_ids(data, ids)
    out = tmp / f"export-{calls}-{fmt}-{'big' if big_prompts else 'plain'}{'.duckdb' if fmt == 'duckdb' else ''}"
    with Sandbox(data, SandboxOptions(api_key=KEY)) as box:
        command = [sys.executable, "-m", "pipeline", "run", "--calls-file", str(ids), "--base-url", box.base_url,
                   "--format", fmt, "--output", str(out), "--no-progress"]
        proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, *command], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "ULTRAVOX_API_KEY": KEY}, check=True)
    code, rss_mb = (int(x) for x in proc.stdout.split())
    if code != 0:
        raise RuntimeError(f"export of {calls} calls into {fmt} exited {code}")
    con = query_connection(fmt, out)
    try:
        stages = con.execute("SELECT count(*) FROM call_stages").fetchall()[0][0]
    finally:
        con.close()
    return stages, rss_mb


def big_prompt_exports(calls: int, tmp: Path) -> list[dict[str, object]]:
    """Peak RSS of a realistic export with big prompts, every format (bounded by bytes)."""
    rows: list[dict[str, object]] = []
    for fmt in ("duckdb", "parquet", "delta"):
        stages, rss = export_memory(calls, tmp, fmt, big_prompts=True)
        rows.append({
            "what": f"export {calls:,} calls ({stages:,} stages, 1/4 with 100 KB prompts, 1% 1 MB) → {fmt}, CLI peak RSS",
            "figure": f"{rss} MB",
            "target": "≤ 400 MB",
            "ok": rss <= 400,
            "stages": stages,
            "rss_mb": rss,
        })
    return rows


def extraction_rows(small: bool) -> list[dict[str, object]]:
    rows = [extraction_near_limit(40 if small else 1000, 50, 100, 16)]
    if not small:  # the same at other points: more in flight; a higher limit (ceiling 200 of 320)
        rows.append(extraction_near_limit(1000, 50, 100, 32))
        rows.append(extraction_near_limit(2000, 50, 200, 16))
        # The example size: a 4 s run, where the first overrun of the server's
        # one-second burst (~concurrency requests answered 429 at once) weighs most.
        rows.append(extraction_near_limit(400, 50, 100, 16))
        # The same short run with the default cap (195): the limit is learnt from the first 429.
        rows.append(extraction_near_limit(400, 50, 100, 16, max_rps=Settings().max_rps))
    rows.append(end_to_end_vs_sequential(20 if small else 1000, 50))
    rows.append(end_to_end_at_the_key_limit(20 if small else 300, 50))
    return rows


def _growth(label: str, sizes: list[int], low: int, high: int) -> dict[str, object]:
    return {
        "what": f"memory growth, {label}: {sizes[0]:,} vs {sizes[1]:,}",
        "figure": f"{low} MB → {high} MB ({high / low:.2f}×)",
        "target": "flat (≤ 1.2×)",
        "ok": high <= 1.2 * low,
    }


def _median_index(values: list[float]) -> int:
    """The index of the median value (the lower one of an even count)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[(len(order) - 1) // 2]


def _seconds(runs: list[tuple[object, ...]]) -> str:
    """The rounds' times, as ``7.12s`` or ``7.12s/7.40s/6.98s``."""
    return "/".join(f"{run[1]:.2f}s" for run in runs)


def replay_rows(small: bool, tmp: Path) -> list[dict[str, object]]:
    """Replay vs dlt on the same landing zones, both formats, then the floors. At each
    size dlt and both replays run in interleaved rounds: the machine's speed drifts
    from minute to minute, so a ratio compares runs of one round, and the median round's
    ratio is the figure; peak memory is the highest of all rounds."""
    rows: list[dict[str, object]] = []
    sizes = [500, 2_000] if small else [10_000, 100_000]
    rounds = 1 if small else REPLAY_ROUNDS
    peaks: dict[str, list[int]] = {}
    for n_stages in sizes:
        landing = tmp / f"landing-{n_stages}"
        write_landing_zone(landing, n_stages)
        dlts: list[tuple[int, float, int]] = []
        runs: dict[str, list[tuple[int, float, int, int]]] = {"duckdb": [], "parquet": []}
        for round_ in range(rounds):
            dlt = dlt_throughput(landing, tmp, f"{n_stages}-{round_}")
            if dlt is not None:
                dlts.append(dlt)
            for fmt, measured in runs.items():
                measured.append(replay_throughput(f"{n_stages}-{round_}", fmt, landing, tmp))
        if dlts:
            speeds = [stages / seconds for stages, seconds, _ in dlts]
            stages, seconds, _ = dlts[_median_index(speeds)]
            rss = max(d[2] for d in dlts)
            rows.append({
                "what": f"dlt {stages:,} stages → duckdb (parquet loader, append)",
                "figure": f"{stages / seconds:,.0f} stages/s ({_seconds(dlts)}), peak RSS {rss} MB",
                "target": "(for scale)", "ok": None, "stages": stages, "expected_stages": n_stages, "rss_mb": rss,
            })
        for fmt, measured in runs.items():
            speeds = [stages / seconds for stages, seconds, _, _ in measured]
            stages, seconds, _, _ = measured[_median_index(speeds)]
            rss, reader_rss = max(m[2] for m in measured), max(m[3] for m in measured)
            peaks.setdefault(fmt, []).append(max(m[2] + m[3] for m in measured))
            if dlts:
                ratios = [ours / (d[0] / d[1]) for ours, d in zip(speeds, dlts)]
                ratio = ratios[_median_index(ratios)]
                each = "" if len(ratios) == 1 else f" (median of {len(ratios)} rounds: {', '.join(f'{r:.1f}' for r in ratios)})"
                rows.append({
                    "what": f"replay {stages:,} stages → {fmt} vs dlt, same landing zone",
                    "figure": f"{ratio:.1f}× dlt's stages/s{each}",
                    "target": "≥ 5× dlt",
                    "ok": ratio >= 5,
                })
            rows.append({
                "what": f"replay {stages:,} stages → {fmt}",
                "figure": f"{stages / seconds:,.0f} stages/s ({_seconds(measured)}), peak RSS {rss} + reader {reader_rss} MB",
                "target": "≤ 300 MB (both processes)",
                "ok": peaks[fmt][-1] <= 300,
                "stages": stages,
                "expected_stages": n_stages,
                "rss_mb": rss,
                "reader_rss_mb": reader_rss,
                "seconds": seconds,
            })
            if n_stages == sizes[-1]:
                rows.append(replay_in_memory_limit(str(n_stages), fmt, landing, tmp))
    rows.extend(floors(landing, tmp, sizes[-1]))
    for fmt, (low, high) in peaks.items():
        rows.append(_growth(f"replay → {fmt} (both processes)", sizes, low, high))
    rows.append(big_prompt_replay(60 if small else 1_500, tmp))
    return rows


def big_prompt_replay(calls: int, tmp: Path) -> dict[str, object]:
    """Replay of a landing zone where a quarter of the stages carry 100 KB prompts and 1%
    of the calls 1 MB ones: the batches are bounded by bytes, in both processes."""
    data = SyntheticData(n_calls=calls, seed=9, big_prompts=True)
    landing = tmp / f"landing-big-{calls}"
    land_calls(landing, ((c, data.stages_for(c)) for c in data.call_ids), "bench-big")
    expected = sum(len(data.stages_for(c)) for c in data.call_ids)
    stages, seconds, rss, reader_rss = replay_throughput(f"big-{calls}", "duckdb", landing, tmp)
    return {
        "what": f"replay {calls:,} calls ({stages:,} stages, 1/4 with 100 KB prompts, 1% 1 MB) → duckdb, peak RSS",
        "figure": f"{rss} + reader {reader_rss} MB ({seconds:.2f}s)",
        "target": "≤ 400 MB each",
        "ok": max(rss, reader_rss) <= 400,
        "stages": stages,
        "expected_stages": expected,
        "rss_mb": rss,
        "reader_rss_mb": reader_rss,
    }


def export_rows(small: bool, tmp: Path) -> list[dict[str, object]]:
    """Peak memory of the CLI exporting from the sandbox: plain calls, then big prompts."""
    rows: list[dict[str, object]] = []
    export_sizes = [100, 300] if small else [1_000, 10_000]
    peaks: list[int] = []
    for calls in export_sizes:
        stages, rss = export_memory(calls, tmp)
        peaks.append(rss)
        rows.append({
            "what": f"export {calls:,} calls ({stages:,} stages) → duckdb, CLI peak RSS",
            "figure": f"{rss} MB",
            "target": "≤ 300 MB",
            "ok": rss <= 300,
            "stages": stages,
            "rss_mb": rss,
        })
    rows.extend(big_prompt_exports(60 if small else 1_500, tmp))
    rows.append(_growth("export", export_sizes, *peaks))
    return rows


PARTS = ("extraction", "replay", "exports")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--part", choices=PARTS, action="append", help="only these parts (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    small = args.smoke
    parts = args.part or list(PARTS)
    rows: list[dict[str, object]] = []
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if "extraction" in parts:
            rows.extend(extraction_rows(small))
        if "replay" in parts:
            rows.extend(replay_rows(small, tmp))
        if "exports" in parts:
            rows.extend(export_rows(small, tmp))

    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    width = max(len(str(r["what"])) for r in rows)
    figures = max(len(str(r["figure"])) for r in rows)
    print(f"\n{'benchmark'.ljust(width)}  {'figure'.ljust(figures)}  {'target':<28}  met")
    for r in rows:
        met = "" if r["ok"] is None else "yes" if r["ok"] else "NO"
        print(f"{str(r['what']).ljust(width)}  {str(r['figure']).ljust(figures)}  {str(r['target']):<28}  {met}")


if __name__ == "__main__":
    main()

"""One replay, measured: wall time, CPU of the committing and the reader process, and
both peaks. Settings as ``key=value`` (integers or strings), e.g.::

    python bench/replay_cpu.py duckdb RAW_DIR OUT.duckdb
    python bench/replay_cpu.py parquet RAW_DIR OUT_DIR replay_batch_bytes=12582912

Run it alternately with two versions or settings to compare (a noisy machine shifts
both alike).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

from pipeline.config import Settings
from pipeline.log import Reporter
from pipeline.runner import run_replay


def main(fmt: str, raw: str, out: str, *settings: str) -> str:
    extra = dict(item.split("=", 1) for item in settings)
    values = {key: int(value) if value.isdigit() else value for key, value in extra.items()}
    started = time.monotonic()
    result = run_replay(Path(raw), Settings(format=fmt, output=out, **values), Reporter(progress=False))
    seconds = time.monotonic() - started
    own, reader = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open("/proc/self/status") as status:
        peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return (f"{fmt} {values} {result.run.stages_loaded} stages: wall {seconds:.2f}s, "
            f"committing {own.ru_utime:.1f}u+{own.ru_stime:.1f}s, reader {reader.ru_utime:.1f}u+{reader.ru_stime:.1f}s, "
            f"peak RSS {peak_kb >> 10} + reader {(result.reader_peak_rss_kb or 0) >> 10} MB")


if __name__ == "__main__":
    print(main(*sys.argv[1:]))

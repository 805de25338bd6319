"""pipeline.memory: allocator settings that keep long runs flat in RSS."""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pytest

from pipeline import memory


def test_arrow_buffers_come_from_the_system_allocator_after_a_run_starts() -> None:
    memory.use_system_allocator()
    assert pa.default_memory_pool().backend_name == "system"
    assert pa.array(["x" * 1000] * 10).nbytes > 10_000  # and Arrow still allocates


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_batch_memory_goes_back_to_the_os() -> None:
    def rss_mb() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096 // 2**20

    # Prompts of a decoded batch: strings over 512 bytes come from glibc's malloc,
    # which keeps them mapped once freed (smaller objects go back by themselves).
    batch = ["You are a helpful receptionist. " * 20 + str(i) for i in range(100_000)]
    held = rss_mb()
    del batch
    memory.release_free_memory()
    assert rss_mb() < held - 40


def test_the_package_sets_pyarrows_allocator_option_before_pyarrow_loads_and_keeps_a_users_value() -> None:
    import subprocess

    probe = "import os, pipeline, pyarrow; print(os.environ.get('MIMALLOC_ARENA_EAGER_COMMIT'))"
    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_ARENA_EAGER_COMMIT"}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "0"
    env["MIMALLOC_ARENA_EAGER_COMMIT"] = "1"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "1"


def test_arrows_own_allocations_use_the_system_allocator_unless_told() -> None:
    import subprocess

    probe = "import pipeline, pyarrow; print(pyarrow.default_memory_pool().backend_name)"
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "system"
    env["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "jemalloc"


def test_the_replay_reader_loads_no_pyarrow_and_no_duckdb(tmp_path) -> None:
    """pyarrow alone is about 40 MB of a process's memory: the reader sends columns'
    buffers, which only the committing process turns into Arrow tables."""
    import subprocess

    from pipeline.sandbox import SyntheticData, write_landing_zone

    data = SyntheticData(n_calls=40, seed=5)
    write_landing_zone(tmp_path / "raw", ((c, data.stages_for(c)) for c in data.call_ids))
    (tmp_path / "raw" / "hand.jsonl").write_text("not json\n")
    probe = (
        "import os, sys, threading\n"
        "from pipeline.replay_reader import _reader_main\n"
        "read_fd, write_fd = os.pipe()\n"
        "sent = []\n"
        "drain = threading.Thread(target=lambda: sent.extend(iter(lambda: os.read(read_fd, 1 << 20), b'')))\n"
        "drain.start()\n"
        f"_reader_main(write_fd, {str(tmp_path / 'raw')!r}, 10, 1 << 14, 'run-x')\n"
        "drain.join()\n"
        "print(sum(map(len, sent)) > 10_000, sorted(m for m in ('pyarrow', 'duckdb') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split(maxsplit=1) == ["True", "[]\n"]


def test_replaying_into_a_parquet_folder_loads_no_duckdb_and_no_http_stack(tmp_path) -> None:
    """DuckDB costs a Parquet replay's committing process about 45 MB loaded and
    connected (the Parquet output merges etl_calls in pyarrow instead); the HTTP stack
    (httpx, the simulated API, discovery) about 9 MB, and a replay fetches nothing."""
    import subprocess

    from pipeline.sandbox import SyntheticData, write_landing_zone

    data = SyntheticData(n_calls=20, seed=4)
    write_landing_zone(tmp_path / "raw", ((c, data.stages_for(c)) for c in data.call_ids))
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from pipeline.cli import cli\n"
        "for _ in range(2):  # the second replay replaces every call: etl_calls rows are merged\n"
        f"    done = CliRunner().invoke(cli, ['replay', {str(tmp_path / 'raw')!r}, '--format', 'parquet',"
        f" '--output', {str(tmp_path / 'out')!r}, '--no-progress'])\n"
        "    assert done.exit_code == 0, done.output\n"
        "print(sorted(m for m in ('duckdb', 'httpx', 'pipeline.sandbox.app', 'pipeline.discover') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"

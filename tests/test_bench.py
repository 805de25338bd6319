"""The benchmark's smoke run: every comparison runs end to end, and its figures are sane
(right row counts, plausible memory). Speed is never asserted here: that belongs to the
full run, `python bench/run_bench.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


#: Rows each part of the smoke run must print.
LABELS = {
    "extraction": ("extract 40 calls", "end to end 20 calls", "small pages, 100 KB prompts) at 50 ms, server limit 200/s"),
    "replay": ("replay 500 stages → duckdb", "replay 2,000 stages → parquet", "floor: gunzip + decoding the lines only",
               "floor: reading + transforming", "floor: DuckDB warehouse", "floor: pyarrow writing",
               "memory growth, replay → duckdb", "1/4 with 100 KB prompts, 1% 1 MB) → duckdb, peak RSS",
               "stages → duckdb in a 300 MB memory cgroup", "stages → parquet in a 300 MB memory cgroup"),
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


def test_every_duckdb_settings_variant_writes_every_stage(tmp_path: Path) -> None:
    from pipeline.sandbox import SyntheticData, write_landing_zone

    data = SyntheticData(n_calls=20, seed=3)
    write_landing_zone(tmp_path / "raw", ((c, data.stages_for(c)) for c in data.call_ids))
    stages = sum(len(data.stages_for(c)) for c in data.call_ids)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "duckdb_settings.py"), str(tmp_path / "raw"),
                           str(tmp_path / "work"), "--batch-stages", "15"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"prepared {stages} stages")
    sys.path.insert(0, str(ROOT / "bench"))
    import duckdb_settings

    assert [line.split()[0] for line in lines[1:]] == list(duckdb_settings.VARIANTS)
    assert all(f" stages={stages} " in line for line in lines[1:]), lines


def _memcg():
    sys.path.insert(0, str(ROOT / "bench"))
    import memcg

    return memcg


def test_memory_hierarchy_finds_the_v1_and_the_v2_memory_cgroup(tmp_path: Path) -> None:
    memcg = _memcg()
    v1_mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
    assert memcg.memory_hierarchy(v1_mounts, "5:devices:/\n4:memory:/jobs/abc\n0::/\n") == (Path("/sys/fs/cgroup/memory/jobs/abc"), 1)
    own = tmp_path / "user.slice"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert memcg.memory_hierarchy(f"cgroup2 {tmp_path} cgroup2 rw 0 0\n", "0::/user.slice\n") == (own, 2)
    (own / "cgroup.controllers").write_text("cpu io pids\n")
    assert memcg.memory_hierarchy(f"cgroup2 {tmp_path} cgroup2 rw 0 0\n", "0::/user.slice\n") is None
    assert memcg.memory_hierarchy("proc /proc proc rw 0 0\n", "0::/\n") is None


@pytest.mark.parametrize("version", [1, 2])
def test_a_memory_cgroup_writes_its_limit_and_reads_peak_and_oom_kills(tmp_path: Path, version: int) -> None:
    memcg = _memcg()
    files = memcg._V1_FILES if version == 1 else memcg._V2_FILES
    (tmp_path / "measured").mkdir()
    for name in files.values():  # the kernel makes these with the directory
        (tmp_path / "measured" / name).write_text("0\n")
    group = memcg.MemoryCgroup.create("measured", 300 << 20, (tmp_path, version))
    assert group is not None
    assert (tmp_path / "measured" / files["limit"]).read_text() == str(300 << 20)
    (tmp_path / "measured" / files["peak"]).write_text(f"{123 << 20}\n")
    events = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n" if version == 1 else "low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\n"
    (tmp_path / "measured" / files["events"]).write_text(events)
    assert group.peak_bytes() == 123 << 20 and group.oom_kills() == 2
    assert memcg.MemoryCgroup.create("x", 1, (tmp_path / "missing", version)) is None


def test_a_memory_cgroup_without_a_peak_file_is_refused(tmp_path: Path) -> None:
    """cgroup v2 before Linux 5.19 has no memory.peak: the bench must say "not measured", not crash."""
    memcg = _memcg()

    class NoPeak(memcg.MemoryCgroup):
        def _write(self, which: str, value: str) -> None:
            super()._write(which, value)
            (self.path / self.files["events"]).write_text("oom_kill 0\n")

    assert NoPeak.create("old-kernel", 300 << 20, (tmp_path, 2)) is None


def test_a_real_memory_cgroup_charges_a_child_and_kills_it_past_the_limit() -> None:
    memcg = _memcg()
    hog = [sys.executable, "-c", "b = bytearray(120 << 20); b[::4096] = b'x' * len(b[::4096])"]
    roomy = memcg.MemoryCgroup.create(f"ultravox-test-{os.getpid()}-roomy", 400 << 20)
    if roomy is None:
        pytest.skip("no memory cgroup can be made here (needs root and a memory controller)")
    try:
        assert subprocess.run(hog, preexec_fn=roomy.join).returncode == 0
        assert roomy.peak_bytes() >= 120 << 20 and roomy.oom_kills() == 0
    finally:
        roomy.remove()
    tight = memcg.MemoryCgroup.create(f"ultravox-test-{os.getpid()}-tight", 60 << 20)
    assert tight is not None
    try:
        assert subprocess.run(hog, preexec_fn=tight.join).returncode == -9
        assert tight.oom_kills() >= 1
    finally:
        tight.remove()

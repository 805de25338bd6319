"""Runner wiring that end-to-end tests cannot easily provoke."""

from __future__ import annotations

import signal

import pytest

from conftest import KEY
from pipeline.config import Settings
from pipeline.load.duckdb import DuckDBWarehouse
from pipeline.log import Reporter
from pipeline.runner import run_export


def test_a_failing_commit_stops_the_run_instead_of_hanging(tmp_path, start_sandbox, monkeypatch):
    box = start_sandbox(n_calls=400, seed=41)

    def disk_full(self, tables, outcomes, run_id):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DuckDBWarehouse, "commit_calls", disk_full)
    settings = Settings(base_url=box.base_url, output=str(tmp_path / "w.duckdb"), batch_stages=10, max_rps=5000.0)

    def hung(*_):
        raise TimeoutError("run_export hung after the loader failed")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with pytest.raises(OSError, match="No space left"):
            run_export(settings, list(box.data.call_ids), KEY, Reporter(progress=False))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert box.stats.stage_requests < 400  # fetching stopped early

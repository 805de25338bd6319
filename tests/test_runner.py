"""Runner wiring that end-to-end tests cannot easily provoke."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from conftest import KEY
from pipeline.config import Settings
from pipeline.load.duckdb import DuckDBWarehouse
from pipeline.log import Reporter
from pipeline.records import CallFetch, CallOutcome, RunRecord, new_run_id, utcnow
from pipeline.runner import BatchLoader, RunInterrupted, StopSignals, run_export


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


class RecordingWarehouse:
    """Stands in for a warehouse: records each committed batch; may fail chosen calls."""

    def __init__(self, refuse: frozenset[str] = frozenset()):
        self.batches: list[list[str]] = []
        self.published = 0
        self.refuse = refuse

    def commit_calls(self, tables, outcomes, run_id):
        self.batches.append([o.call_id for o in outcomes])
        return [
            CallOutcome(o.call_id, "failed", None, "stage id owned by another call", o.attempted_at)
            if o.call_id in self.refuse else o
            for o in outcomes
        ]

    def publish(self, run):
        self.published += 1


def cid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def _fetch(name: str, nbytes: int) -> CallFetch:
    call_id = cid(name)
    return CallFetch(call_id, "loaded", pages=[{"results": []}], page_urls=[f"http://127.0.0.1/{call_id}"], nbytes=nbytes)


def _loader(warehouse, raw=None, batch_bytes=1000, batch_stages=10_000):
    run = RunRecord(new_run_id(), utcnow(), "test", {})
    return BatchLoader(warehouse, run, Reporter(progress=False), raw, batch_stages, batch_bytes)


def _feed(loader, fetches):
    """What the runner's consumer does with each finished call."""
    for fetch in fetches:
        if not loader.fits(fetch):
            loader.flush()
        loader.add(fetch)
        if loader.full():
            loader.flush()
    loader.flush()


def test_batches_are_bounded_by_bytes_and_a_huge_call_is_a_batch_of_its_own():
    warehouse = RecordingWarehouse()
    loader = _loader(warehouse, batch_bytes=1000)
    sizes = {"a": 400, "b": 400, "c": 400, "huge": 5000, "d": 100, "e": 100}
    _feed(loader, [_fetch(c, n) for c, n in sizes.items()])
    names = {cid(n): n for n in sizes}
    batches = [[names[c] for c in batch] for batch in warehouse.batches]
    assert batches == [["a", "b"], ["c"], ["huge"], ["d", "e"]]
    for batch in batches:
        assert len(batch) == 1 or sum(sizes[c] for c in batch) <= 1000
    assert loader.run.calls_loaded == 6
    assert warehouse.published == len(warehouse.batches)


def test_batches_still_flush_on_stages():
    warehouse = RecordingWarehouse()
    loader = _loader(warehouse, batch_bytes=10**9, batch_stages=3)  # each call weighs one stage here
    _feed(loader, [_fetch(str(i), 1) for i in range(7)])
    assert [len(b) for b in warehouse.batches] == [3, 3, 1]


def test_counts_come_from_the_committed_outcomes():
    warehouse = RecordingWarehouse(refuse=frozenset({cid("b")}))
    loader = _loader(warehouse)
    _feed(loader, [_fetch(c, 10) for c in "abc"])
    assert (loader.run.calls_loaded, loader.run.calls_failed) == (2, 1)


class PickyRawWriter:
    """A landing zone that refuses one call: by an exception, or by naming it (the writer's contract)."""

    def __init__(self, refused: str, how: str):
        self.refused, self.how, self.landed = refused, how, []

    def write(self, fetches):
        ids = [f.call_id for f in fetches]
        if self.refused in ids and self.how == "raise":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        self.landed += [c for c in ids if c != self.refused]
        return {self.refused: "RedactionError: unredactable voice"} if self.refused in ids else {}


@pytest.mark.parametrize("how", ["raise", "name"])
def test_a_call_whose_pages_cannot_be_landed_fails_alone(how):
    raw = PickyRawWriter(cid("bad"), how)
    warehouse = RecordingWarehouse()
    loader = _loader(warehouse, raw=raw)
    _feed(loader, [_fetch(c, 10) for c in ("ok-1", "bad", "ok-2")])
    assert (loader.run.calls_loaded, loader.run.calls_failed) == (2, 1)
    assert sorted(raw.landed) == sorted([cid("ok-1"), cid("ok-2")])
    assert warehouse.batches == [[cid("ok-1"), cid("bad"), cid("ok-2")]]  # failed: recorded, no rows


def test_the_real_raw_writer_never_lands_a_page_it_cannot_redact(tmp_path, monkeypatch):
    import gzip
    import json

    from pipeline import raw as raw_module
    from pipeline.raw import RawWriter

    real = raw_module.redact_page

    def refuse_one(page):
        if page.get("marker") == "poison":
            raise raw_module.RedactionError("voice object of an unknown shape")
        return real(page)

    monkeypatch.setattr(raw_module, "redact_page", refuse_one)
    writer = RawWriter(tmp_path / "raw", "run-1")
    loader = _loader(RecordingWarehouse(), raw=writer)
    fetches = [_fetch(c, 10) for c in ("ok-1", "bad", "ok-2")]
    fetches[1].pages[0]["marker"] = "poison"
    _feed(loader, fetches)
    writer.close()
    [landed] = list((tmp_path / "raw").glob("*.jsonl.gz"))
    lines = [json.loads(line) for line in gzip.decompress(landed.read_bytes()).splitlines()]
    assert sorted(line["call_id"] for line in lines) == sorted([cid("ok-1"), cid("ok-2")])
    assert not list((tmp_path / "raw").glob(".*partial"))


def test_a_raw_dir_that_cannot_be_written_stops_the_run_as_a_warehouse_error(tmp_path):
    from pipeline.errors import WarehouseError

    class FullDisk:
        final_path = tmp_path / "raw" / "run-1.jsonl.gz"

        def write(self, fetches):
            raise OSError(28, "No space left on device")

    loader = _loader(RecordingWarehouse(), raw=FullDisk())
    loader.add(_fetch("a", 1))
    with pytest.raises(WarehouseError, match="No space left on device"):
        loader.flush()


def test_stop_signals_defer_then_restore_and_a_second_signal_would_kill(monkeypatch):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("outer"))
    try:
        with StopSignals() as guard:
            guard.deferring = True
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.signum == signal.SIGTERM
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the next one kills
            assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        assert seen == []
        os.kill(os.getpid(), signal.SIGTERM)  # the handler from before the run is back
        assert seen == ["outer"]
        with StopSignals() as guard, pytest.raises(RunInterrupted) as stopped:
            os.kill(os.getpid(), signal.SIGINT)  # not deferring: stops at once
        assert stopped.value.exit_code == 130
    finally:
        signal.signal(signal.SIGTERM, previous)

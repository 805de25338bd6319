"""Runs: wire extract → (raw landing) → transform → load, and keep etl_runs.

``run_export`` fetches from the API; ``run_replay`` reads a landing zone instead.
Both feed finished calls into one :class:`BatchLoader`, which commits batches of
calls (each call replaced as a unit) and counts outcomes on the run record.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import __version__
from pipeline.config import Settings
from pipeline.errors import AuthError, UnreachableError
from pipeline.extract import ExtractStats, extract_calls
from pipeline.load import Warehouse, open_warehouse
from pipeline.log import Reporter
from pipeline.raw import BadLine, RawWriter, read_landing_zone
from pipeline.records import CallFetch, CallOutcome, RunRecord, new_run_id, utcnow
from pipeline.transform import transform_calls

#: A batch is committed at least this often, so a slow run still makes progress
#: that survives a crash.
FLUSH_EVERY_SECONDS = 5.0


class BatchLoader:
    def __init__(
        self,
        warehouse: Warehouse,
        run: RunRecord,
        reporter: Reporter,
        raw: RawWriter | None = None,
        batch_stages: int = 10000,
    ):
        self.warehouse = warehouse
        self.run = run
        self.reporter = reporter
        self.raw = raw
        self.batch_stages = batch_stages
        self.pending: dict[str, CallFetch] = {}
        self.pending_stages = 0
        self.done = 0
        self.last_flush = time.monotonic()

    def add(self, fetch: CallFetch) -> None:
        # The same call twice in one batch (replay): the later fetch wins.
        self.pending.pop(fetch.call_id, None)
        self.pending[fetch.call_id] = fetch
        self.pending_stages += sum(len(p["results"]) for p in fetch.pages) + 1
        self.done += 1

    def due(self) -> bool:
        return bool(self.pending) and (
            self.pending_stages >= self.batch_stages
            or time.monotonic() - self.last_flush >= FLUSH_EVERY_SECONDS
        )

    def flush(self) -> None:
        fetches = list(self.pending.values())
        self.pending, self.pending_stages = {}, 0
        self.last_flush = time.monotonic()
        if not fetches:
            return
        if self.raw is not None:
            self.raw.write(fetches)  # landed (and fsynced) before anything is transformed
        loaded = [(f.call_id, f.stages()) for f in fetches if f.status == "loaded"]
        result = transform_calls(loaded, self.run.run_id, utcnow())
        outcomes = [self._outcome(f, result.failures, result.stage_counts) for f in fetches]
        self.warehouse.commit_calls(result.tables, outcomes, self.run.run_id)
        for outcome in outcomes:
            self.run.count(outcome)

    def _outcome(self, fetch: CallFetch, failures: dict[str, str], counts: dict[str, int]) -> CallOutcome:
        status, error, stages = fetch.status, fetch.error, None
        if status == "loaded":
            if fetch.call_id in failures:
                status, error = "failed", failures[fetch.call_id]
            else:
                stages = counts.get(fetch.call_id, 0)
                if fetch.total_mismatch:
                    total, rows = fetch.total_mismatch
                    error = f"API reported total {total} but {rows} stages were received"
                    self.reporter.warning("total_mismatch", f"call {fetch.call_id}: {error}", call_id=fetch.call_id)
        elif status == "not_found":
            stages = 0
        if status == "failed":
            self.reporter.warning("call_failed", f"call {fetch.call_id} failed: {error}", call_id=fetch.call_id, reason=error)
        return CallOutcome(fetch.call_id, status, stages, error, fetch.fetched_at)


@dataclass
class RunResult:
    run: RunRecord
    skipped: int = 0
    seconds: float = 0.0
    bad_lines: list[BadLine] = field(default_factory=list)
    stats: ExtractStats | None = None


def _new_run(settings: Settings, extra: dict[str, object] | None = None) -> RunRecord:
    options = settings.public_options() | (extra or {})
    return RunRecord(new_run_id(), utcnow(), __version__, options)


def _finish(warehouse: Warehouse, run: RunRecord, status: str) -> None:
    run.status = status
    run.finished_at = utcnow()
    warehouse.save_run(run)


def run_export(
    settings: Settings,
    call_ids: list[str],
    api_key: str | None,
    reporter: Reporter,
    wait_for_lock: bool = False,
) -> RunResult:
    started = time.monotonic()
    warehouse = open_warehouse(settings.format, settings.output_path, wait_for_lock, settings.duckdb_memory_limit)
    with warehouse:
        statuses = warehouse.call_statuses()
        todo = call_ids if settings.refresh else [c for c in call_ids if statuses.get(c) != "loaded"]
        run = _new_run(settings)
        run.calls_requested = len(todo)
        result = RunResult(run, skipped=len(call_ids) - len(todo))
        if result.skipped:
            reporter.event(
                "calls_skipped",
                f"{result.skipped} call(s) already loaded, skipped (use --refresh to re-fetch)",
                skipped=result.skipped,
            )
        warehouse.save_run(run)
        raw = RawWriter(Path(settings.raw_dir), run.run_id) if settings.raw_dir else None
        loader = BatchLoader(warehouse, run, reporter, raw, settings.batch_stages)
        status = "interrupted"
        try:
            asyncio.run(_extract_into(loader, todo, settings, api_key, reporter, result))
            status = "succeeded" if run.calls_failed == 0 else "partial"
        except AuthError:
            status = "auth_failed"
            raise
        except UnreachableError:
            status = "unreachable"
            raise
        finally:
            if raw is not None:
                raw.close()
            stats = result.stats or ExtractStats()
            run.http_requests, run.http_retries = stats.requests, stats.retries
            _finish(warehouse, run, status)
            result.seconds = time.monotonic() - started
    return result


_TICK = CallFetch("", "failed")  # wakes the consumer to flush on time when calls trickle in


async def _extract_into(
    loader: BatchLoader,
    call_ids: list[str],
    settings: Settings,
    api_key: str | None,
    reporter: Reporter,
    result: RunResult,
) -> None:
    queue: asyncio.Queue[CallFetch | None] = asyncio.Queue(maxsize=settings.concurrency * 8)
    total = len(call_ids)

    def show_progress(force: bool = False) -> None:
        retries = result.stats.retries if result.stats else 0
        reporter.progress(loader.done, total, loader.run.stages_loaded + loader.pending_stages, retries, force)

    async def sink(fetch: CallFetch) -> None:
        await queue.put(fetch)

    async def consume() -> None:
        while True:
            try:
                fetch = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                fetch = _TICK
            if fetch is None:
                break
            if fetch is not _TICK:
                loader.add(fetch)
            show_progress()
            if loader.due():
                await asyncio.to_thread(loader.flush)
        await asyncio.to_thread(loader.flush)
        show_progress(force=True)

    consumer = asyncio.create_task(consume())
    try:
        result.stats = ExtractStats()
        await extract_calls(call_ids, settings, api_key, sink, lambda ex: setattr(ex, "stats", result.stats))
    finally:
        await queue.put(None)
        await consumer


def run_replay(
    raw_dir: Path, settings: Settings, reporter: Reporter, wait_for_lock: bool = False
) -> RunResult:
    started = time.monotonic()
    warehouse = open_warehouse(settings.format, settings.output_path, wait_for_lock, settings.duckdb_memory_limit)
    with warehouse:
        run = _new_run(settings, {"replay": str(raw_dir)})
        warehouse.save_run(run)
        result = RunResult(run)
        loader = BatchLoader(warehouse, run, reporter, None, settings.batch_stages)

        def bad_line(bad: BadLine) -> None:
            result.bad_lines.append(bad)
            reporter.warning("bad_line", f"{bad.where}: {bad.reason}", where=bad.where, reason=bad.reason)

        status = "interrupted"
        try:
            for fetch in read_landing_zone(raw_dir, bad_line):
                loader.add(fetch)
                if loader.pending_stages >= loader.batch_stages:
                    loader.flush()
            loader.flush()
            run.calls_requested = loader.done
            status = "succeeded" if not result.bad_lines and run.calls_failed == 0 else "partial"
        finally:
            _finish(warehouse, run, status)
            result.seconds = time.monotonic() - started
    return result

"""Runs: wire extract → (raw landing) → transform → load, and keep etl_runs.

``run_export`` fetches from the API; ``run_replay`` reads a landing zone instead.
Both feed finished calls into one :class:`BatchLoader`, which commits batches of
calls (each call replaced as a unit) and counts outcomes on the run record.
"""

from __future__ import annotations

import asyncio
from datetime import date
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import __version__, schema
from pipeline.config import Settings
from pipeline.discover import WATERMARK_KEY, Discovered, Discovery, discover, parse_watermark, watermark_row
from pipeline.errors import AuthError, UnreachableError
from pipeline.extract import ExtractStats, extract_calls
from pipeline.load import Warehouse, open_warehouse
from pipeline.log import Reporter
from pipeline.memory import release_free_memory, use_system_allocator
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
        del fetches, loaded, result
        release_free_memory()

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


def _jsonable(values: dict[str, object]) -> dict[str, object]:
    return {k: v.isoformat() if isinstance(v, date) else v for k, v in values.items()}


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
    discovery: Discovery | None = None,
) -> RunResult:
    started = time.monotonic()
    use_system_allocator()
    warehouse = open_warehouse(settings.format, settings.output_path, wait_for_lock, settings.duckdb_memory_limit)
    with warehouse:
        statuses = warehouse.call_statuses()
        run = _new_run(settings, {"discovery": _jsonable(dataclasses.asdict(discovery))} if discovery else None)
        found = _discover(warehouse, settings, api_key, discovery, run, reporter, statuses) if discovery else None
        forced: set[str] = set()
        if found is not None:
            # Listed calls, plus every call still recorded failed (retried whatever its
            # date: it may lie before the listing window by now).
            failed = [c for c, status in statuses.items() if status == "failed"]
            listed = [c for c in found.call_ids + failed if c not in found.deleted]
            call_ids = list(dict.fromkeys(call_ids + listed))
            forced = found.refetch
        todo = [c for c in call_ids if settings.refresh or c in forced or statuses.get(c) != "loaded"]
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
            if found is not None and found.new_watermark is not None:
                # Only now: a crash before this point lists the same window again.
                warehouse.upsert(schema.ETL_STATE, watermark_row(found.new_watermark))
        except AuthError:
            status = "auth_failed"
            raise
        except UnreachableError:
            status = "unreachable"
            raise
        finally:
            if raw is not None:
                raw.close()
            stats = [result.stats or ExtractStats()] + (found.stats if found else [])
            run.http_requests = sum(s.requests for s in stats)
            run.http_retries = sum(s.retries for s in stats)
            _finish(warehouse, run, status)
            result.seconds = time.monotonic() - started
    return result


def _discover(
    warehouse: Warehouse,
    settings: Settings,
    api_key: str | None,
    discovery: Discovery,
    run: RunRecord,
    reporter: Reporter,
    statuses: dict[str, str],
) -> Discovered:
    """List calls (and deleted calls), store them in `calls`, settle deleted ones."""
    watermark = parse_watermark(warehouse.read_state(WATERMARK_KEY)) if discovery.incremental else None
    found = discover(settings, api_key or "", discovery, watermark, run.run_id)
    assert found.calls_rows is not None
    warehouse.upsert(schema.CALLS, found.calls_rows)
    known_deleted = [c for c in found.deleted if c in statuses]
    if known_deleted and not discovery.keep_deleted:
        outcomes = [CallOutcome(c, "not_found", 0, "deleted in Ultravox", found.deleted[c]) for c in known_deleted]
        warehouse.commit_calls({}, outcomes, run.run_id)
    if found.deleted:
        warehouse.flag_deleted(found.deleted)
    reporter.event(
        "calls_listed",
        f"listed {len(found.call_ids)} call(s) since {watermark or discovery.since or 'the beginning'}; "
        f"{len(found.refetch)} inside the overlap window re-fetched; {len(known_deleted)} deleted "
        + ("(kept, flagged)" if discovery.keep_deleted else "(removed)"),
        listed=len(found.call_ids),
        refetch=len(found.refetch),
        deleted=len(known_deleted),
    )
    return found


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
            fetch = await queue.get()
            if fetch is None:
                break
            if fetch is not _TICK:
                loader.add(fetch)
            show_progress()
            if loader.due():
                await asyncio.to_thread(loader.flush)
        await asyncio.to_thread(loader.flush)
        show_progress(force=True)

    async def tick() -> None:
        # Wakes the consumer so a slow trickle of calls is still committed every few
        # seconds. (Not wait_for(queue.get(), timeout): on Python 3.11 a get that
        # completes as the timeout fires loses its item.)
        while True:
            await asyncio.sleep(1.0)
            await queue.put(_TICK)

    result.stats = ExtractStats()
    consumer = asyncio.create_task(consume())
    ticker = asyncio.create_task(tick())
    producer = asyncio.create_task(
        extract_calls(call_ids, settings, api_key, sink, lambda ex: setattr(ex, "stats", result.stats))
    )
    # If loading fails (e.g. the disk is full) the consumer stops taking calls; stop
    # fetching at once instead of letting the workers block on a full queue.
    await asyncio.wait({consumer, producer}, return_when=asyncio.FIRST_COMPLETED)
    if consumer.done():  # before the producer: only by an exception
        ticker.cancel()
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        consumer.result()  # raises what stopped the loader
    try:
        await producer
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        # The end marker, unless the consumer died meanwhile (a full queue would block).
        end = asyncio.create_task(queue.put(None))
        await asyncio.wait({end, consumer}, return_when=asyncio.FIRST_COMPLETED)
        end.cancel()
        await consumer


def run_replay(
    raw_dir: Path, settings: Settings, reporter: Reporter, wait_for_lock: bool = False
) -> RunResult:
    started = time.monotonic()
    use_system_allocator()
    # Write-behind: the next batch is read and transformed while this one is written.
    warehouse = open_warehouse(
        settings.format, settings.output_path, wait_for_lock, settings.duckdb_memory_limit, write_behind=True
    )
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

"""Runs: wire extract → (raw landing) → transform → load; the run's states come from :mod:`pipeline.ledger`.

``run_export`` fetches from the API; ``run_replay`` reads a landing zone instead.
Both feed finished calls into one :class:`BatchLoader`, which commits batches of
calls (each call replaced as a unit) and counts outcomes on the run record.

SIGINT and SIGTERM during a run (:class:`StopSignals`): the first one stops fetching,
commits what was fetched, records the run ``interrupted`` and raises
:class:`RunInterrupted` (exit 130 / 143); a second one kills the process at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Callable

from pipeline import __version__, ledger, schema
from pipeline.config import Settings
from pipeline.errors import EXIT_SIGINT, EXIT_SIGTERM, StagesError, WarehouseError
from pipeline.batch import PendingCalls, PreparedBatch, prepare_batch
from pipeline.parts import PendingParts
from pipeline.load import Warehouse, open_warehouse
from pipeline.log import plural, Progress, Reporter
from pipeline.memory import REPLAY_MMAP_THRESHOLD_BYTES, release_free_memory, use_system_allocator
from pipeline.raw import BadLine, RawWriter, Share, heal_partial_files
from pipeline.replay_reader import ReplayReader, received
from pipeline.records import CallFetch, CallOutcome, ExtractStats, RunRecord, new_run_id, utcnow

if TYPE_CHECKING:
    from pipeline.discover import Discovered, Discovery

#: A batch is committed at least this often, so a slow run keeps progress that survives a crash.
FLUSH_EVERY_SECONDS = 5.0
#: A replay reader sends batches in parts of at most this many stages and page bytes
#: (its memory holds one part; the committing process gathers parts into a batch).
READER_PART_STAGES = 500
READER_PART_BYTES = 768 << 10
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class RunInterrupted(BaseException):
    """The run stopped on SIGINT/SIGTERM (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = signum
        name = SIGNAL_NAMES.get(signum, f"signal {signum}")
        super().__init__(message or f"interrupted by {name}; run again to finish")

    @property
    def exit_code(self) -> int:
        return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM


class StopSignals:
    """SIGINT/SIGTERM handlers for the length of a run; the previous ones come back after.

    While the run opens the output and plans (waiting for a lock, listing calls) the
    first signal raises :class:`RunInterrupted` at once. Once ``deferring`` is set it is
    only recorded in ``signum``, for the run to stop at its next safe point; inside the
    event loop (:meth:`attach`) it calls ``on_stop``. Either way the default handlers
    are put back at the first signal, so a second one kills the process.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}
        self._active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> StopSignals:
        if self._active:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if exc is not None and self.signum is not None and not isinstance(exc, RunInterrupted):
            # What the signal broke off on the way (DuckDB raises "Query interrupted").
            raise RunInterrupted(self.signum) from None

    def attach(self, on_stop: Callable[[], None]) -> None:
        """Within a running event loop: the first signal calls ``on_stop`` on the loop."""
        if self.signum is not None:  # arrived while deferred, before the loop ran
            on_stop()
            return
        if not self._active:
            return
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_loop_signal, sig, on_stop)

    def detach(self) -> None:
        """Leaving the event loop: back to the plain handlers (signals are deferred from here on)."""
        self.deferring = True
        if not self._active:
            return
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)  # puts SIG_DFL / default_int_handler back
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL if self.signum is not None else self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._record(signum)
        if not self.deferring:
            raise RunInterrupted(signum)

    def _on_loop_signal(self, signum: int, on_stop: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        self._record(signum)
        on_stop()

    def _record(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


class BatchLoader:
    """Gathers finished calls and commits them in batches bounded by stages and bytes."""

    def __init__(
        self,
        warehouse: Warehouse,
        run: RunRecord,
        reporter: Reporter,
        raw: RawWriter | None = None,
        batch_stages: int = 10000,
        batch_bytes: int = 4 * 1024 * 1024,
    ):
        self.warehouse = warehouse
        self.run = run
        self.reporter = reporter
        self.raw = raw
        self.pending = PendingCalls(batch_stages, batch_bytes)
        self.done = 0
        self.last_flush = time.monotonic()

    @property
    def pending_stages(self) -> int:
        return self.pending.stages

    def fits(self, fetch: CallFetch) -> bool:
        return self.pending.fits(fetch)

    def add(self, fetch: CallFetch) -> None:
        # The same call twice in one run (replay): the later fetch wins, the call counts once.
        if self.pending.add(fetch) and fetch.call_id not in self.run.tally:
            self.done += 1

    def full(self) -> bool:
        return self.pending.full()

    def due(self) -> bool:
        return self.full() or (bool(self.pending) and time.monotonic() - self.last_flush >= FLUSH_EVERY_SECONDS)

    def flush(self) -> None:
        fetches = self.pending.take()
        self.last_flush = time.monotonic()
        if not fetches:
            return
        fetches = self._land(fetches)  # landed (and fsynced) before anything is transformed
        self.commit(prepare_batch(fetches, self.run.run_id))

    def commit(self, batch: PreparedBatch) -> None:
        """Commit a prepared batch, count its outcomes and report its failures."""
        for event, message, fields in batch.warnings:
            self.reporter.warning(event, message, **fields)
        # As committed: the warehouse fails a call whose stage id another call owns.
        for outcome in self.warehouse.commit_calls(batch.tables, batch.outcomes, self.run.run_id):
            self.run.count(outcome)
            if outcome.status == "failed":
                self.reporter.warning(
                    "call_failed", f"call {outcome.call_id} failed: {outcome.error}",
                    call_id=outcome.call_id, reason=outcome.error,
                )
        self.warehouse.publish(self.run)  # live progress for `status` in another process
        del batch
        release_free_memory()

    def _land(self, fetches: list[CallFetch]) -> list[CallFetch]:
        """Write the batch to the raw zone; a call that cannot be landed fails alone."""
        if self.raw is None:
            return fetches
        try:
            # The writer skips a call whose pages it cannot redact/encode: call id → reason.
            not_landed: dict[str, str] = self.raw.write(fetches) or {}
        except OSError as exc:
            raise _raw_write_error(self.raw, exc) from exc
        except Exception:
            return [self._land_one(f) for f in fetches]  # find the call that broke the batch
        return [_not_landed(f, not_landed[f.call_id]) if f.call_id in not_landed else f for f in fetches]

    def _land_one(self, fetch: CallFetch) -> CallFetch:
        assert self.raw is not None
        try:
            not_landed = self.raw.write([fetch]) or {}
        except OSError as exc:
            raise _raw_write_error(self.raw, exc) from exc
        except Exception as exc:
            return _not_landed(fetch, str(exc) if isinstance(exc, StagesError) else type(exc).__name__)
        return _not_landed(fetch, not_landed[fetch.call_id]) if fetch.call_id in not_landed else fetch


def _not_landed(fetch: CallFetch, reason: str) -> CallFetch:
    return dataclasses.replace(fetch, status="failed", pages=[], page_urls=[],
                               error=f"cannot write its pages to the raw landing zone: {reason}")


def _raw_write_error(raw: RawWriter, exc: OSError) -> WarehouseError:
    return WarehouseError(f"cannot write the raw landing zone {raw.final_path.parent}: {exc.strerror or exc}")


@dataclass
class RunResult:
    run: RunRecord
    skipped: int = 0
    seconds: float = 0.0
    bad_lines: list[BadLine] = field(default_factory=list)
    stats: ExtractStats | None = None
    #: replay: the reader processes' peak resident memory (KiB, summed), where the OS tells it.
    reader_peak_rss_kb: int | None = None


def _new_run(settings: Settings, extra: dict[str, object] | None = None) -> RunRecord:
    options = settings.public_options() | (extra or {})
    return RunRecord(new_run_id(), utcnow(), __version__, options)


def _jsonable(values: dict[str, object]) -> dict[str, object]:
    return {k: v.isoformat() if isinstance(v, date) else v for k, v in values.items()}


def _open(settings: Settings, wait_for_lock: bool, wait_seconds: float | None) -> Warehouse:
    return open_warehouse(
        settings.format, settings.output_location, wait_for_lock or wait_seconds is not None,
        settings.duckdb_memory_limit, wait_seconds=wait_seconds,
    )


def _finish(warehouse: Warehouse, run: RunRecord, status: ledger.RunStatus) -> None:
    ledger.finish(run, status)
    warehouse.save_run(run)


def _finish_after_error(warehouse: Warehouse, run: RunRecord, exc: BaseException, guard: StopSignals) -> None:
    """Record how the run ended, unless the warehouse itself is what failed."""
    status = ledger.status_after_error(exc, guard.signum is not None or isinstance(exc, RunInterrupted))
    try:
        _finish(warehouse, run, status)
    except Exception:  # the error being raised already names the real cause
        pass


def _interrupted(guard: StopSignals, run: RunRecord) -> RunInterrupted:
    assert guard.signum is not None
    name = SIGNAL_NAMES.get(guard.signum, f"signal {guard.signum}")
    done = run.calls_loaded + run.calls_not_found + run.calls_failed
    return RunInterrupted(
        guard.signum,
        f"interrupted by {name}: {done} of {run.calls_requested} call(s) committed (run {run.run_id}); "
        "run again to fetch the rest",
    )


def run_export(
    settings: Settings,
    call_ids: list[str],
    api_key: str | None,
    reporter: Reporter,
    wait_for_lock: bool = False,
    discovery: Discovery | None = None,
    wait_seconds: float | None = None,
) -> RunResult:
    started = time.monotonic()
    use_system_allocator()
    with StopSignals() as guard:
        warehouse = _open(settings, wait_for_lock, wait_seconds)
        with warehouse:
            run = _new_run(settings, {"discovery": _jsonable(dataclasses.asdict(discovery))} if discovery else None)
            result = RunResult(run)
            raw: RawWriter | None = None
            found: Discovered | None = None
            try:
                warehouse.save_run(run)
                found, todo = _plan(warehouse, settings, call_ids, api_key, discovery, run, reporter, result)
                guard.deferring = True  # from here on a signal stops the run at a safe point
                raw = _raw_writer(settings, run, reporter)
                loader = BatchLoader(warehouse, run, reporter, raw, settings.batch_stages, settings.batch_bytes)
                asyncio.run(_extract_into(loader, todo, settings, api_key, reporter, result, guard))
                status = ledger.finished_status(run.calls_failed)
                if guard.signum is None and found is not None and found.new_watermark is not None:
                    # Only now: a crash before this point lists the same window again.
                    warehouse.upsert(schema.ETL_STATE, ledger.watermark_row(found.new_watermark))
            except BaseException as exc:
                guard.deferring = True
                reporter.end_progress()
                _close_raw(raw, quietly=True)
                _count_requests(run, result, found)
                _finish_after_error(warehouse, run, exc, guard)
                if guard.signum is not None:
                    raise _interrupted(guard, run) from None
                raise
            reporter.end_progress()
            _close_raw(raw)
            _count_requests(run, result, found)
            _finish(warehouse, run, ledger.INTERRUPTED if guard.signum else status)
            result.seconds = time.monotonic() - started
    if guard.signum is not None:
        raise _interrupted(guard, run)
    return result


def _plan(
    warehouse: Warehouse,
    settings: Settings,
    call_ids: list[str],
    api_key: str | None,
    discovery: Discovery | None,
    run: RunRecord,
    reporter: Reporter,
    result: RunResult,
) -> tuple[Discovered | None, list[str]]:
    """The calls this run fetches: given, listed, and failed ones retried; loaded ones skipped."""
    statuses = warehouse.call_statuses()
    found = _discover(warehouse, settings, api_key, discovery, run, reporter, statuses) if discovery else None
    forced: set[str] = set()
    if found is not None:
        # Listed calls plus every call still failed, whatever its date (it may lie before the window now).
        failed = [c for c, status in statuses.items() if status == "failed"]
        listed = [c for c in found.call_ids + failed if c not in found.deleted]
        call_ids = list(dict.fromkeys(call_ids + listed))
        forced = found.refetch
    todo = [c for c in call_ids if settings.refresh or c in forced or statuses.get(c) != "loaded"]
    run.calls_requested = len(todo)
    result.skipped = len(call_ids) - len(todo)
    if result.skipped:
        reporter.event(
            "calls_skipped",
            f"{result.skipped} call(s) already loaded, skipped (use --refresh to re-fetch)",
            skipped=result.skipped,
        )
    warehouse.save_run(run)
    warehouse.publish(run)
    reporter.machine(
        "run_started", f"run {run.run_id}: {len(todo)} call(s) to fetch → {settings.output_location}",
        run_id=run.run_id, calls_total=len(todo), skipped=result.skipped, output=settings.output_location,
        format=settings.format,
    )
    return found, todo


def _raw_writer(settings: Settings, run: RunRecord, reporter: Reporter) -> RawWriter | None:
    if not settings.raw_dir:
        return None
    return RawWriter(Path(settings.raw_dir), run.run_id, warn=lambda message: reporter.warning("raw_zone", message))


def _close_raw(raw: RawWriter | None, quietly: bool = False) -> None:
    if raw is None:
        return
    try:
        raw.close()
    except OSError as exc:
        if not quietly:
            raise _raw_write_error(raw, exc) from exc


def _count_requests(run: RunRecord, result: RunResult, found: Discovered | None) -> None:
    stats = [result.stats or ExtractStats()] + (found.stats if found else [])
    run.http_requests = sum(s.requests for s in stats)
    run.http_retries = sum(s.retries for s in stats)


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
    from pipeline.discover import discover, parse_watermark

    watermark = parse_watermark(warehouse.read_state(ledger.WATERMARK_KEY)) if discovery.incremental else None
    found = discover(settings, api_key or "", discovery, watermark, run.run_id)
    assert found.calls_rows is not None
    warehouse.upsert(schema.CALLS, found.calls_rows)
    # Deleted calls already not_found hold no stages: settling them again only adds an attempt.
    to_settle = [c for c in found.deleted if c in statuses and statuses[c] != "not_found"]
    if to_settle and not discovery.keep_deleted:
        outcomes = [CallOutcome(c, "not_found", 0, "deleted in Ultravox", found.deleted[c]) for c in to_settle]
        warehouse.commit_calls({}, outcomes, run.run_id)
    if found.deleted:
        warehouse.flag_deleted(found.deleted)
    if found.future_created:
        reporter.warning(
            "future_created",
            f"{plural(found.future_created, 'listed call')} created later than now: ignored for the watermark",
            future_created=found.future_created,
        )
    reporter.event(
        "calls_listed",
        f"listed {len(found.call_ids)} call(s) since {watermark or discovery.since or 'the beginning'}; "
        f"{len(found.refetch)} inside the overlap window re-fetched; {len(to_settle)} deleted "
        + ("(kept, flagged)" if discovery.keep_deleted else "(removed)"),
        listed=len(found.call_ids),
        refetch=len(found.refetch),
        deleted=len(to_settle),
    )
    return found


_TICK = CallFetch("", "failed")  # wakes the consumer to flush on time when calls trickle in


def _snapshot(loader: BatchLoader, total: int | None, stats: ExtractStats | None) -> Progress:
    stages = loader.run.stages_loaded + loader.pending_stages
    return Progress(loader.done, total, stages, stats.requests if stats else 0, stats.retries if stats else 0)


async def _extract_into(
    loader: BatchLoader,
    call_ids: list[str],
    settings: Settings,
    api_key: str | None,
    reporter: Reporter,
    result: RunResult,
    guard: StopSignals,
) -> None:
    from pipeline.extract import extract_calls

    queue: asyncio.Queue[CallFetch | None] = asyncio.Queue(maxsize=settings.concurrency * 8)
    total = len(call_ids)

    def show_progress(force: bool = False) -> None:
        reporter.progress(_snapshot(loader, total, result.stats), force)

    async def sink(fetch: CallFetch) -> None:
        await queue.put(fetch)

    async def consume() -> None:
        while True:
            fetch = await queue.get()
            if fetch is None:
                break
            if fetch is not _TICK:
                if not loader.fits(fetch):
                    await asyncio.to_thread(loader.flush)
                loader.add(fetch)
            show_progress()
            if loader.due():
                await asyncio.to_thread(loader.flush)
        await asyncio.to_thread(loader.flush)
        show_progress(force=True)

    async def tick() -> None:
        # Not wait_for(queue.get(), timeout): on Python 3.11 a get completing as it times out loses its item.
        while True:
            await asyncio.sleep(1.0)
            await queue.put(_TICK)

    result.stats = ExtractStats()
    consumer = asyncio.create_task(consume())
    ticker = asyncio.create_task(tick())
    producer = asyncio.create_task(
        extract_calls(call_ids, settings, api_key, sink, lambda ex: setattr(ex, "stats", result.stats))
    )
    # A signal stops the fetching; calls already handed over are still committed.
    guard.attach(producer.cancel)
    try:
        await _drain(consumer, producer, ticker, queue, guard)
    finally:
        guard.detach()


async def _drain(
    consumer: asyncio.Task[None],
    producer: asyncio.Task[ExtractStats],
    ticker: asyncio.Task[None],
    queue: asyncio.Queue[CallFetch | None],
    guard: StopSignals,
) -> None:
    # A failed load (e.g. a full disk) stops the consumer: stop fetching before workers block on the queue.
    await asyncio.wait({consumer, producer}, return_when=asyncio.FIRST_COMPLETED)
    if consumer.done():  # before the producer: only by an exception
        ticker.cancel()
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        consumer.result()  # raises what stopped the loader
    try:
        try:
            await producer
        except asyncio.CancelledError:
            if guard.signum is None:
                raise
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        # The end marker, unless the consumer died meanwhile (a full queue would block).
        end = asyncio.create_task(queue.put(None))
        await asyncio.wait({end, consumer}, return_when=asyncio.FIRST_COMPLETED)
        end.cancel()
        await consumer


def run_replay(
    raw_dir: Path,
    settings: Settings,
    reporter: Reporter,
    wait_for_lock: bool = False,
    wait_seconds: float | None = None,
) -> RunResult:
    started = time.monotonic()
    use_system_allocator(REPLAY_MMAP_THRESHOLD_BYTES)
    run = _new_run(settings, {"replay": str(raw_dir)})
    result = RunResult(run)
    with StopSignals() as guard, contextlib.ExitStack() as readers:
        # The readers start (and import) while the warehouse opens; they read once told to.
        count = settings.replay_readers
        batch_stages, batch_bytes = settings.replay_batch()
        part_stages, part_bytes = min(READER_PART_STAGES, batch_stages), min(READER_PART_BYTES, batch_bytes)
        started_readers = [
            readers.enter_context(ReplayReader(raw_dir, part_stages, part_bytes, run.run_id, Share(index, count)))
            for index in range(count)
        ]
        warehouse = _open(settings, wait_for_lock, wait_seconds)
        with warehouse:
            try:
                warehouse.save_run(run)
                warehouse.publish(run)
                reporter.machine("run_started", f"run {run.run_id}: replaying {raw_dir}", run_id=run.run_id,
                                 replay=str(raw_dir), output=settings.output_location, format=settings.format)
                _heal_landing_zone(raw_dir, reporter)
                guard.deferring = True  # stop between batches, never inside a commit
                for reader in started_readers:
                    reader.go()
                _replay_into(started_readers, BatchLoader(warehouse, run, reporter), result, guard,
                             batch_stages, batch_bytes)
                status = ledger.finished_status(run.calls_failed, len(result.bad_lines))
            except BaseException as exc:
                reporter.end_progress()
                _finish_after_error(warehouse, run, exc, guard)
                if guard.signum is not None:
                    raise _interrupted(guard, run) from None
                raise
            reporter.end_progress()
            _finish(warehouse, run, ledger.INTERRUPTED if guard.signum else status)
            result.seconds = time.monotonic() - started
    if guard.signum is not None:
        raise _interrupted(guard, run)
    return result


def _heal_landing_zone(raw_dir: Path, reporter: Reporter) -> None:
    """A run killed while landing left a ``.partial`` file: keep its complete lines."""
    try:
        messages = heal_partial_files(raw_dir)
    except OSError as exc:
        messages = [f"cannot heal the partial files in {raw_dir} ({exc.strerror}); their lines are not replayed"]
    for message in messages:
        reporter.warning("raw_zone", message)


def _replay_into(
    readers: list[ReplayReader], loader: BatchLoader, result: RunResult, guard: StopSignals, batch_stages: int, batch_bytes: int
) -> None:
    """Commit the readers' parts of batches, gathered up to the batch budget, until each
    reader has sent its last message, or a stop signal."""
    gathered = PendingParts(batch_stages, batch_bytes)

    def commit_gathered() -> None:
        if gathered:
            loader.commit(gathered.take())
            loader.done = loader.run.calls_requested = len(loader.run.tally)
            loader.reporter.progress(_snapshot(loader, None, None))

    # While a batch commits, about one more is received.
    for message in received(readers, lambda: guard.signum is not None, batch_bytes):
        for bad in message.bad_lines:
            result.bad_lines.append(bad)
            loader.reporter.warning("bad_line", f"{bad.where}: {bad.reason}", where=bad.where, reason=bad.reason)
        part = message.batch
        if part is None:
            result.reader_peak_rss_kb = (result.reader_peak_rss_kb or 0) + (message.peak_rss_kb or 0)
        else:
            if not gathered.fits(part):
                commit_gathered()
            gathered.add(part)
            if gathered.full():
                commit_gathered()
        if guard.signum is not None:
            break
    commit_gathered()  # what was read is committed, also when a signal stopped the reading
    loader.done = loader.run.calls_requested = len(loader.run.tally)
    loader.reporter.progress(_snapshot(loader, None, None), force=True)

"""Batches: finished calls gathered under a byte and stage budget, then transformed
into the tables and outcomes one warehouse commit takes (replay's reader, which loads no
pyarrow, uses this module too; replay's parts are merged by pipeline.parts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.records import CallFetch, CallOutcome, utcnow
from pipeline.transform import transform_calls, transform_columns


class Budget:
    """What is gathered for one commit, counted against its stage and page-byte budget
    (a subclass says by its truth whether anything is gathered)."""

    def __init__(self, batch_stages: int, batch_bytes: int):
        self.batch_stages = batch_stages
        self.batch_bytes = batch_bytes
        self.stages = 0
        self.nbytes = 0

    def _fits(self, nbytes: int) -> bool:
        """False when ``nbytes`` more would take the batch over its byte budget: flush first.

        Something above the budget on its own still fits an empty batch: it forms its own."""
        return not self or self.nbytes + nbytes <= self.batch_bytes

    def full(self) -> bool:
        return bool(self) and (self.stages >= self.batch_stages or self.nbytes >= self.batch_bytes)


class PendingCalls(Budget):
    """Finished calls waiting for a commit, in a batch bounded by stages and bytes."""

    def __init__(self, batch_stages: int, batch_bytes: int):
        super().__init__(batch_stages, batch_bytes)
        self.calls: dict[str, CallFetch] = {}

    def __bool__(self) -> bool:
        return bool(self.calls)

    def fits(self, fetch: CallFetch) -> bool:
        return self._fits(fetch.nbytes)

    def add(self, fetch: CallFetch) -> bool:
        """Add ``fetch``; False when it replaces a fetch of the same call (the later one wins)."""
        previous = self.calls.pop(fetch.call_id, None)
        if previous is not None:
            self.stages -= _stage_weight(previous)
            self.nbytes -= previous.nbytes
        self.calls[fetch.call_id] = fetch
        self.stages += _stage_weight(fetch)
        self.nbytes += fetch.nbytes
        return previous is None

    def take(self) -> list[CallFetch]:
        fetches = list(self.calls.values())
        self.calls, self.stages, self.nbytes = {}, 0, 0
        return fetches


@dataclass
class PreparedBatch:
    """A batch transformed and ready to commit: its tables, outcomes and the warnings to report."""

    #: By table name: Arrow tables, or their columns (pipeline.columns) as replay's reader sends them.
    tables: dict[str, Any]
    outcomes: list[CallOutcome]
    #: (event, message, fields) for the reporter.
    warnings: list[tuple[str, str, dict[str, Any]]]
    #: The batch's weight as :class:`PendingCalls` counts it: stages (plus one per call) and page bytes.
    stages: int = 0
    nbytes: int = 0


def prepare_batch(fetches: list[CallFetch], run_id: str, as_columns: bool = False) -> PreparedBatch:
    """Transform the loaded calls of ``fetches`` into Arrow tables (or, ``as_columns``,
    into their columns, without pyarrow); one outcome per fetch."""
    loaded = [(f.call_id, f.stages()) for f in fetches if f.status == "loaded"]
    result = (transform_columns if as_columns else transform_calls)(loaded, run_id, utcnow())
    warnings: list[tuple[str, str, dict[str, Any]]] = []
    outcomes = [_outcome(f, result.failures, result.stage_counts, warnings) for f in fetches]
    return PreparedBatch(result.tables, outcomes, warnings, sum(map(_stage_weight, fetches)), sum(f.nbytes for f in fetches))


def _outcome(
    fetch: CallFetch, failures: dict[str, str], counts: dict[str, int], warnings: list[tuple[str, str, dict[str, Any]]]
) -> CallOutcome:
    status, error, stages = fetch.status, fetch.error, None
    if status == "loaded":
        if fetch.call_id in failures:
            status, error = "failed", failures[fetch.call_id]
        else:
            stages = counts.get(fetch.call_id, 0)
            if fetch.total_mismatch:
                total, rows = fetch.total_mismatch
                error = f"API reported total {total} but {rows} stages were received"
                warnings.append(("total_mismatch", f"call {fetch.call_id}: {error}", {"call_id": fetch.call_id}))
    elif status == "not_found":
        stages = 0
    return CallOutcome(fetch.call_id, status, stages, error, fetch.fetched_at)


def _stage_weight(fetch: CallFetch) -> int:
    return sum(len(p["results"]) for p in fetch.pages) + 1

"""Replay's parts of batches (prepared apart by its readers) gathered and merged into
the batches the warehouse commits."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.batch import Budget, PreparedBatch
from pipeline.records import CallOutcome


class PendingParts(Budget):
    """Parts of batches prepared apart (replay's readers send them), gathered into one
    commit under the same budget as :class:`PendingCalls`."""

    def __init__(self, batch_stages: int, batch_bytes: int):
        super().__init__(batch_stages, batch_bytes)
        self.parts: list[PreparedBatch] = []

    def __bool__(self) -> bool:
        return bool(self.parts)

    def fits(self, part: PreparedBatch) -> bool:
        return self._fits(part.nbytes)

    def add(self, part: PreparedBatch) -> None:
        self.parts.append(part)
        self.stages += part.stages
        self.nbytes += part.nbytes

    def take(self) -> PreparedBatch:
        """The parts as one batch (see :func:`merge_batches`)."""
        merged = merge_batches(self.parts)
        self.parts, self.stages, self.nbytes = [], 0, 0
        return merged


def merge_batches(batches: Sequence[PreparedBatch]) -> PreparedBatch:
    """Batches prepared apart, as one commit: a later fetch of a call replaces its earlier
    one, and a stage id an earlier call of the commit holds fails the later call alone."""
    if len(batches) == 1:
        return batches[0]
    if _disjoint(batches):
        dropped: list[list[str]] = [[] for _ in batches]
        outcomes = [o for b in batches for o in b.outcomes]
    else:
        last, losers, dropped = _overlaps(batches)
        outcomes = [_failed(o, losers) for index, b in enumerate(batches) for o in b.outcomes
                    if last[_normal(o.call_id)] == index]
    return PreparedBatch(
        {name: pa.concat_tables([_without(b.tables[name], drop) for b, drop in zip(batches, dropped, strict=True)])
         for name in batches[0].tables},
        outcomes,
        [w for b in batches for w in b.warnings],
        sum(b.stages for b in batches),
        sum(b.nbytes for b in batches),
    )


def _overlaps(batches: Sequence[PreparedBatch]) -> tuple[dict[str, int], dict[str, str], list[list[str]]]:
    """({call: the last batch holding it}, {call failed: why}, per batch the calls to drop)."""
    last = {_normal(o.call_id): index for index, batch in enumerate(batches) for o in batch.outcomes}
    owners: dict[str, str] = {}
    losers: dict[str, str] = {}
    dropped: list[list[str]] = []
    for index, batch in enumerate(batches):
        superseded = [_normal(o.call_id) for o in batch.outcomes if last[_normal(o.call_id)] != index]
        stages = batch.tables.get("call_stages")
        ids = stages.select(["call_stage_id", "call_id"]).to_pydict() if stages is not None else {"call_id": []}
        claims: dict[str, list[str]] = {}
        for stage_id, call_id in zip(ids.get("call_stage_id", []), ids["call_id"], strict=True):
            claims.setdefault(call_id, []).append(stage_id.lower())
        for call_id, stage_ids in claims.items():
            if last[call_id] != index:
                continue
            taken = next((s for s in stage_ids if owners.get(s, call_id) != call_id), None)
            if taken is not None:
                losers[call_id] = f"stage {taken} also belongs to call {owners[taken]}"
            else:
                owners.update(dict.fromkeys(stage_ids, call_id))
        dropped.append(superseded + [c for c in claims if c in losers])
    return last, losers, dropped


def _disjoint(batches: Sequence[PreparedBatch]) -> bool:
    """Whether no call and no stage id is in two of the batches (the usual case, checked in bulk)."""
    calls = pa.chunked_array([pa.array([o.call_id for o in b.outcomes], pa.string()) for b in batches])
    stages = [b.tables["call_stages"]["call_stage_id"] for b in batches if "call_stages" in b.tables]
    stage_ids = pc.utf8_lower(pa.chunked_array([c for ids in stages for c in ids.chunks], pa.string()))
    return (pc.count_distinct(pc.utf8_lower(pc.utf8_trim_whitespace(calls))).as_py() == len(calls)
            and pc.count_distinct(stage_ids).as_py() == len(stage_ids))


def _normal(call_id: str) -> str:
    return call_id.strip().lower()


def _without(table: pa.Table, call_ids: list[str]) -> pa.Table:
    if not call_ids:
        return table
    return table.filter(pc.invert(pc.is_in(table["call_id"], value_set=pa.array(call_ids, pa.string()))))


def _failed(outcome: CallOutcome, losers: dict[str, str]) -> CallOutcome:
    reason = losers.get(_normal(outcome.call_id))
    return outcome if reason is None else CallOutcome(outcome.call_id, "failed", None, reason, outcome.attempted_at)



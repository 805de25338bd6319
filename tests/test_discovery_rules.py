"""Discovery rules: the watermark moves only forward, only with --incremental, never to
an implausible future; inverted ranges are usage errors; listed calls are redacted."""

from __future__ import annotations

import json
from datetime import date, datetime, timezone

import duckdb
import httpx
import pytest
from click.testing import CliRunner

from conftest import KEY
from pipeline.cli import cli
from pipeline.config import Settings
from pipeline.discover import MAX_CLOCK_SKEW, Discovery, advance_watermark, discover, parse_watermark
from pipeline.errors import UsageError
from pipeline.sandbox import Sandbox, SandboxOptions, SyntheticData

FAR_FUTURE = "9999-12-31T23:59:59Z"
PLANTED = "sk-planted-listed-call-9f8e7d"
A = "6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
B = "00000000-0000-4000-8000-000000000001"
C = "00000000-0000-4000-8000-000000000002"


# --------------------------------------------------------------------------- pure rules


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def test_watermark_ignores_future_and_never_moves_back():
    now = utc(2025, 6, 10, 12)
    old = utc(2025, 6, 9)
    newest, future = advance_watermark(old, [utc(2025, 6, 8), utc(9999, 12, 31), None, now + MAX_CLOCK_SKEW * 2], now)
    assert (newest, future) == (old, 2)  # nothing plausible is newer than the old watermark
    newest, future = advance_watermark(old, [utc(2025, 6, 10), now + MAX_CLOCK_SKEW / 2], now)
    assert (newest, future) == (now + MAX_CLOCK_SKEW / 2, 0)  # within the clock skew: plausible
    assert advance_watermark(None, [utc(9999, 12, 31)], now) == (None, 1)
    assert advance_watermark(None, [], now) == (None, 0)


def test_inverted_range_is_a_usage_error():
    with pytest.raises(UsageError) as err:
        Discovery(since=date(2025, 6, 5), until=date(2025, 6, 1))
    assert err.value.exit_code == 2
    assert "--since 2025-06-05 is after --until 2025-06-01" in str(err.value)
    Discovery(since=date(2025, 6, 1), until=date(2025, 6, 1))  # one day is fine


def test_watermark_round_trips():
    value = utc(2025, 6, 3, 4, 5, 6, 123456)
    from pipeline.discover import watermark_row

    stored = watermark_row(value)["value"][0].as_py()
    assert parse_watermark(stored) == value
    assert parse_watermark("not a time") is None and parse_watermark(None) is None


# --------------------------------------------------------------------------- discover() on a mock API


def listed(call_id: str, created: str, **extra) -> dict:
    return {"callId": call_id, "created": created, "endReason": "hangup", **extra}


def mock_api(calls: list[dict], deleted: list[dict] | None = None) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        results = calls if request.url.path == "/api/calls" else (deleted or [])
        return httpx.Response(200, json={"next": None, "previous": None, "results": results, "total": len(results)})

    return httpx.MockTransport(answer), seen


SETTINGS = Settings(base_url="http://127.0.0.1:9", max_attempts=1)


def test_future_created_does_not_move_the_watermark():
    old = utc(2025, 6, 5)
    calls = [listed(A, "2025-06-06T10:00:00Z"), listed(B, FAR_FUTURE), listed(C, "2025-06-04T01:00:00+02:00")]
    transport, _ = mock_api(calls)
    found = discover(SETTINGS, KEY, Discovery(incremental=True), old, "run-1", transport=transport)
    assert found.new_watermark == utc(2025, 6, 6, 10)
    assert found.future_created == 1
    assert set(found.call_ids) == {A, B, C}  # the future call is still exported
    assert B in found.refetch


def test_only_future_calls_keep_the_old_watermark():
    old = utc(2025, 6, 5)
    transport, _ = mock_api([listed(A, FAR_FUTURE), listed(B, "2025-06-01T00:00:00Z")])
    found = discover(SETTINGS, KEY, Discovery(incremental=True), old, "run-1", transport=transport)
    assert (found.new_watermark, found.future_created) == (old, 1)


def test_backfill_never_sets_a_watermark():
    transport, seen = mock_api([listed(A, "2025-06-06T10:00:00Z")])
    found = discover(SETTINGS, KEY, Discovery(since=date(2025, 6, 6), until=date(2025, 6, 7)), None, "run-1",
                     transport=transport)
    assert found.call_ids == [A]
    assert found.new_watermark is None
    assert [r.url.path for r in seen] == ["/api/calls"]  # deleted calls are read by incremental runs only
    assert seen[0].url.params["fromDate"] == "2025-06-06" and seen[0].url.params["toDate"] == "2025-06-07"


def test_listed_calls_are_redacted_before_they_are_stored():
    voice = {"generic": {"url": "https://tts.example/v1", "headers": {"Authorization": f"Bearer {PLANTED}"}}}
    transport, _ = mock_api([listed(A, "2025-06-06T10:00:00Z", externalVoice=voice)])
    found = discover(SETTINGS, KEY, Discovery(incremental=True), None, "run-1", transport=transport)
    raw = found.calls_rows["raw"][0].as_py()
    assert PLANTED not in raw
    assert json.loads(raw)["externalVoice"]["generic"]["headers"] == {"Authorization": "<redacted>"}


def test_malformed_created_is_not_a_time():
    transport, _ = mock_api([listed(A, "2025-06-06 10:00"), listed(B, "2025-02-30T00:00:00Z"), listed(C, 20250606)])
    found = discover(SETTINGS, KEY, Discovery(incremental=True), None, "run-1", transport=transport)
    assert found.calls_rows["created"].to_pylist() == [None, None, None]
    assert found.new_watermark is None


# --------------------------------------------------------------------------- the real CLI on the sandbox


class FutureData(SyntheticData):
    """Calls exist only once created before ``listed_before``; ``future_id`` is served with a
    ``created`` of 9999-12-31 (a corrupt clock or record upstream)."""

    future_id: str | None = None

    def call_for(self, call_id):
        call = super().call_for(call_id)
        if call_id == self.future_id:
            call["created"] = FAR_FUTURE
        return call


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args), env={"ULTRAVOX_API_KEY": KEY})
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.exception
    return result


def query(db, sql, params=()):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def stored_watermark(db) -> datetime | None:
    rows = query(db, "SELECT value FROM etl_state WHERE key = 'watermark_created'")
    return parse_watermark(rows[0][0]) if rows else None


@pytest.fixture
def serve():
    running: list[Sandbox] = []

    def start(data: SyntheticData) -> Sandbox:
        box = Sandbox(data, SandboxOptions(api_key=KEY)).start()
        running.append(box)
        return box

    yield start
    for box in running:
        box.stop()


def test_future_call_does_not_block_later_incremental_runs(tmp_path, serve):
    data = FutureData(n_calls=120, seed=41)
    created = {c: datetime.fromisoformat(data.call_for(c)["created"]) for c in data.call_ids}
    ordered = sorted(created.values())
    data.listed_before = ordered[-30]  # the newest 30 calls do not exist yet
    visible = [c for c, when in created.items() if when < data.listed_before]
    data.future_id = min(visible, key=created.get)
    db = tmp_path / "w.duckdb"

    box = serve(data)
    first = invoke("run", "--incremental", "--output", str(db), "--base-url", box.base_url, "--no-progress")
    assert first.exit_code == 0, first.output
    assert stored_watermark(db) == max(created[c] for c in visible)
    served = query(db, "SELECT created FROM calls WHERE call_id = ?", [data.future_id])[0][0]
    assert served.year == 9999  # stored as served; only the watermark ignores it

    data.listed_before = None
    box = serve(data)
    second = invoke("run", "--incremental", "--output", str(db), "--base-url", box.base_url, "--no-progress")
    assert second.exit_code == 0, second.output
    new = [c for c, when in created.items() if when >= ordered[-30]]
    loaded = {r[0] for r in query(db, "SELECT call_id::VARCHAR FROM etl_calls WHERE status = 'loaded'")}
    assert set(new) <= loaded
    after_incremental = stored_watermark(db)
    assert after_incremental == ordered[-1]

    # A backfill over the oldest day lists and loads, and leaves the watermark alone.
    day = ordered[0].date().isoformat()
    backfill = invoke("run", "--since", day, "--until", day, "--refresh", "--output", str(db),
                      "--base-url", box.base_url, "--no-progress")
    assert backfill.exit_code == 0, backfill.output
    assert stored_watermark(db) == after_incremental


def test_backfill_of_a_fresh_warehouse_stores_no_watermark(tmp_path, serve):
    data = FutureData(n_calls=40, seed=42)
    box = serve(data)
    db = tmp_path / "w.duckdb"
    res = invoke("run", "--since", "2025-06-01", "--until", "2025-07-01", "--output", str(db),
                 "--base-url", box.base_url, "--no-progress")
    assert res.exit_code == 0, res.output
    assert query(db, "SELECT count(*) FROM calls")[0][0] == 40
    assert stored_watermark(db) is None


def test_inverted_range_exits_2_before_anything_is_opened(tmp_path):
    db = tmp_path / "w.duckdb"
    res = invoke("run", "--since", "2025-06-05", "--until", "2025-06-01", "--output", str(db),
                 "--base-url", "http://127.0.0.1:9")
    assert res.exit_code == 2
    assert "is after --until" in res.output
    assert not db.exists()

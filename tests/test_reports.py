"""The analysts' reports (sql/*.sql via pipeline.reports), checked against figures
computed independently in Python from the very stage dicts that were loaded.

Quantiles: DuckDB's ``quantile_cont(x, q)`` interpolates linearly between the two
nearest ranks: with the n values sorted, position h = (n - 1) * q, result
x[floor(h)] + (h - floor(h)) * (x[ceil(h)] - x[floor(h)]) -- numpy's "linear" method,
Python's ``statistics.quantiles(method="inclusive")``. :func:`quantile_cont` below is
that definition.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import random
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pipeline import reports
from pipeline.errors import UsageError
from pipeline.records import rfc3339

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
RUN_OLD, RUN_NEW = "20250309T120000Z-aaaaaa", "20250310T120000Z-bbbbbb"
QUOTED_MODEL = "o'brien"
PROVIDERS = ("elevenLabs", "cartesia", "lmnt", "google", "inworld", "respeecher", "generic")
END_BEHAVIORS = ("END_BEHAVIOR_UNSPECIFIED", "END_BEHAVIOR_HANG_UP_SOFT", "END_BEHAVIOR_HANG_UP_STRICT")


# --------------------------------------------------------------------------- source data


def _uuid(n: int) -> str:
    return str(uuid.UUID(int=n))


def _stage(call_id: str, stage_n: int, created: str, **fields: Any) -> dict[str, Any]:
    stage: dict[str, Any] = {
        "callId": call_id,
        "callStageId": _uuid(10_000_000 + stage_n),
        "created": created,
        "model": "fixie-ai/ultravox",
        "systemPrompt": "You are helpful.",
        "temperature": 0.2,
        "errorCount": 0,
        "experimentalSettings": None,
        "initialState": {},
        "initialTokenCount": 100,
        "latestTokenCount": 150,
    }
    stage.update(fields)
    return stage


def edge_calls() -> list[tuple[str, list[dict[str, Any]]]]:
    """Hand-written calls covering NULLs, every provider, odd names and time zones."""
    c = [_uuid(1_000 + i) for i in range(8)]
    return [
        (c[0], [
            _stage(c[0], 1, "2025-03-01T10:00:00Z", model=QUOTED_MODEL, initialTokenCount=None,
                   latestTokenCount=None, errorCount=4, languageHint="en",
                   externalVoice={"elevenLabs": {"voiceId": "v-eleven", "model": "eleven_turbo_v2",
                                                 "speed": 1.1, "stability": 0.5, "similarityBoost": 0.75,
                                                 "style": 0.1, "useSpeakerBoost": True,
                                                 "enableSsmlParsing": True,
                                                 "pronunciationDictionaries": [{"dictionaryId": "d"}]}},
                   inactivityMessages=[{"duration": "30s", "message": "Still there?"},
                                       {"duration": "1.500s", "message": "Bye",
                                        "endBehavior": "END_BEHAVIOR_HANG_UP_SOFT"}]),
            _stage(c[0], 2, "2025-03-01T10:05:00Z", model=QUOTED_MODEL, initialTokenCount=200,
                   latestTokenCount=None, errorCount=None,
                   externalVoice={"elevenLabs": {"voiceId": "v-eleven", "stability": "high"}}),
        ]),
        (c[1], [
            # 23:30 at UTC-2 is 01:30 UTC the next day: reports group on the UTC date.
            _stage(c[1], 3, "2025-03-02T23:30:00-02:00", voice="Mark",
                   voiceOverrides={"elevenLabs": {"stability": 0.3}}, languageHint="de", errorCount=1),
            _stage(c[1], 4, "2025-03-03T02:00:00Z", voice=None, errorCount=2),  # no voice at all
            _stage(c[1], 5, "2025-03-03T03:00:00Z",
                   externalVoice={"cartesia": {"voiceId": "v-cart", "model": "sonic-2", "emotion": "calm",
                                               "emotions": ["positivity:high", "curiosity"],
                                               "generationConfig": {"emotion": "content", "speed": 1.2,
                                                                    "volume": 0.9}}}),
        ]),
        (c[2], [
            _stage(c[2], 6, "2025-03-03T04:00:00Z",
                   externalVoice={"generic": {"url": "https://tts.example/v1", "responseSampleRate": 24000,
                                              "headers": {"Authorization": "Bearer s3cr3t", "X-Org": "o"},
                                              "body": {"text": "{text}"}, "responseMimeType": "audio/l16"}}),
            _stage(c[2], 7, "2025-03-03T05:00:00Z",
                   externalVoice={"inworld": {"voiceId": "Ashley", "modelId": "inworld-tts-1-max",
                                              "speakingRate": 1.2, "temperature": 0.7,
                                              "applyTextNormalization": False}}),
            _stage(c[2], 8, "2025-03-03T06:00:00Z",
                   externalVoice={"google": {"voiceId": "en-US-Chirp3-HD-Charon", "speakingRate": 0.9}}),
            _stage(c[2], 9, "2025-03-03T07:00:00Z",
                   externalVoice={"lmnt": {"voiceId": "lily", "model": "aurora", "speed": 1.5,
                                           "conversational": True}}),
            _stage(c[2], 10, "2025-03-03T08:00:00Z",
                   externalVoice={"respeecher": {"voiceId": "sam", "model": "/v1/public/tts/en-rt", "seed": 7,
                                                 "temperature": 0.4, "topK": -1, "topP": 0.9, "minP": 0.05,
                                                 "presencePenalty": 0.1, "repetitionPenalty": 1.1,
                                                 "frequencyPenalty": 0.2}}),
            _stage(c[2], 11, "2025-03-03T09:00:00Z", externalVoice={"playHt": {"voiceId": "old"}},
                   errorCount=3),
        ]),
        # Loaded with no stages at all.
        (c[3], []),
    ]


def random_calls(n_calls: int, seed: int) -> list[tuple[str, list[dict[str, Any]]]]:
    """Seeded, independent of the sandbox: a varied mix for the distribution reports."""
    rng = random.Random(seed)
    models = ["fixie-ai/ultravox", "fixie-ai/ultravox-70B", QUOTED_MODEL]
    durations = ["30s", "15s", "1.500s", "0.000000001s", "45.250s", "60s"]
    calls = []
    stage_n = 1_000
    for i in range(n_calls):
        call_id = _uuid(2_000 + i)
        stages = []
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 5])):
            stage_n += 1
            created = datetime(2025, 3, 1, tzinfo=timezone.utc) + timedelta(minutes=rng.randrange(6 * 24 * 60))
            initial = None if rng.random() < 0.15 else rng.randrange(50, 2_000)
            latest = None if rng.random() < 0.15 else (initial or 0) + rng.randrange(0, 5_000)
            fields: dict[str, Any] = {
                "model": rng.choice(models),
                "initialTokenCount": initial,
                "latestTokenCount": latest,
                "errorCount": rng.choice([0, 0, 0, 1, 2, 5]),
                "languageHint": rng.choice([None, "en", "en-US", "de"]),
            }
            kind = rng.random()
            if kind < 0.3:
                fields["voice"] = rng.choice(["Mark", "Jessica"])
                if rng.random() < 0.3:
                    fields["voiceOverrides"] = {"cartesia": {"speed": 0.5}}
            elif kind < 0.85:
                provider = rng.choice(PROVIDERS)
                fields["externalVoice"] = {provider: {"voiceId": f"{provider}-{rng.randrange(3)}",
                                                      "stability": round(rng.random(), 2)}}
            messages = []
            for _ in range(rng.choice([0, 0, 1, 2, 3])):
                message = {"duration": rng.choice(durations), "message": "hello?"}
                behavior = rng.choice(END_BEHAVIORS + (None,))
                if behavior:
                    message["endBehavior"] = behavior
                messages.append(message)
            if messages or rng.random() < 0.5:
                fields["inactivityMessages"] = messages
            stages.append(_stage(call_id, stage_n, created.isoformat().replace("+00:00", "Z"), **fields))
        calls.append((call_id, stages))
    return calls


def sandbox_calls() -> list[tuple[str, list[dict[str, Any]]]]:
    """The simulated API's deterministic data (every provider, two unknown ones, NULL
    token counts, extreme durations, calls with 0 and 12 stages)."""
    from pipeline.sandbox import SyntheticData

    data = SyntheticData(n_calls=250, seed=3)  # the pinned variety: every provider, 0 and 8+ stages
    return [(str(cid).lower(), list(data.stages_for(cid))) for cid in data.call_ids]


FAILED_CALL = _uuid(9_001)
NOT_FOUND_CALL = _uuid(9_002)


def all_calls() -> list[tuple[str, list[dict[str, Any]]]]:
    return edge_calls() + random_calls(80, seed=11) + sandbox_calls()


# --------------------------------------------------------------------------- warehouses


def build_warehouse(fmt: str, path: Path, calls: list[tuple[str, list[dict[str, Any]]]]) -> None:
    from pipeline.load import open_warehouse
    from pipeline.records import CallOutcome, RunRecord
    from pipeline.transform import transform_calls

    result = transform_calls(calls, RUN_NEW, NOW)
    assert not result.failures, result.failures
    outcomes = [CallOutcome(cid, "loaded", result.stage_counts[cid], None, NOW) for cid, _ in calls]
    outcomes.append(CallOutcome(FAILED_CALL, "failed", None, "HTTP 503 after 6 attempts", NOW))
    outcomes.append(CallOutcome(NOT_FOUND_CALL, "not_found", 0, None, NOW))
    old = RunRecord(RUN_OLD, NOW - timedelta(days=1), "0.1.0", {"format": fmt},
                    finished_at=NOW - timedelta(days=1) + timedelta(seconds=42), status="partial",
                    calls_requested=3, calls_failed=3)
    new = RunRecord(RUN_NEW, NOW, "0.1.0", {"format": fmt}, finished_at=NOW + timedelta(seconds=5),
                    status="succeeded", calls_requested=len(outcomes))
    for outcome in outcomes:
        new.count(outcome)
    warehouse = open_warehouse(fmt, path)
    warehouse.open()
    try:
        warehouse.save_run(old)
        warehouse.commit_calls(result.tables, outcomes, RUN_NEW)
        warehouse.save_run(new)
    finally:
        warehouse.close()


@pytest.fixture(scope="module")
def calls() -> list[tuple[str, list[dict[str, Any]]]]:
    return all_calls()


@pytest.fixture(scope="module")
def stages(calls: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    return [s for _, ss in calls for s in ss]


@pytest.fixture(scope="module")
def duck(tmp_path_factory: pytest.TempPathFactory, calls: Any) -> Path:
    path = tmp_path_factory.mktemp("reports") / "stages.duckdb"
    build_warehouse("duckdb", path, calls)
    return path


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory, calls: Any) -> Path:
    path = tmp_path_factory.mktemp("reports") / "stages_parquet"
    build_warehouse("parquet", path, calls)
    return path


#: No filter, then all three (the quoted model, a date range of the hand-written calls).
FILTER_SETS: tuple[dict[str, Any], ...] = ({}, {"model": QUOTED_MODEL, "since": "2025-03-01", "until": "2025-03-04"})


@contextlib.contextmanager
def one_connection(fmt: str, path: Path) -> Iterator[None]:
    """Reports on ``path`` read through cursors of one connection instead of opening their own
    (each a new connection to the same views; closing it leaves the views in place)."""
    import pipeline.load

    real = pipeline.load.query_connection
    shared = real(fmt, path)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pipeline.load, "query_connection",
                          lambda f, p: shared.cursor() if (f, Path(p)) == (fmt, path) else real(f, p))
            yield
    finally:
        shared.close()


def rows(path: Path, name: str, fmt: str = "duckdb", *, exact: bool = False, **params: Any) -> list[dict[str, Any]]:
    """A report's JSON output; ``exact`` reads DECIMAL columns back as Decimal."""
    text = reports.run_report(fmt, path, name, "json", params)
    data: list[dict[str, Any]] = json.loads(text, parse_float=Decimal) if exact else json.loads(text)
    return data


# --------------------------------------------------------------------------- independent figures


def quantile_cont(values: Sequence[float], q: float) -> float | None:
    """DuckDB's quantile_cont: linear interpolation at position (n - 1) * q."""
    if not values:
        return None
    ordered = sorted(values)
    h = (len(ordered) - 1) * q
    lo, hi = math.floor(h), math.ceil(h)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def utc_day(stage: dict[str, Any]) -> str | None:
    created = stage.get("created")
    if created is None:
        return None
    return datetime.fromisoformat(created).astimezone(timezone.utc).date().isoformat()


def growth_of(stage: dict[str, Any]) -> int | None:
    """latest - initial token count; NULL (None) when either count is NULL."""
    initial, latest = stage.get("initialTokenCount"), stage.get("latestTokenCount")
    return None if initial is None or latest is None else int(latest) - int(initial)


def models_of(stages: Iterable[dict[str, Any]]) -> str | None:
    """string_agg(DISTINCT model, ', ' ORDER BY model): NULLs skipped, NULL if none."""
    models = sorted({s["model"] for s in stages if s.get("model") is not None})
    return ", ".join(models) if models else None


def provider_of(voice: Any) -> str | None:
    if not isinstance(voice, dict) or not voice:
        return None
    return next(str(k) for k, v in voice.items() if v is not None)


def settings_of(voice: Any) -> dict[str, Any]:
    settings: dict[str, Any] = voice[provider_of(voice)]
    return settings


def stage_filter(since: str | None = None, until: str | None = None, model: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def keep(stage: dict[str, Any]) -> bool:
        day = utc_day(stage)  # a NULL created date matches no date filter (SQL NULL comparison)
        return (since is None or (day is not None and day >= since)) and (
            until is None or (day is not None and day <= until)
        ) and (model is None or stage.get("model") == model)

    return keep


def nsum(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2)


def offsets(stage: dict[str, Any]) -> list[Decimal]:
    out, total = [], Decimal(0)
    for message in stage.get("inactivityMessages") or []:
        if message.get("duration") is not None:  # a missing duration adds nothing
            total += Decimal(message["duration"][:-1])
        out.append(total)
    return out


def trim(value: Decimal) -> str:
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


# --------------------------------------------------------------------------- reports vs. Python


def test_every_report_runs_on_duckdb_in_every_style(duck: Path) -> None:
    names = reports.report_names()
    assert len(names) >= 15
    with one_connection("duckdb", duck):
        for name in names:
            for style in reports.STYLES:
                out = reports.run_report("duckdb", duck, name, style, {})
                assert out.strip(), (name, style)


def test_report_files_follow_the_header_convention() -> None:
    for name in reports.report_names():
        description, sql = reports.load_report(name)
        assert description and not description.startswith("name:"), name
        assert set(reports.sql_parameters(sql)) <= set(reports.PARAMETERS), name
        assert "{" not in re.sub(r"'[^']*'", "", sql), f"{name}: no Python formatting in SQL"


def test_token_usage_by_model_day(duck: Path, stages: list[dict[str, Any]]) -> None:
    groups: dict[tuple[str | None, str | None], list[dict[str, Any]]] = defaultdict(list)
    for s in stages:
        groups[(utc_day(s), s.get("model"))].append(s)
    expected = {
        key: {
            "stages": len(ss),
            "stages_with_tokens": sum(s.get("latestTokenCount") is not None for s in ss),
            "stages_without_tokens": sum(s.get("latestTokenCount") is None for s in ss),
            "initial_tokens": nsum(s.get("initialTokenCount") for s in ss),
            "latest_tokens": nsum(s.get("latestTokenCount") for s in ss),
            "tokens_added": nsum(growth_of(s) for s in ss),
        }
        for key, ss in groups.items()
    }
    got = {(r["day"], r["model"]): {k: v for k, v in r.items() if k not in ("day", "model")} for r in rows(duck, "token_usage_by_model_day")}
    assert got == expected
    # The stage at 23:30 -02:00 on 2 March is counted on 3 March (UTC).
    assert ("2025-03-03", "fixie-ai/ultravox") in got
    # NULL token counts are not zeros: the quoted model's first day has a stage with none.
    edge = got[("2025-03-01", QUOTED_MODEL)]
    assert edge["stages_without_tokens"] >= 2


def test_token_growth_by_model(duck: Path, stages: list[dict[str, Any]]) -> None:
    by_model: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for s in stages:
        by_model[s.get("model")].append(s)
    got = {r["model"]: r for r in rows(duck, "token_growth_by_model")}
    assert set(got) == set(by_model)
    for model, ss in by_model.items():
        growth = [g for g in map(growth_of, ss) if g is not None]
        r = got[model]
        assert r["stages"] == len(ss)
        assert r["stages_measured"] == len(growth)
        assert r["p50_growth"] == pytest.approx(quantile_cont(growth, 0.5))
        assert r["p90_growth"] == pytest.approx(quantile_cont(growth, 0.9))
        assert r["max_growth"] == (max(growth) if growth else None)
        assert r["avg_growth"] == pytest.approx(round(sum(growth) / len(growth), 2), abs=0.006)


def test_quantile_definition_matches_duckdb() -> None:
    import duckdb

    values = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    con = duckdb.connect()
    for q in (0.1, 0.5, 0.9, 0.95):
        row = con.execute("SELECT quantile_cont(v, $q) FROM unnest($vals) t(v)", {"q": q, "vals": values}).fetchall()[0]
        assert row is not None
        (got,) = row
        assert got == pytest.approx(quantile_cont(values, q))


def test_stages_per_call(duck: Path, calls: list[tuple[str, list[dict[str, Any]]]]) -> None:
    counts = Counter(len(ss) for _, ss in calls)
    assert counts[0] >= 1  # the loaded call without stages is listed
    total = sum(counts.values())
    got = rows(duck, "stages_per_call")
    assert [(r["stages_in_call"], r["calls"]) for r in got] == sorted(counts.items())
    cumulative = 0
    for r in got:
        cumulative += r["calls"]
        assert r["pct_calls"] == pytest.approx(pct(r["calls"], total), abs=0.006)
        assert r["cumulative_pct"] == pytest.approx(pct(cumulative, total), abs=0.006)
    # With a filter, zero-stage calls (no created date) cannot match and are left out.
    filtered = rows(duck, "stages_per_call", model=QUOTED_MODEL)
    per_call = Counter(s["callId"].lower() for _, ss in calls for s in ss if s.get("model") == QUOTED_MODEL)
    assert [(r["stages_in_call"], r["calls"]) for r in filtered] == sorted(Counter(per_call.values()).items())


def effective_provider(s: dict[str, Any]) -> str:
    return (provider_of(s.get("externalVoice")) or provider_of(s.get("voiceOverrides"))
            or ("(built-in)" if s.get("voice") is not None else "(none)"))


def test_errors_by_model_voice_language(duck: Path, stages: list[dict[str, Any]]) -> None:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for s in stages:
        groups[(s.get("model"), effective_provider(s), s.get("languageHint"))].append(s)
    expected = {
        key: (len(ss), sum((s.get("errorCount") or 0) > 0 for s in ss), sum(s.get("errorCount") or 0 for s in ss))
        for key, ss in groups.items()
    }
    got_rows = rows(duck, "errors_by_model_voice_language")
    got = {(r["model"], r["voice_provider"], r["language_hint"]): (r["stages"], r["stages_with_errors"], r["errors"])
           for r in got_rows}
    assert got == expected
    assert [r["errors"] for r in got_rows] == sorted((r["errors"] for r in got_rows), reverse=True)
    assert any(p == "(none)" for _, p, _ in got) and any(p == "(built-in)" for _, p, _ in got)
    assert any(p == "playHt" for _, p, _ in got)  # unknown providers kept as-is
    # Per provider, the totals add up to the stage dicts' error counts.
    by_provider: Counter[str] = Counter()
    for s in stages:
        by_provider[effective_provider(s)] += s.get("errorCount") or 0
    summed: Counter[str] = Counter()
    for r in got_rows:
        summed[r["voice_provider"]] += r["errors"]
    assert +summed == +by_provider


def test_calls_with_errors_worst_first(duck: Path, calls: list[tuple[str, list[dict[str, Any]]]]) -> None:
    expected = []
    for cid, ss in calls:
        errors = sum(s.get("errorCount") or 0 for s in ss)
        if errors > 0:
            with_errors = sum((s.get("errorCount") or 0) > 0 for s in ss)
            expected.append((-errors, -with_errors, cid, len(ss), models_of(ss)))
    expected.sort()
    got = rows(duck, "calls_with_errors")
    assert [(-r["errors"], -r["stages_with_errors"], r["call_id"], r["stages"], r["models"]) for r in got] == expected


def test_inactivity_setups(duck: Path, stages: list[dict[str, Any]]) -> None:
    setups: Counter[tuple[int, str, str]] = Counter()
    for s in stages:
        messages = s.get("inactivityMessages") or []
        setups[(
            len(messages),
            " / ".join(trim(o) for o in offsets(s)),
            " / ".join((m.get("endBehavior") or "END_BEHAVIOR_UNSPECIFIED").removeprefix("END_BEHAVIOR_") for m in messages),
        )] += 1
    got = rows(duck, "inactivity_setups")
    assert {(r["messages"], r["offsets_seconds"], r["end_behaviors"]): r["stages"] for r in got} == dict(setups)
    assert [r["stages"] for r in got] == sorted((r["stages"] for r in got), reverse=True)
    assert sum(r["stages"] for r in got) == len(stages)
    assert (2, "30 / 31.5", "UNSPECIFIED / HANG_UP_SOFT") in setups
    for r in got:
        assert r["pct_stages"] == pytest.approx(pct(r["stages"], len(stages)), abs=0.006)


def test_inactivity_by_position(duck: Path, stages: list[dict[str, Any]]) -> None:
    by_position: dict[int, list[tuple[Decimal, Decimal | None, str]]] = defaultdict(list)
    for s in stages:
        for position, (message, offset) in enumerate(zip(s.get("inactivityMessages") or [], offsets(s))):
            behavior = message.get("endBehavior") or "END_BEHAVIOR_UNSPECIFIED"
            duration = None if message.get("duration") is None else Decimal(message["duration"][:-1])
            by_position[position].append((offset, duration, behavior))
    got = {r["position"]: r for r in rows(duck, "inactivity_by_position", exact=True)}
    assert set(got) == set(by_position)
    for position, items in by_position.items():
        r = got[position]
        ends = Counter(b for _, _, b in items)
        assert r["messages"] == len(items)
        # DECIMAL(38,9) offsets come back exactly (up to ±315,576,000,000 s), not via float.
        assert r["min_offset_seconds"] == min(o for o, _, _ in items)
        assert r["max_offset_seconds"] == max(o for o, _, _ in items)
        median = quantile_cont([float(o) for o, _, _ in items], 0.5)
        assert float(r["median_offset_seconds"]) == pytest.approx(median)
        known = [d for _, d, _ in items if d is not None]
        assert r["min_duration_seconds"] == (min(known) if known else None)
        assert r["max_duration_seconds"] == (max(known) if known else None)
        assert r["end_unspecified"] == ends["END_BEHAVIOR_UNSPECIFIED"]
        assert r["end_hang_up_soft"] == ends["END_BEHAVIOR_HANG_UP_SOFT"]
        assert r["end_hang_up_strict"] == ends["END_BEHAVIOR_HANG_UP_STRICT"]
        assert r["end_other"] == sum(n for b, n in ends.items() if b not in END_BEHAVIORS)
        assert r["ends_call"] == ends["END_BEHAVIOR_HANG_UP_SOFT"] + ends["END_BEHAVIOR_HANG_UP_STRICT"]


def test_voice_usage(duck: Path, stages: list[dict[str, Any]]) -> None:
    usage: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for s in stages:
        external = s.get("externalVoice")
        if provider_of(external):
            key = ("external", provider_of(external), settings_of(external).get("voiceId"))
        elif s.get("voice") is not None:
            key = ("built-in", provider_of(s.get("voiceOverrides")), s.get("voice"))
        else:
            key = ("none", provider_of(s.get("voiceOverrides")), None)
        usage[key].append(s)
    expected = {
        key: (len(ss), sum(bool(provider_of(s.get("voiceOverrides"))) for s in ss), len({s["callId"].lower() for s in ss}))
        for key, ss in usage.items()
    }
    got = rows(duck, "voice_usage")
    assert {(r["voice_source"], r["provider"], r["voice"]): (r["stages"], r["stages_with_overrides"], r["calls"]) for r in got} == expected
    assert sum(r["stages"] for r in got) == len(stages)  # every stage exactly once


def voices_of(stages: list[dict[str, Any]], provider: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    out = []
    for s in stages:
        for field, role in (("externalVoice", "external"), ("voiceOverrides", "override")):
            if provider_of(s.get(field)) == provider:
                out.append((role, s, settings_of(s[field])))
    return out


def test_typed_voice_views_have_one_row_per_voice(duck: Path, stages: list[dict[str, Any]]) -> None:
    for provider in PROVIDERS:
        got = rows(duck, f"voices_{provider.lower()}")
        expected = Counter((s["callStageId"].lower(), role) for role, s, _ in voices_of(stages, provider))
        assert Counter((r["call_stage_id"], r["role"]) for r in got) == expected, provider


def _by_stage(got: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["call_stage_id"], r["role"]): r for r in got}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def test_voices_elevenlabs_typed(duck: Path, stages: list[dict[str, Any]]) -> None:
    got = _by_stage(rows(duck, "voices_elevenlabs"))
    for role, s, settings in voices_of(stages, "elevenLabs"):
        r = got[(s["callStageId"].lower(), role)]
        assert r["stability"] == _num(settings.get("stability"))  # "high" → NULL, not an error
        assert r["similarity_boost"] == _num(settings.get("similarityBoost"))
        assert r["style"] == _num(settings.get("style"))
        assert r["use_speaker_boost"] == settings.get("useSpeakerBoost")
        assert r["voice_id"] == settings.get("voiceId")
    first = got[(_uuid(10_000_001), "external")]
    assert (first["tts_model"], first["speed"], first["enable_ssml_parsing"], first["pronunciation_dictionaries"]) == (
        "eleven_turbo_v2", 1.1, True, 1)
    override = got[(_uuid(10_000_003), "override")]
    assert override["stability"] == 0.3 and override["voice_id"] is None


def test_voices_cartesia_generic_and_others_typed(duck: Path) -> None:
    cart = _by_stage(rows(duck, "voices_cartesia"))[(_uuid(10_000_005), "external")]
    assert cart["emotion"] == "calm"
    assert cart["emotions"] == ["positivity:high", "curiosity"]
    assert (cart["generation_emotion"], cart["generation_speed"], cart["generation_volume"]) == ("content", 1.2, 0.9)
    generic = _by_stage(rows(duck, "voices_generic"))[(_uuid(10_000_006), "external")]
    assert generic["url"] == "https://tts.example/v1"
    assert generic["response_sample_rate"] == 24000
    assert generic["response_mime_type"] == "audio/l16"
    assert sorted(generic["header_names"]) == ["Authorization", "X-Org"]
    assert generic["body"] == {"text": "{text}"}
    inworld = _by_stage(rows(duck, "voices_inworld"))[(_uuid(10_000_007), "external")]
    assert (inworld["model_id"], inworld["speaking_rate"], inworld["temperature"], inworld["apply_text_normalization"]) == (
        "inworld-tts-1-max", 1.2, 0.7, False)
    google = _by_stage(rows(duck, "voices_google"))[(_uuid(10_000_008), "external")]
    assert (google["voice_id"], google["speaking_rate"], google["speed"]) == ("en-US-Chirp3-HD-Charon", 0.9, 0.9)
    lmnt = _by_stage(rows(duck, "voices_lmnt"))[(_uuid(10_000_009), "external")]
    assert (lmnt["tts_model"], lmnt["speed"], lmnt["conversational"]) == ("aurora", 1.5, True)
    resp = _by_stage(rows(duck, "voices_respeecher"))[(_uuid(10_000_010), "external")]
    assert (resp["seed"], resp["top_k"], resp["top_p"], resp["min_p"], resp["repetition_penalty"]) == (7, -1, 0.9, 0.05, 1.1)


def test_generic_header_values_never_appear(duck: Path) -> None:
    for style in reports.STYLES:
        assert "s3cr3t" not in reports.run_report("duckdb", duck, "voices_generic", style, {})


def test_data_freshness_recent_runs_failed_calls(duck: Path, calls: list[tuple[str, list[dict[str, Any]]]], stages: list[dict[str, Any]]) -> None:
    (fresh,) = rows(duck, "data_freshness")
    assert fresh["last_run_id"] == RUN_NEW and fresh["last_run_status"] == "succeeded"
    assert fresh["last_success_at"] == "2025-03-10T12:00:05.000000Z"
    assert (fresh["calls_loaded"], fresh["calls_not_found"], fresh["calls_failed"]) == (len(calls), 1, 1)
    assert fresh["stages"] == len(stages)
    newest = max(datetime.fromisoformat(s["created"]).astimezone(timezone.utc) for s in stages if s.get("created"))
    assert fresh["newest_stage_created"] == rfc3339(newest)
    assert fresh["hours_since_last_success"] > 0
    runs = rows(duck, "recent_runs")
    assert [r["run_id"] for r in runs] == [RUN_NEW, RUN_OLD]
    assert runs[0]["seconds"] == 5.0 and runs[1]["status"] == "partial"
    assert runs[0]["calls_loaded"] == len(calls) and runs[0]["stages_loaded"] == len(stages)
    failed = rows(duck, "failed_calls")
    assert [(r["call_id"], r["attempts"], r["error"]) for r in failed] == [(FAILED_CALL, 1, "HTTP 503 after 6 attempts")]


# --------------------------------------------------------------------------- parameters


def test_filters_are_bound_and_change_results(duck: Path, stages: list[dict[str, Any]]) -> None:
    everything = rows(duck, "token_usage_by_model_day")
    quoted = rows(duck, "token_usage_by_model_day", model=QUOTED_MODEL)
    assert quoted and {r["model"] for r in quoted} == {QUOTED_MODEL}
    assert len(quoted) < len(everything)
    assert sum(r["stages"] for r in quoted) == sum(s.get("model") == QUOTED_MODEL for s in stages)
    # Injection attempts are just values that match nothing.
    assert rows(duck, "token_usage_by_model_day", model="x' OR '1'='1") == []
    assert rows(duck, "calls_with_errors", model="'); DROP TABLE call_stages; --") == []
    assert rows(duck, "token_usage_by_model_day") == everything


def test_date_filters_are_inclusive_utc_dates(duck: Path, stages: list[dict[str, Any]]) -> None:
    days = sorted({d for d in map(utc_day, stages) if d is not None})
    middle = days[len(days) // 2]
    for since, until in (("2025-03-03", "2025-03-04"), (middle, middle), (None, middle), (middle, None)):
        keep = stage_filter(since=since, until=until)
        got = rows(duck, "token_usage_by_model_day", since=since, until=until)
        assert all((since or "") <= r["day"] <= (until or "9999") for r in got)
        assert sum(r["stages"] for r in got) == sum(keep(s) for s in stages) > 0
    both = stage_filter(since="2025-03-02", until="2025-03-05", model="fixie-ai/ultravox")
    got = rows(duck, "errors_by_model_voice_language", since="2025-03-02", until="2025-03-05", model="fixie-ai/ultravox")
    assert sum(r["errors"] for r in got) == sum(s.get("errorCount") or 0 for s in stages if both(s))
    voices = rows(duck, "voices_elevenlabs", since="2025-03-03", until="2025-03-03")
    assert all(r["created"].startswith("2025-03-03") for r in voices)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"since": "2025-3-1"}, "YYYY-MM-DD"),
        ({"until": "2025-02-30"}, "not a valid date"),
        ({"since": "yesterday"}, "YYYY-MM-DD"),
        ({"since": "2025-03-05", "until": "2025-03-01"}, "after"),
    ],
)
def test_invalid_dates_are_usage_errors(duck: Path, params: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        reports.run_report("duckdb", duck, "token_usage_by_model_day", "table", params)


def test_filters_a_report_does_not_take_are_ignored(duck: Path) -> None:
    plain = reports.run_report("duckdb", duck, "recent_runs", "json", {})
    # recent_runs mentions no $parameter: the filters are dropped, not bound (DuckDB
    # would reject an unused named parameter) and not an error.
    assert reports.run_report("duckdb", duck, "recent_runs", "json", {"model": "m", "since": "2025-01-01"}) == plain
    # None means "not given" (the CLI passes all three).
    assert reports.run_report("duckdb", duck, "recent_runs", "json", {"since": None, "until": None, "model": None}) == plain
    # Dates are still validated.
    with pytest.raises(UsageError, match="YYYY-MM-DD"):
        reports.run_report("duckdb", duck, "recent_runs", "json", {"since": "soon"})
    # A report that uses only some parameters gets only those.
    assert reports.bind_parameters("r", "SELECT $model", {"model": "a", "since": "2025-01-01"}) == {"model": "a"}


def test_unknown_report_lists_the_known_ones(duck: Path) -> None:
    with pytest.raises(UsageError) as info:
        reports.run_report("duckdb", duck, "no_such_report", "table", {})
    for name in reports.report_names():
        assert name in str(info.value)


def test_only_mentioned_parameters_are_bound() -> None:
    sql = "SELECT 1 -- $until in a comment\nWHERE '$.model' <> $since::VARCHAR AND \"$x\" = 1"
    assert reports.sql_parameters(sql) == ["since"]
    assert reports.bind_parameters("r", "SELECT $model", {"model": "a", "since": None}) == {"model": "a"}


# --------------------------------------------------------------------------- output styles


def parse_table(text: str) -> list[dict[str, str]]:
    """Read a table back using the dashed rule for the column boundaries."""
    lines = text.splitlines()
    header, rule, body = lines[0], lines[1], lines[2:]
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    names = [header[a:b].strip() for a, b in spans]
    return [dict(zip(names, (line[a:b].strip() for a, b in spans))) for line in body if line != "(no rows)"]


def test_outputs_parse_back_to_the_same_rows(duck: Path) -> None:
    for name in ("token_usage_by_model_day", "errors_by_model_voice_language", "inactivity_setups", "voices_cartesia"):
        data = rows(duck, name)
        assert data, name
        parsed_csv = list(csv.DictReader(io.StringIO(reports.run_report("duckdb", duck, name, "csv", {}))))
        parsed_table = parse_table(reports.run_report("duckdb", duck, name, "table", {}))
        assert len(parsed_csv) == len(parsed_table) == len(data)
        for j, c, t in zip(data, parsed_csv, parsed_table):
            assert list(c) == list(t) == list(j)
            for key, value in j.items():
                if value is None:
                    assert c[key] == "" and t[key] == ""
                elif isinstance(value, bool):
                    assert c[key] == t[key] == str(value).lower()
                elif isinstance(value, (int, float)):
                    assert float(c[key]) == pytest.approx(value)
                    assert float(t[key]) == pytest.approx(value, abs=1e-4)
                elif isinstance(value, list):
                    assert json.loads(c[key]) == value
                else:
                    assert c[key] == value


def test_json_writes_decimals_exactly_and_other_values_sensibly() -> None:
    big = Decimal("315576000120.663677766")
    text = reports.render_json(
        ["offset", "whole", "items", "at", "naive", "day", "settings", "nan", "trap"],
        ["DECIMAL(38,9)", "DECIMAL(38,9)", "DECIMAL(38,9)[]", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP", "DATE", "JSON", "DOUBLE", "VARCHAR"],
        [(big, Decimal("-2.000000000"), [Decimal("1.500000000"), None],
          datetime(2025, 3, 1, 9, 30, 0, 123456, tzinfo=timezone(timedelta(hours=-2))),
          datetime(2025, 3, 1, 9, 30), date(2025, 3, 1),
          '{"k": [1, "x"]}', float("nan"), '\x00decimal-0000:0"')],
    )
    (record,) = json.loads(text, parse_float=Decimal)
    assert record == {
        "offset": big, "whole": -2, "items": [Decimal("1.5"), None], "at": "2025-03-01T11:30:00.123456Z",
        "naive": "2025-03-01T09:30:00.000000Z",
        "day": "2025-03-01", "settings": {"k": [1, "x"]}, "nan": None, "trap": '\x00decimal-0000:0"',
    }
    assert "315576000120.663677766" in text


def test_table_style_aligns_numbers_right(duck: Path) -> None:
    text = reports.run_report("duckdb", duck, "stages_per_call", "table", {})
    lines = text.splitlines()
    assert lines[0].split() == ["stages_in_call", "calls", "pct_calls", "cumulative_pct"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    width = len(lines[1])
    assert all(len(line) == width for line in lines[2:]), "right-aligned numbers end at the rule's end"


def test_empty_results_render_in_every_style(duck: Path) -> None:
    params = {"model": "no such model"}
    assert reports.run_report("duckdb", duck, "voices_lmnt", "json", params) == "[]"
    assert reports.run_report("duckdb", duck, "voices_lmnt", "csv", params).splitlines()[0].startswith("call_id,")
    assert reports.run_report("duckdb", duck, "voices_lmnt", "table", params).endswith("(no rows)")


def test_list_reports_names_and_describes_every_report() -> None:
    listing = reports.list_reports()
    for name in reports.report_names():
        description, sql = reports.load_report(name)
        suffix = "" if reports.sql_parameters(sql) else rf"\s+{re.escape(reports.NO_FILTERS)}"
        assert re.search(rf"^\s+{name}\s+{re.escape(description)}{suffix}$", listing, re.M), name
    assert listing.count(reports.NO_FILTERS) == 3  # data_freshness, failed_calls, recent_runs


def test_cli_report_command(duck: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    runner = CliRunner()
    listed = runner.invoke(cli, ["report"])
    assert listed.exit_code == 0 and "token_usage_by_model_day" in listed.output
    ran = runner.invoke(cli, ["report", "stages_per_call", "--output", str(duck), "--format", "json"])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.output)[0]["stages_in_call"] == 0
    unknown = runner.invoke(cli, ["report", "nope", "--output", str(duck)])
    assert unknown.exit_code == 2 and "known reports" in unknown.output
    bad = runner.invoke(cli, ["report", "stages_per_call", "--output", str(duck), "--since", "03/01/2025"])
    assert bad.exit_code == 2


# --------------------------------------------------------------------------- docs and packaging


def test_every_report_is_named_in_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for name in reports.report_names() if name not in readme]
    assert not missing, f"reports missing from README.md: {missing}"


def test_reports_come_from_the_pipeline_sql_package() -> None:
    from importlib import resources

    packaged = sorted(e.name[:-4] for e in resources.files("pipeline.sql").iterdir() if e.name.endswith(".sql"))
    assert packaged == reports.report_names()
    assert packaged == sorted(p.stem for p in (ROOT / "sql").glob("*.sql"))


# --------------------------------------------------------------------------- Parquet


#: Columns that depend on the clock of the reading, not on the data.
VOLATILE = {"hours_since_last_success"}


def stable_rows(path: Path, name: str, fmt: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows(path, name, fmt, **params)]


@pytest.fixture(scope="module")
def duck_answers(duck: Path) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every report's DuckDB answer for each of FILTER_SETS: what the Parquet readings must equal."""
    with one_connection("duckdb", duck):
        return {(name, i): stable_rows(duck, name, "duckdb", params)
                for name in reports.report_names() for i, params in enumerate(FILTER_SETS)}


def test_every_report_gives_the_same_answer_on_parquet(duck_answers: dict, parquet: Path) -> None:
    with one_connection("parquet", parquet):
        for name in reports.report_names():
            for i, params in enumerate(FILTER_SETS):
                _, sql = reports.load_report(name)
                if params and not reports.sql_parameters(sql):
                    continue
                assert stable_rows(parquet, name, "parquet", params) == duck_answers[name, i], name


def write_contract_parquet(duck: Path, out: Path) -> None:
    """The documented Parquet layout, written straight from the DuckDB warehouse.

    UUID and JSON columns become plain strings (schema.py's Arrow types) and call_stages
    is hive-partitioned on created_date -- the shapes the real Parquet output has, so the
    reports are known to run on them even before pipeline.load.parquet exists.
    """
    import duckdb

    from pipeline import schema

    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("ATTACH ? AS wh (READ_ONLY)", [str(duck)])
        for table in schema.TABLES.values():
            cols = ", ".join(
                f"{c.name}::VARCHAR AS {c.name}" if c.sql_type in (schema.UUID, schema.JSON) else c.name
                for c in table.columns
            )
            target = out / table.name
            target.mkdir(parents=True)
            if table.name == "call_stages":
                con.execute(
                    f"COPY (SELECT {cols}, timezone('UTC', created)::DATE AS created_date FROM wh.{table.name}) "
                    f"TO '{target}' (FORMAT parquet, PARTITION_BY (created_date))"
                )
            else:
                con.execute(f"COPY (SELECT {cols} FROM wh.{table.name}) TO '{target / 'part-0.parquet'}' (FORMAT parquet)")
    finally:
        con.close()


def contract_parquet_views(path: Path) -> Any:
    import duckdb

    from pipeline import schema

    con = duckdb.connect()
    for table in schema.TABLES:
        glob = str(path / table / "**" / "*.parquet")
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{glob}', hive_partitioning = true)")
    return con


def test_every_report_runs_unchanged_on_the_documented_parquet_layout(
    duck: Path, duck_answers: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same answers on string-typed UUID/JSON columns read with read_parquet (a stand-in
    for pipeline.load.parquet.connect_views, which the test above uses)."""
    import pipeline.load

    out = tmp_path / "parquet"
    write_contract_parquet(duck, out)
    views = contract_parquet_views(out)
    real = pipeline.load.query_connection
    # A cursor is a connection of its own to the same views; closing it leaves them in place.
    monkeypatch.setattr(pipeline.load, "query_connection",
                        lambda fmt, path: views.cursor() if fmt == "parquet" else real(fmt, path))
    try:
        for name in reports.report_names():
            for i, params in enumerate(FILTER_SETS):
                assert stable_rows(out, name, "parquet", params) == duck_answers[name, i], name
    finally:
        views.close()

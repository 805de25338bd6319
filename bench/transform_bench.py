"""Micro-benchmark of ``transform_calls`` alone (no HTTP, no DuckDB).

    /tmp/venv/bin/python bench/transform_bench.py             # ~20,000 stages, best of 5
    /tmp/venv/bin/python bench/transform_bench.py --stages 5000 --repeat 2 --profile

Stages are generated in memory, seeded, and look like the live API's: system prompts
of 0.5–4 KB in lines (quotes, some non-ASCII), 0–5 inactivity messages with the usual
durations, one external voice (every provider, a generic one with a bearer header now
and then) and sometimes voice overrides; ~3.2 KB of JSON a stage. Calls have 1–5 stages.

Each run transforms fresh stages in batches of 10,000 stages. ``--form objects``:
objects decoded with ``json.loads``, as the extractor hands them over (no warm
caches). ``--form bytes``: each page decoded by ``api_schema.decode_page`` into its
stages' bytes, as ``replay`` hands them over (that decode is timed too). Prints
stages/s of the best run and, for scale, how fast ``json.loads`` alone decodes the
same stages on this machine.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.api_schema import decode_page  # noqa: E402
from pipeline.transform import transform_calls  # noqa: E402

_WORDS = (
    "You are a friendly receptionist for Acme Dental . Keep answers short , confirm the "
    "patient's name and date of birth , never give medical advice , offer the next free "
    "slot , and transfer to a human when asked . Ärzte café naïve — 日本語 OK ."
).split()
_DURATIONS = ("30s", "15s", "60s", "10s", "1.500s", "45.250s", "20s", "120s")
_BEHAVIORS = (None, "END_BEHAVIOR_HANG_UP_SOFT", "END_BEHAVIOR_HANG_UP_STRICT", "END_BEHAVIOR_UNSPECIFIED")


def _prompt(rng: random.Random) -> str:
    target = rng.randrange(500, 4_000)
    words: list[str] = []
    size = 0
    while size < target:
        word = rng.choice(_WORDS)
        if rng.random() < 0.05:
            word = f'"{word}"' if rng.random() < 0.5 else word + ".\n"
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def _voice(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(8)
    if kind == 0:
        return {"elevenLabs": {"voiceId": "21m00Tcm4TlvDq8ikWAM", "model": "eleven_turbo_v2_5", "speed": 1.05,
                               "stability": 0.5, "similarityBoost": 0.75, "useSpeakerBoost": True}}
    if kind == 1:
        return {"cartesia": {"voiceId": "a0e99841-438c-4a64-b679-ae501e7d6091", "model": "sonic-2",
                             "generationConfig": {"volume": 1.0, "speed": 1.1, "emotion": "calm"}}}
    if kind == 2:
        return {"lmnt": {"voiceId": "lily", "model": "blizzard", "speed": 1.0, "conversational": True}}
    if kind == 3:
        return {"google": {"voiceId": "en-US-Chirp3-HD-Charon", "speakingRate": 1.0}}
    if kind == 4:
        return {"inworld": {"voiceId": "Ashley", "modelId": "inworld-tts-1-max", "speakingRate": 1.0,
                            "temperature": 0.8}}
    if kind == 5:
        return {"respeecher": {"voiceId": "sam", "model": "/v1/public/tts/en-rt", "seed": 7, "topP": 0.9}}
    if kind == 6:
        return {"generic": {"url": "https://tts.example.com/v1/speak",
                            "headers": {"Authorization": f"Bearer sk-{rng.getrandbits(64):016x}",
                                        "Content-Type": "application/json"},
                            "body": {"text": "{text}", "voice": "amy"}, "responseSampleRate": 24000,
                            "responseMimeType": "audio/l16"}}
    return {"elevenLabs": {"voiceId": "pNInz6obpgDQGcFmaJgB", "model": "eleven_flash_v2_5"}}


def _stage(rng: random.Random, call_id: str, created: datetime) -> dict[str, Any]:
    initial = rng.randrange(300, 3_000)
    stage: dict[str, Any] = {
        "callId": call_id,
        "callStageId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "created": created.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "inactivityMessages": [
            {k: v for k, v in (("duration", rng.choice(_DURATIONS)), ("message", "Are you still there?"),
                               ("endBehavior", rng.choice(_BEHAVIORS))) if v is not None}
            for _ in range(rng.randrange(6))
        ],
        "initialTokenCount": initial,
        "languageHint": rng.choice(("en", "en-US", "de", None)),
        "latestTokenCount": initial + rng.randrange(0, 4_000),
        "model": "fixie-ai/ultravox",
        "systemPrompt": _prompt(rng),
        "temperature": rng.choice((0.0, 0.2, 0.4)),
        "timeExceededMessage": "Sorry, we are out of time. Goodbye!",
        "voice": None,
        "externalVoice": _voice(rng),
        "errorCount": rng.choice((0, 0, 0, 1)),
        "experimentalSettings": None if rng.random() < 0.7 else {"vadSettings": {"turnEndpointDelay": "0.384s"}},
        "initialState": {} if rng.random() < 0.6 else {"customerId": "c-1234", "step": "greeting"},
    }
    if rng.random() < 0.3:
        stage["voiceOverrides"] = _voice(rng)
    return stage


def make_calls(n_stages: int, seed: int = 7) -> list[tuple[str, list[dict[str, Any]]]]:
    rng = random.Random(seed)
    calls: list[tuple[str, list[dict[str, Any]]]] = []
    total = 0
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    while total < n_stages:
        call_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        created = start + timedelta(seconds=rng.randrange(30 * 86_400), microseconds=rng.randrange(1_000_000))
        count = min(rng.choice((1, 1, 2, 2, 3, 5)), n_stages - total)
        stages = [_stage(rng, call_id, created + timedelta(seconds=40 * i)) for i in range(count)]
        calls.append((call_id, stages))
        total += count
    return calls


def _batches(calls: list[tuple[str, Any]], size: int) -> list[list[tuple[str, Any]]]:
    batches: list[list[tuple[str, Any]]] = [[]]
    in_batch = 0
    for call in calls:
        if in_batch >= size:
            batches.append([])
            in_batch = 0
        batches[-1].append(call)
        in_batch += len(call[1])
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=10_000, help="stages per transform_calls call (runner default)")
    parser.add_argument("--form", choices=("objects", "bytes"), default="objects")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    calls = make_calls(args.stages)
    # As JSON text, decoded afresh for every run: no str UTF-8 caches etc. left warm.
    texts = [json.dumps({"results": stages}, ensure_ascii=False, separators=(",", ":")).encode() for _, stages in calls]
    call_ids = [call_id for call_id, _ in calls]
    stage_bytes = sum(len(t) for t in texts) / args.stages
    now = datetime.now(timezone.utc)
    best = best_cpu = best_loads = float("inf")
    rows = (0, 0, 0)
    for _ in range(args.repeat):
        started = time.perf_counter()
        decoded = [json.loads(text)["results"] for text in texts]
        best_loads = min(best_loads, time.perf_counter() - started)
        started, started_cpu = time.perf_counter(), time.process_time()
        if args.form == "bytes":
            decoded = [decode_page(text)[1] for text in texts]
        batches = _batches(list(zip(call_ids, decoded)), args.batch)
        for batch in batches:
            result = transform_calls(batch, "bench-run", now)
            assert not result.failures, result.failures
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - started_cpu)
        t = result.tables
        rows = (t["call_stages"].num_rows, t["stage_inactivity_messages"].num_rows, t["stage_voices"].num_rows)
    print(f"{args.form}: {args.stages} stages in {len(calls)} calls, batches of {args.batch}: best {best:.3f} s "
          f"= {args.stages / best:,.0f} stages/s (CPU {best_cpu:.3f} s, all threads; "
          f"last batch rows: stages/messages/voices = {rows}; load average {os.getloadavg()[0]:.1f})")
    print(f"for scale: json.loads alone of the same stages ({stage_bytes:,.0f} B of JSON each): "
          f"{args.stages / best_loads:,.0f} stages/s")
    if args.profile:
        if args.form == "bytes":
            stages = [decode_page(text)[1] for text in texts]
        else:
            stages = [json.loads(text)["results"] for text in texts]
        batches = _batches(list(zip(call_ids, stages)), args.batch)
        profiler = cProfile.Profile()
        profiler.enable()
        for batch in batches:
            transform_calls(batch, "bench-run", now)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()

"""The one RFC 3339 parser: its C fast path gives what the strict path gives, for every shape."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

from pipeline.records import _RFC3339, parse_rfc3339


def _strict(text: str) -> datetime:
    """The parser without its fast path: fields from the pattern, offsets checked."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(text)
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    micros = int(fraction[:6].ljust(6, "0")) if fraction else 0
    local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros)
    offset = timedelta(0)
    if not zulu:
        if int(off_m) > 59:
            raise ValueError(text)
        offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (-1 if sign == "-" else 1)
    return local.replace(tzinfo=timezone(offset)).astimezone(timezone.utc)


def _outcome(parse, text: str):
    try:
        parsed = parse(text)
    except (ValueError, OverflowError):
        return "refused"
    return parsed, parsed.utcoffset()


def _random_timestamp(rng: random.Random) -> str:
    text = (f"{rng.randint(1, 9999):04d}-{rng.randint(0, 13):02d}-{rng.randint(0, 32):02d}{rng.choice('Tt ')}"
            f"{rng.randint(0, 24):02d}:{rng.randint(0, 60):02d}:{rng.randint(0, 60):02d}")
    if rng.random() < 0.7:
        text += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 9)))
    return text + rng.choice(["Z", "Z", "z", f"+{rng.randint(0, 23):02d}:{rng.randint(0, 99):02d}",
                              f"-{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"])


def test_fast_path_agrees_with_the_strict_parser_on_random_shapes() -> None:
    rng = random.Random(20261201)
    for _ in range(20_000):
        text = _random_timestamp(rng)
        assert _outcome(parse_rfc3339, text) == _outcome(_strict, text), text


@pytest.mark.parametrize("text", ["2026-02-30T10:00:00Z", "2026-12-01T10:00:00+05:60", "2026-12-01T24:00:00Z",
                                  "2026-12-01T10:00:00", "2026-W48-2T10:00:00Z", "20261201T100000Z"])
def test_invalid_timestamps_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_results_are_utc() -> None:
    assert parse_rfc3339("2026-12-01T10:00:00.5Z") == datetime(2026, 12, 1, 10, 0, 0, 500000, tzinfo=timezone.utc)
    assert parse_rfc3339("2026-12-01t10:00:00+01:30").tzinfo is timezone.utc

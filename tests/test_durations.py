"""parse_duration: exact protobuf Duration JSON, nothing else."""

from __future__ import annotations

from decimal import Decimal

import pytest

from pipeline.durations import MAX_SECONDS, duration_nanos, parse_duration


@pytest.mark.parametrize("text, expected", [
    ("30s", Decimal("30")),
    ("0s", Decimal("0")),
    ("-0s", Decimal("0")),
    ("1.5s", Decimal("1.5")),
    ("1.500s", Decimal("1.5")),
    ("1.000000s", Decimal("1")),
    ("-2s", Decimal("-2")),
    ("-0.5s", Decimal("-0.5")),
    ("0.000000001s", Decimal("0.000000001")),
    ("-0.000000001s", Decimal("-0.000000001")),
    ("45.250s", Decimal("45.25")),
    ("0.1s", Decimal("0.1")),  # not 0.1000000000000000055511151231257827 (float)
    ("123456.123456789s", Decimal("123456.123456789")),
    ("315576000000s", Decimal("315576000000")),
    ("-315576000000s", Decimal("-315576000000")),
    ("315576000000.999999999s", Decimal("315576000000.999999999")),  # protobuf bounds seconds, nanos apart
])
def test_valid(text: str, expected: Decimal) -> None:
    value = parse_duration(text)
    assert isinstance(value, Decimal)
    assert value == expected
    assert value.as_tuple().exponent == -9  # always scale 9, like DECIMAL(38,9)


@pytest.mark.parametrize("text", [
    "", "s", "30", "30 s", " 30s", "30s ", "30s\n", "+30s", "--1s", "1.s", ".5s", "1.5.0s", "01s", "00s",
    "1e3s", "1E3s", "1.0e2s", "0.0000000001s", "1.1234567890s", "30ms", "30S", "1m", "PT30S", "inf s", "nans",
    "315576000001s", "-315576000001s", "999999999999s", "1000000000000s", "１s", "٣s", "1_000s", "0x10s",
    "1,5s", "NaN", "30sec",
])
def test_invalid_text(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert "duration" in str(info.value)


@pytest.mark.parametrize("value", [None, 30, 1.5, True, b"30s", ["30s"], {"seconds": 30}, Decimal("30")])
def test_non_strings_are_value_errors(value: object) -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_duration(value)  # type: ignore[arg-type]


def test_range_check_can_be_relaxed_for_the_openapi_pattern() -> None:
    assert duration_nanos("999999999999.5s", check_range=False) == 999_999_999_999_500_000_000
    with pytest.raises(ValueError, match="out of range"):
        duration_nanos("999999999999.5s")
    with pytest.raises(ValueError):
        duration_nanos("1000000000000s", check_range=False)  # the pattern allows 12 digits
    assert MAX_SECONDS == 315_576_000_000


def test_nanos_are_exact_and_signed() -> None:
    assert duration_nanos("1.5s") == 1_500_000_000
    assert duration_nanos("-0.5s") == -500_000_000
    assert duration_nanos("0.000000001s") == 1

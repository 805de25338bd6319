"""Protobuf ``Duration`` JSON strings, parsed exactly (never through float).

The API sends inactivity durations in the proto3 JSON form of
``google.protobuf.Duration``: decimal seconds with an ``s`` suffix, ``"30s"``,
``"1.500s"``, ``"0.000000001s"``, ``"-2s"``. Protobuf emits 0, 3, 6 or 9 fractional
digits; any 1–9 are accepted here, like protobuf's own parsers do.

Accepted syntax (the OpenAPI ``pattern``): optional ``-``, whole seconds without
leading zeros, optional ``.`` plus 1–9 digits, ``s``. Nothing else: no ``+``, no
exponent, no whitespace, no unit other than ``s``, ASCII digits only.

Range: protobuf bounds the *whole seconds* to ±315,576,000,000 (10,000 years) and
the nanoseconds separately, so ``"315576000000.999999999s"`` is still valid while
``"315576000001s"`` is not. The OpenAPI pattern allows 12 integer digits, i.e. more
than that: ``parse_duration`` refuses them; the transformer, which must not fail a
call the API's own schema allows, stores them as sent (``check_range=False``; they
fit DECIMAL(38,9)).
"""

from __future__ import annotations

import re
from decimal import Decimal

NANOS_PER_SECOND = 1_000_000_000
MAX_SECONDS = 315_576_000_000

# [0-9] rather than \d: \d also matches non-ASCII digits such as "١".
_DURATION = re.compile(r"(-?)(0|[1-9][0-9]{0,11})(?:\.([0-9]{1,9}))?s")


def duration_nanos(text: object, check_range: bool = True) -> int:
    """Signed nanoseconds of a Duration string; ``ValueError`` for anything else."""
    if type(text) is not str:
        raise ValueError(f"duration must be a string like '1.5s', not {type(text).__name__}")
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid duration {text[:40]!r}: expected decimal seconds like '30s' or '1.500s'")
    sign, whole, fraction = match.groups()
    seconds = int(whole)
    if check_range and seconds > MAX_SECONDS:
        raise ValueError(f"duration {text[:40]!r} is out of range (at most ±{MAX_SECONDS} s)")
    nanos = seconds * NANOS_PER_SECOND + (int(fraction.ljust(9, "0")) if fraction else 0)
    return -nanos if sign else nanos


def parse_duration(text: str) -> Decimal:
    """The exact number of seconds, as a Decimal with 9 fractional digits.

    ``parse_duration("1.5s") == Decimal("1.5")`` (it is ``Decimal("1.500000000")``).
    """
    return Decimal(duration_nanos(text)).scaleb(-9)

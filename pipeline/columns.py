"""Table columns as buffers in Arrow's layout, built without pyarrow.

Replay's reader process imports no pyarrow (its libraries would be tens of MB of that
process's memory, beside the committing process's own copy): the transform builds each
column's buffers here, the reader sends them, and :func:`to_arrow` wraps them as an Arrow
table without copying them.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import schema

if TYPE_CHECKING:
    import pyarrow as pa

#: array.array type codes of the fixed-width columns (timestamps: microseconds since the epoch).
_FIXED_CODES = {"INTEGER": "i", "BIGINT": "q", "DOUBLE": "d", schema.TIMESTAMPTZ: "q"}
_TEXT_TYPES = frozenset({schema.UUID, schema.JSON, "VARCHAR"})


class TooMuchText(ValueError):
    """A column's text exceeds what one Arrow string column holds."""


@dataclass
class Buffers:
    """One column: validity bitmap (None: no nulls), offsets (text only) and values, each
    bytes-like (bytes as built; slices of the received frame in the committing process).

    ``checked`` is False for text gathered as bytes, whose UTF-8 :func:`to_arrow` checks."""

    validity: bytes | None
    offsets: bytes | None
    data: bytes
    null_count: int = 0
    checked: bool = True

    def parts(self) -> list[bytes | None]:
        """The buffers in Arrow's order for the column's type."""
        return [self.validity, self.data] if self.offsets is None else [self.validity, self.offsets, self.data]


@dataclass
class TableColumns:
    """A table's rows: one :class:`Buffers` per column, in the schema's column order."""

    name: str
    rows: int
    columns: list[Buffers]


def _bitmap(values: Sequence[Any]) -> bytes:
    """Arrow's validity bitmap (least significant bit first) of the values that are not None."""
    bits = "".join(["0" if value is None else "1" for value in reversed(values)])
    return int(bits or "0", 2).to_bytes((len(values) + 7) // 8, "little")


def _validity(values: Sequence[Any]) -> tuple[bytes | None, int]:
    nulls = values.count(None)  # type: ignore[attr-defined]
    return (_bitmap(values), nulls) if nulls else (None, 0)


def _offsets(lengths: Any) -> bytes:
    offsets = array.array("i", [0])
    try:
        offsets.extend(itertools.accumulate(lengths))
    except OverflowError:
        raise TooMuchText("holds more than 2 GiB of text in one column") from None
    return offsets.tobytes()


def text(values: Sequence[str | None]) -> Buffers:
    """A string column from str values (or None)."""
    validity, nulls = _validity(values)
    present = [v for v in values if v is not None] if nulls else values
    joined = "".join(present)
    data = joined.encode()
    if len(data) == len(joined):  # ASCII: a character is a byte
        lengths: Any = (0 if v is None else len(v) for v in values) if nulls else map(len, values)
    else:
        lengths = [0 if v is None else len(v.encode()) for v in values]
    return Buffers(validity, _offsets(lengths), data, nulls)


def utf8(values: Sequence[bytes | None]) -> Buffers:
    """A string column from UTF-8 bytes (or None), its UTF-8 checked by :func:`to_arrow`."""
    validity, nulls = _validity(values)
    lengths = (0 if v is None else len(v) for v in values) if nulls else map(len, values)
    data = b"".join(v for v in values if v is not None) if nulls else b"".join(values)  # type: ignore[arg-type]
    return Buffers(validity, _offsets(lengths), data, nulls, checked=False)


def fixed(sql_type: str, values: Sequence[Any]) -> Buffers:
    """A fixed-width column (integers, doubles, timestamps as microseconds)."""
    validity, nulls = _validity(values)
    filled = [0 if v is None else v for v in values] if nulls else values
    return Buffers(validity, None, array.array(_FIXED_CODES[sql_type], filled).tobytes(), nulls)


def decimals(values: Sequence[int | None]) -> Buffers:
    """DECIMAL(38,9) from integer nanoseconds, exactly: the unscaled value is the
    nanosecond count, as 16-byte little-endian two's complement."""
    validity, nulls = _validity(values)
    filled: Sequence[int] = [0 if v is None else v for v in values] if nulls else values  # type: ignore[assignment]
    try:
        words = array.array("q", bytes(16 * len(filled)))
        words[0::2] = array.array("q", filled)
        words[1::2] = array.array("q", [v >> 63 for v in filled])  # the sign, extended
        data = words.tobytes()
    except OverflowError:  # beyond ±292 years: rare, slower
        data = b"".join(v.to_bytes(16, "little", signed=True) for v in filled)
    return Buffers(validity, None, data, nulls)


def repeat_text(value: str, rows: int) -> Buffers:
    data = value.encode()
    return Buffers(None, _offsets(itertools.repeat(len(data), rows)), data * rows)


def column(sql_type: str, values: Sequence[Any]) -> Buffers:
    """A column of ``sql_type`` from Python values: str for text, ints for timestamps
    (microseconds) and decimals (nanoseconds)."""
    if sql_type in _TEXT_TYPES:
        return text(values)
    if sql_type == schema.DECIMAL:
        return decimals(values)
    return fixed(sql_type, values)


def empty(table: schema.Table) -> TableColumns:
    return TableColumns(table.name, 0, [column(c.sql_type, ()) for c in table.columns])


def to_arrow(columns: TableColumns, check_utf8: bool = True) -> pa.Table:
    """The columns as an Arrow table of their schema, sharing their buffers; text gathered
    as bytes is checked to be UTF-8 (UnicodeError otherwise) unless ``check_utf8`` is off."""
    import pyarrow as pa

    table = schema.TABLES[columns.name]
    arrays = []
    for spec, buffers in zip(table.columns, columns.columns, strict=True):
        parts = [None if part is None else pa.py_buffer(part) for part in buffers.parts()]
        values = pa.Array.from_buffers(spec.arrow_type, columns.rows, parts, null_count=buffers.null_count)
        if check_utf8 and not buffers.checked:
            try:
                values.validate(full=True)
            except pa.ArrowInvalid as exc:
                if "utf8" in str(exc).lower() or "utf-8" in str(exc).lower():
                    raise UnicodeError("invalid UTF-8") from None
                raise
        arrays.append(values)
    return pa.Table.from_arrays(arrays, schema=table.arrow_schema)

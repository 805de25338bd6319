"""pipeline.columns builds Arrow's layout without pyarrow: each table's columns, wrapped by
to_arrow, must equal what pyarrow itself builds from the same values."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import columns, schema
from pipeline.records import micros, parse_rfc3339
from pipeline.transform import failure_reason

_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
_VALUES = {
    schema.UUID: _TEXT,
    "VARCHAR": _TEXT,
    schema.JSON: _TEXT.map(str.encode),
    "INTEGER": st.integers(-(2**31), 2**31 - 1),
    "BIGINT": st.integers(-(2**63), 2**63 - 1),
    "DOUBLE": st.floats(allow_nan=False),
    schema.TIMESTAMPTZ: st.integers(-(2**62), 2**62),
    schema.DECIMAL: st.integers(-(10**38) + 1, 10**38 - 1),
}


def _as_python(sql_type: str, value):
    """What pyarrow's own conversion takes for the value columns are built from."""
    if value is None:
        return None
    if sql_type == schema.DECIMAL:
        return Decimal(f"{value}E-9")  # exact (scaleb would round to 28 digits)
    if sql_type == schema.JSON:
        return value.decode()
    if sql_type == schema.TIMESTAMPTZ:
        return pa.scalar(value, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    return value


@st.composite
def _rows(draw, table: schema.Table) -> list[list]:
    n = draw(st.integers(0, 30))
    nulls = draw(st.sampled_from(["none", "some", "all"]))
    out = []
    for column in table.columns:
        values = st.none() if nulls == "all" else _VALUES[column.sql_type]
        if nulls == "some":
            values = st.none() | values
        out.append(draw(st.lists(values, min_size=n, max_size=n)))
    return out


@pytest.mark.parametrize("table", schema.DATA_TABLES, ids=lambda t: t.name)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_columns_equal_what_pyarrow_builds_from_the_same_values(table: schema.Table, data) -> None:
    values = data.draw(_rows(table))
    rows = len(values[0])
    built = [columns.utf8(v) if c.sql_type == schema.JSON else columns.column(c.sql_type, v)
             for c, v in zip(table.columns, values, strict=True)]
    got = columns.to_arrow(columns.TableColumns(table.name, rows, built))
    expected = pa.table([pa.array([_as_python(c.sql_type, x) for x in v], c.arrow_type)
                         for c, v in zip(table.columns, values, strict=True)], schema=table.arrow_schema)
    got.validate(full=True)
    assert got.equals(expected)
    assert [col.null_count for col in got.columns] == [v.count(None) for v in values]


def test_text_gathered_as_bytes_must_be_utf8() -> None:
    built = [columns.utf8([b'{"a":"\xff"}']) if c.sql_type == schema.JSON else columns.column(c.sql_type, ["x"])
             for c in schema.STAGE_VOICES.columns if c.sql_type != "DOUBLE"]
    built.insert(6, columns.column("DOUBLE", [1.0]))
    with pytest.raises(UnicodeError):
        columns.to_arrow(columns.TableColumns("stage_voices", 1, built))
    assert failure_reason(UnicodeError("invalid UTF-8")) == "holds text that is not valid Unicode"


def test_more_text_than_one_arrow_column_holds_fails_with_its_own_words() -> None:
    with pytest.raises(columns.TooMuchText) as raised:
        columns._offsets(iter([2**31 - 1, 1]))
    assert failure_reason(raised.value) == "holds more than 2 GiB of text in one column"
    assert columns._offsets(iter([2**31 - 2, 1]))[-4:] == (2**31 - 1).to_bytes(4, "little")


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(datetime(1900, 1, 1), datetime(2100, 1, 1)),
    digits=st.integers(0, 6),
    offset=st.none() | st.integers(-23 * 60 - 59, 23 * 60 + 59),
)
def test_created_parses_as_arrows_cast_did_for_the_shapes_the_api_sends(moment: datetime, digits: int, offset) -> None:
    """The transform once cast these shapes with Arrow; it now parses them in Python."""
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{moment.microsecond:06d}"[:digits]
    if offset is None:
        text += "Z"
    else:
        sign, minutes = "+-"[offset < 0], abs(offset)
        text += f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    arrow = pa.array([text]).cast(pa.timestamp("us", tz="UTC"))[0].value
    assert micros(parse_rfc3339(text)) == arrow


def test_micros_is_exact_at_the_edges() -> None:
    assert micros(datetime(1970, 1, 1, tzinfo=timezone.utc)) == 0
    assert micros(datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)) == -1
    later = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5)))
    assert micros(later) == pa.scalar(later, pa.timestamp("us", tz="UTC")).value

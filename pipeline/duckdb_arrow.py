"""A DuckDB result as an Arrow table, on every supported DuckDB version."""

from __future__ import annotations

import duckdb
import pyarrow as pa


def to_arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    # duckdb >= 1.4 prefers to_arrow_table(); older versions only have fetch_arrow_table().
    fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
    return fetch()

"""DuckDB helpers shared by the outputs that use it: results as Arrow tables on every
supported DuckDB version, and which of its errors are failures of the storage."""

from __future__ import annotations

import duckdb
import pyarrow as pa

#: OSError and DuckDB's failures of the storage itself (I/O, transactions, memory, permissions).
STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    duckdb.IOException,
    duckdb.TransactionException,
    duckdb.OutOfMemoryException,
    duckdb.FatalException,
    duckdb.PermissionException,
)


def to_arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    # duckdb >= 1.4 prefers to_arrow_table(); older versions only have fetch_arrow_table().
    fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
    return fetch()

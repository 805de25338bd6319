"""`ultravox-stages tables` and `ultravox-stages query`: look inside any output.

``tables`` lists every warehouse table of an output with its row count and its columns
(type as the output reports it, description from :mod:`pipeline.schema`). ``query`` runs
one read-only SQL statement against the same tables and renders it like ``report``.

Only reading statements run: SELECT (also FROM-first, VALUES, WITH, DESCRIBE, SHOW,
SUMMARIZE, which DuckDB parses as SELECT) and EXPLAIN [ANALYZE] of one. A DuckDB file is
opened read-only, but ATTACH, COPY … TO, INSTALL or SET still work on such a connection
and the Parquet/Delta views live in a writable in-memory database, so the statement
type is checked before anything runs, on every output.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb

from pipeline import reports, schema
from pipeline.errors import UsageError

#: Statement types that only read. DESCRIBE, SHOW and SUMMARIZE parse as SELECT.
READ_ONLY_TYPES = ("SELECT",)
_EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN(?:\s+ANALY[SZ]E)?(?:\s*\([^()]*\))?\s+", re.IGNORECASE)


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: str
    description: str


@dataclass(frozen=True)
class TableInfo:
    name: str
    description: str
    rows: int
    columns: tuple[ColumnInfo, ...]


# --------------------------------------------------------------------------- connection


def _location(location: str | Path) -> Path | str:
    """A local path as Path; an object-store URI (s3://…) as given, since Path folds '//'."""
    text = str(location)
    return text if "://" in text else Path(text)


def _connect(fmt: str, location: str | Path) -> duckdb.DuckDBPyConnection:
    from pipeline.load import query_connection

    con = query_connection(fmt, _location(location))  # type: ignore[arg-type]
    # A query must never reach the network to fetch an extension it happens to name.
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET TimeZone = 'UTC'")
    return con


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------- tables


def _existing_relations(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
    ).fetchall()
    return {name for (name,) in rows}


def _table_info(con: duckdb.DuckDBPyConnection, table: schema.Table) -> TableInfo:
    described = {c.name: c.description for c in table.columns}
    found = con.execute(f"DESCRIBE {table.name}").fetchall()
    columns = tuple(ColumnInfo(name, str(sql_type), described.get(name, "")) for name, sql_type, *_ in found)
    (rows,) = con.execute(f"SELECT count(*) FROM {table.name}").fetchone() or (0,)
    return TableInfo(table.name, table.description, int(rows), columns)


def list_tables(fmt: str, location: str | Path) -> list[TableInfo]:
    """Every warehouse table the output holds, in schema order, with row counts."""
    con = _connect(fmt, location)
    try:
        present = _existing_relations(con)
        return [_table_info(con, t) for t in schema.TABLES.values() if t.name in present]
    except duckdb.Error as exc:
        raise UsageError(f"cannot read the tables of {location}: {_first_line(exc)}") from exc
    finally:
        con.close()


def _check_style(style: str) -> None:
    if style not in reports.STYLES:
        raise UsageError(f"unknown output style {style!r}; use one of {', '.join(reports.STYLES)}")


def render_tables(infos: Sequence[TableInfo], style: str) -> str:
    """``table``: one block per table; ``csv``: one line per column; ``json``: nested."""
    _check_style(style)
    if style == "json":
        return reports.json_text([asdict(info) for info in infos])
    if style == "csv":
        rows = [(t.name, t.rows, c.name, c.type, c.description) for t in infos for c in t.columns]
        return reports.render_csv(["table", "rows", "column", "type", "description"], rows)
    if not infos:
        return "(no tables)"
    blocks = []
    for info in infos:
        heading = f"{info.name}: {info.rows} row{'' if info.rows == 1 else 's'} ({info.description})"
        cells = [(c.name, c.type, c.description) for c in info.columns]
        blocks.append(heading + "\n" + reports.render_table(["column", "type", "description"], cells))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------- query


def _statement_kind(statement: Any) -> str:
    return str(statement.type).rsplit(".", 1)[-1].upper()


def _keyword(statement: Any) -> str:
    """The statement's first word (DuckDB types INSTALL as LOAD and USE as SET)."""
    match = re.match(r"\s*([A-Za-z]+)", statement.query)
    return match.group(1).upper() if match else _statement_kind(statement)


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """UsageError unless ``sql`` is exactly one reading statement."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise UsageError(f"query is not valid SQL: {_first_line(exc)}") from exc
    if len(statements) != 1:
        raise UsageError(f"query takes exactly one SQL statement, got {len(statements)}")
    (statement,) = statements
    refused = _keyword(statement)
    if _statement_kind(statement) == "EXPLAIN":
        explained = _EXPLAIN_PREFIX.sub("", statement.query, count=1)
        inner = con.extract_statements(explained) if explained != statement.query else []
        if len(inner) == 1 and _statement_kind(inner[0]) in READ_ONLY_TYPES:
            return
        refused = f"EXPLAIN {_keyword(inner[0])}" if len(inner) == 1 else "this EXPLAIN"
    elif _statement_kind(statement) in READ_ONLY_TYPES:
        return
    raise UsageError(
        f"query is read-only: {refused} is refused (use SELECT, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN SELECT)"
    )


def run_query(fmt: str, location: str | Path, sql: str, style: str) -> str:
    """One read-only statement against the output at ``location``, rendered like ``report``."""
    _check_style(style)
    if not sql.strip():
        raise UsageError("query is empty: pass one SQL statement, e.g. \"SELECT count(*) FROM call_stages\"")
    con = _connect(fmt, location)
    try:
        check_read_only(con, sql)
        # The helper view the voices_* reports select from, for ad-hoc queries too.
        con.execute(reports.STAGE_VOICE_ROWS_SQL)
        names, types, rows = reports.run_query(con, sql, {})
    except duckdb.Error as exc:
        raise UsageError(f"query failed: {_first_line(exc)}") from exc
    finally:
        con.close()
    return reports.render(names, types, rows, style)

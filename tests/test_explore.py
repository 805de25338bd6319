"""`tables` and `query` (pipeline/explore.py) on real outputs built by the demo.

Counts are checked against figures computed without the code under test: DuckDB's own
read-only connection for the file, pyarrow's dataset reader for the Parquet folder and
the sandbox's synthetic data for what the API served.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from pipeline import explore, schema
from pipeline.cli import cli
from pipeline.errors import StagesError, UsageError
from pipeline.records import rfc3339
from pipeline.sandbox import SyntheticData
from conftest import expected_for

N_CALLS = 30
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def _demo(fmt: str, output: Path) -> Path:
    ran = CliRunner().invoke(cli, ["demo", "--calls", str(N_CALLS), "--format", fmt, "--output", str(output), "--no-progress"])
    assert ran.exit_code == 0, ran.output
    return output


@pytest.fixture(scope="module")
def duck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _demo("duckdb", tmp_path_factory.mktemp("explore") / "d.duckdb")


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _demo("parquet", tmp_path_factory.mktemp("explore") / "lake")


@pytest.fixture(params=["duckdb", "parquet"])
def output(request: pytest.FixtureRequest, duck: Path, lake: Path) -> tuple[str, Path]:
    return request.param, duck if request.param == "duckdb" else lake


def served_figures():
    """What the demo's sandbox served, from its synthetic data (the demo uses seed 0)."""
    data = SyntheticData(n_calls=N_CALLS, seed=0)
    return expected_for(data, data.call_ids)


def duckdb_counts(path: Path) -> dict[str, int]:
    with duckdb.connect(str(path), read_only=True) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in schema.TABLES}


def parquet_counts(path: Path) -> dict[str, int]:
    counts = {}
    for name in schema.TABLES:
        folder = path / name
        files = list(folder.rglob("*.parquet")) if folder.is_dir() else []
        counts[name] = ds.dataset(folder, format="parquet", partitioning="hive").count_rows() if files else 0
    return counts


def independent_counts(fmt: str, path: Path) -> dict[str, int]:
    return duckdb_counts(path) if fmt == "duckdb" else parquet_counts(path)


def tree_digest(path: Path) -> str:
    """Names and bytes of every file under ``path`` (or of the file itself)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- tables


def test_tables_lists_every_table_with_its_true_row_count(output: tuple[str, Path]) -> None:
    fmt, path = output
    infos = explore.list_tables(fmt, path)
    assert [i.name for i in infos] == list(schema.TABLES)
    counts = independent_counts(fmt, path)
    assert {i.name: i.rows for i in infos} == counts
    served = served_figures()
    assert counts["call_stages"] == served.stages > 0
    assert counts["stage_inactivity_messages"] == served.messages > 0
    assert counts["stage_voices"] == served.voices > 0
    assert counts["etl_calls"] == N_CALLS and counts["etl_runs"] == 1


def test_tables_columns_carry_type_and_the_schema_description(output: tuple[str, Path]) -> None:
    fmt, path = output
    for info in explore.list_tables(fmt, path):
        table = schema.TABLES[info.name]
        assert info.description == table.description != ""
        assert [c.name for c in info.columns] == table.column_names
        for column, defined in zip(info.columns, table.columns):
            assert column.description == defined.description != ""
            assert column.type  # as the output reports it, e.g. TIMESTAMP WITH TIME ZONE


def test_tables_column_types_match_duckdbs_own_catalog(duck: Path) -> None:
    with duckdb.connect(str(duck), read_only=True) as con:
        catalog = con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns ORDER BY table_name, ordinal_position"
        ).fetchall()
    listed = [(t.name, c.name, c.type) for t in explore.list_tables("duckdb", duck) for c in t.columns]
    assert sorted(listed) == sorted(row for row in catalog if row[0] in schema.TABLES)


def test_every_schema_column_has_a_one_line_description() -> None:
    for table in schema.TABLES.values():
        assert table.description and "\n" not in table.description
        for column in table.columns:
            assert column.description, f"{table.name}.{column.name} has no description"
            assert "\n" not in column.description and " -- " not in column.description
    offset = {c.name: c for c in schema.STAGE_INACTIVITY_MESSAGES.columns}["offset_seconds"]
    assert offset.sql_type == schema.DECIMAL and "cumulative" in offset.description


def test_render_tables_in_every_style_parses_back(duck: Path) -> None:
    infos = explore.list_tables("duckdb", duck)
    data = json.loads(explore.render_tables(infos, "json"))
    assert [(t["name"], t["rows"], len(t["columns"])) for t in data] == [(i.name, i.rows, len(i.columns)) for i in infos]
    assert data[0]["columns"][0] == {"name": "call_stage_id", "type": "UUID", "description": "the stage's id (callStageId)"}
    rows = list(csv.DictReader(io.StringIO(explore.render_tables(infos, "csv"))))
    assert len(rows) == sum(len(i.columns) for i in infos)
    assert {(r["table"], int(r["rows"])) for r in rows} == {(i.name, i.rows) for i in infos}
    described = {(r["table"], r["column"]): r["description"] for r in rows}
    assert described[("stage_inactivity_messages", "offset_seconds")].startswith("cumulative seconds")
    text = explore.render_tables(infos, "table")
    for info in infos:
        assert f"{info.name}: {info.rows} row" in text
    assert explore.render_tables([], "table") == "(no tables)"
    with pytest.raises(UsageError, match="unknown output style"):
        explore.render_tables(infos, "yaml")


def test_tables_of_a_missing_output_is_one_clear_error(tmp_path: Path) -> None:
    for fmt, path in (("duckdb", tmp_path / "none.duckdb"), ("parquet", tmp_path / "none")):
        with pytest.raises(StagesError) as caught:
            explore.list_tables(fmt, path)
        assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
        assert not path.exists()


# --------------------------------------------------------------------------- query


def test_query_answers_match_an_independent_computation(output: tuple[str, Path]) -> None:
    fmt, path = output
    served = served_figures()
    sql = "SELECT count(*) AS stages, sum(latest_token_count) AS tokens, sum(error_count) AS errors FROM call_stages"
    (row,) = json.loads(explore.run_query(fmt, path, sql, "json"))
    assert row == {"stages": served.stages, "tokens": served.latest_tokens, "errors": served.errors}


def test_query_json_has_rfc3339_timestamps_and_exact_decimals(duck: Path, lake: Path) -> None:
    with duckdb.connect(str(duck), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        newest, offsets = con.execute(
            "SELECT (SELECT max(created) FROM call_stages), (SELECT sum(offset_seconds) FROM stage_inactivity_messages)"
        ).fetchone()
    sql = "SELECT max(created) AS newest, (SELECT sum(offset_seconds) FROM stage_inactivity_messages) AS offsets FROM call_stages"
    for fmt, path in (("duckdb", duck), ("parquet", lake)):
        (row,) = json.loads(explore.run_query(fmt, path, sql, "json"), parse_float=Decimal)
        assert RFC3339.match(row["newest"]) and row["newest"] == rfc3339(newest)
        assert Decimal(row["offsets"]) == offsets


def test_query_renders_like_report_in_every_style(output: tuple[str, Path]) -> None:
    fmt, path = output
    sql = "SELECT provider, count(*) AS voices FROM stage_voices GROUP BY provider ORDER BY voices DESC, provider"
    as_json = json.loads(explore.run_query(fmt, path, sql, "json"))
    as_csv = list(csv.DictReader(io.StringIO(explore.run_query(fmt, path, sql, "csv"))))
    table = explore.run_query(fmt, path, sql, "table").splitlines()
    assert table[0].split() == ["provider", "voices"] and set(table[1]) == {"-", " "}
    assert len(table) - 2 == len(as_csv) == len(as_json) > 1
    assert [(r["provider"], int(r["voices"])) for r in as_csv] == [(r["provider"], r["voices"]) for r in as_json]
    assert sum(r["voices"] for r in as_json) == independent_counts(fmt, path)["stage_voices"]


@pytest.mark.parametrize(
    "sql",
    [
        "DESCRIBE call_stages",
        "SHOW TABLES",
        "SUMMARIZE etl_runs",
        "EXPLAIN SELECT count(*) FROM call_stages",
        "explain analyze select count(*) from call_stages",
        "FROM etl_runs",
        "WITH s AS (SELECT * FROM call_stages) SELECT count(*) FROM s",
        "VALUES (1, 'a')",
        "SELECT count(*) FROM stage_voice_rows;",
        "-- a comment first\nSELECT 1 AS one",
    ],
)
def test_reading_statements_run(output: tuple[str, Path], sql: str) -> None:
    fmt, path = output
    assert explore.run_query(fmt, path, sql, "csv").count("\n") >= 1


WRITES = [
    "INSERT INTO etl_state VALUES ('k', 'v', now())",
    "UPDATE etl_calls SET status = 'failed'",
    "DELETE FROM call_stages",
    "CREATE TABLE evil AS SELECT * FROM call_stages",
    "CREATE OR REPLACE VIEW call_stages AS SELECT 1",
    "DROP TABLE call_stages",
    "ALTER TABLE etl_runs ADD COLUMN x INT",
    "COPY (SELECT * FROM call_stages) TO '{tmp}/leak.csv'",
    "COPY etl_state FROM '{tmp}/in.csv'",
    "EXPORT DATABASE '{tmp}/exported'",
    "ATTACH '{tmp}/other.duckdb' AS other",
    "DETACH other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET threads = 1",
    "USE memory",
    "PRAGMA enable_profiling",
    "CALL pragma_version()",
    "CHECKPOINT",
    "SELECT 1; DROP TABLE call_stages",
    "SELECT 1; SELECT 2",
    "EXPLAIN ANALYZE CREATE TABLE evil AS SELECT 1",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/leak.csv'",
    "  /* sneaky */ insert into etl_state values ('k', 'v', now())",
]


@pytest.mark.parametrize("statement", WRITES)
def test_writing_statements_are_refused_and_change_nothing(output: tuple[str, Path], statement: str, tmp_path: Path) -> None:
    fmt, path = output
    (tmp_path / "in.csv").write_text("key,value,updated_at\nk,v,2026-01-01 00:00:00+00\n")
    before = tree_digest(path), independent_counts(fmt, path)
    with pytest.raises(UsageError) as caught:
        explore.run_query(fmt, path, statement.format(tmp=tmp_path.as_posix()), "table")
    message = str(caught.value)
    assert "\n" not in message and ("read-only" in message or "one SQL statement" in message)
    assert caught.value.exit_code == 2
    assert (tree_digest(path), independent_counts(fmt, path)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM no_such_table", "Catalog Error"),
        ("SELEC 1", "Parser Error"),
        ("SELECT 'x'::INTEGER", "Conversion Error"),
        ("SELECT $1", "query failed"),
        ("SELECT * FROM read_parquet('/nonexistent/*.parquet')", "query failed"),
        ("", "query is empty"),
        ("   \n ", "query is empty"),
    ],
)
def test_sql_errors_are_one_line(output: tuple[str, Path], sql: str, expected: str) -> None:
    fmt, path = output
    with pytest.raises(UsageError) as caught:
        explore.run_query(fmt, path, sql, "table")
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_unknown_style_is_refused(duck: Path) -> None:
    with pytest.raises(UsageError, match="unknown output style"):
        explore.run_query("duckdb", duck, "SELECT 1", "xml")


# --------------------------------------------------------------------------- CLI


needs_cli = pytest.mark.skipif(
    not {"tables", "query"} <= set(cli.commands), reason="the tables/query commands are not wired into the CLI"
)


@needs_cli
def test_cli_tables_and_query(duck: Path, lake: Path) -> None:
    runner = CliRunner()
    for path in (duck, lake):
        listed = runner.invoke(cli, ["tables", "--output", str(path), "--format", "json"])
        assert listed.exit_code == 0, listed.output
        assert [t["name"] for t in json.loads(listed.output)] == list(schema.TABLES)
        ran = runner.invoke(cli, ["query", "SELECT count(*) AS n FROM etl_calls", "--output", str(path), "--format", "csv"])
        assert ran.exit_code == 0 and ran.output.split() == ["n", str(N_CALLS)]


@needs_cli
def test_cli_query_refusal_is_one_line_and_exit_2(duck: Path) -> None:
    for sql in ("DROP TABLE call_stages", "SELECT * FROM nope"):
        ran = CliRunner().invoke(cli, ["query", sql, "--output", str(duck)])
        assert ran.exit_code == 2
        assert len(ran.output.strip().splitlines()) == 1 and "Traceback" not in ran.output

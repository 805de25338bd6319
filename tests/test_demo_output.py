"""`demo` replaces only what an earlier demo created; everything else is refused (exit 2)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.demo import DEMO_MARKER, is_demo_output, prepare_output
from pipeline.errors import OutputError


def demo(*args: str):
    result = CliRunner().invoke(cli, ["demo", "--no-progress", *args], env={"ULTRAVOX_API_KEY": ""})
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.exception
    return result


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def real_warehouse(path):
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE call_stages (call_stage_id VARCHAR)")
        con.execute("INSERT INTO call_stages VALUES ('precious')")


def test_parquet_demo_into_the_working_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("my work\n")
    (tmp_path / DEMO_MARKER).write_text("even with a marker, never the working folder\n")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = demo("--format", "parquet", "--output", ".")
    assert res.exit_code == 2
    assert "refusing to replace .: it was not created by `ultravox-stages demo`" in res.output
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_a_foreign_folder_is_refused(tmp_path, fmt):
    folder = tmp_path / "lake"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "data.parquet").write_bytes(b"PAR1 not really")
    before = snapshot(folder)
    res = demo("--format", fmt, "--output", str(folder))
    assert res.exit_code == 2 and "choose another --output or delete it yourself" in res.output
    assert snapshot(folder) == before


def test_a_real_parquet_warehouse_is_refused(tmp_path):
    from pipeline.load.parquet import MARKER

    folder = tmp_path / "ultravox_stages_parquet"
    folder.mkdir()
    (folder / MARKER).write_text("{}")
    assert not is_demo_output("parquet", folder)
    with pytest.raises(OutputError, match="refusing to replace"):
        prepare_output("parquet", folder)
    assert (folder / MARKER).exists()


def test_a_real_duckdb_warehouse_is_refused(tmp_path):
    db = tmp_path / "my.duckdb"
    real_warehouse(db)
    before = db.read_bytes()
    res = demo("--output", str(db))
    assert res.exit_code == 2 and f"refusing to replace {db}" in res.output
    assert db.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"hello, not a database\n", b"\0" * 8192])
def test_any_other_file_is_refused(tmp_path, content):
    path = tmp_path / "ultravox-demo.duckdb"
    path.write_bytes(content)
    res = demo("--output", str(path))
    assert res.exit_code == 2
    assert path.read_bytes() == content


def test_a_folder_given_as_a_duckdb_output_is_refused(tmp_path):
    res = demo("--output", str(tmp_path))
    assert res.exit_code == 2 and tmp_path.is_dir()


def test_a_symlink_is_refused_even_to_a_demo_output(tmp_path):
    target = tmp_path / "demo.duckdb"
    prepare_output("duckdb", target)
    link = tmp_path / "link.duckdb"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="refusing to replace"):
        prepare_output("duckdb", link)
    dangling = tmp_path / "dangling.duckdb"
    dangling.symlink_to(tmp_path / "nowhere.duckdb")
    with pytest.raises(OutputError):
        prepare_output("duckdb", dangling)
    assert not (tmp_path / "nowhere.duckdb").exists()


def test_an_earlier_demo_output_is_marked_before_any_call_is_exported(tmp_path):
    db = tmp_path / "ultravox-demo.duckdb"
    prepare_output("duckdb", db)  # what an interrupted demo leaves behind
    assert is_demo_output("duckdb", db)
    with duckdb.connect(str(db)) as con:
        con.execute("INSERT INTO etl_state VALUES ('stale', 'x', now())")
    prepare_output("duckdb", db)  # replaced without complaint
    assert is_demo_output("duckdb", db)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT key FROM etl_state").fetchall() == [("demo",)]


def test_a_stray_demo_row_value_is_not_enough(tmp_path):
    db = tmp_path / "w.duckdb"
    prepare_output("duckdb", db)
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE etl_state SET value = 'false' WHERE key = 'demo'")
    assert not is_demo_output("duckdb", db)


def test_demo_runs_twice_into_the_same_file(tmp_path):
    db = tmp_path / "ultravox-demo.duckdb"
    for _ in range(2):
        res = demo("--calls", "30", "--output", str(db))
        assert res.exit_code == 0, res.output
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM etl_runs").fetchone()[0] == 1  # a fresh demo each time
        assert con.execute("SELECT count(*) FROM etl_calls WHERE status = 'loaded'").fetchone()[0] > 0
    assert is_demo_output("duckdb", db)


def test_demo_refuses_object_store_outputs(tmp_path):
    with pytest.raises(OutputError, match="local output only"):
        prepare_output("delta", Path("s3://bucket/prefix"))
    assert not Path("s3:").exists()


def test_parquet_demo_runs_twice_into_the_same_folder(tmp_path):
    folder = tmp_path / "ultravox-demo-parquet"
    for _ in range(2):
        res = demo("--calls", "30", "--format", "parquet", "--output", str(folder))
        assert res.exit_code == 0, res.output
    assert (folder / DEMO_MARKER).is_file()
    from pipeline.load import query_connection

    con = query_connection("parquet", folder)
    assert con.execute("SELECT count(*) FROM etl_runs").fetchone()[0] == 1
    con.close()


def test_hostile_demo_shows_bad_calls_failing_alone(tmp_path, capsys):
    from pipeline.demo import _sandbox_options, run_demo
    from pipeline.sandbox import PLANTED_SECRET_PREFIX, SyntheticData, planted_secrets

    n_calls = 200
    assert planted_secrets(SyntheticData(n_calls=n_calls, seed=0), _sandbox_options("k", True))
    db = tmp_path / "hostile.duckdb"
    assert run_demo(n_calls, "duckdb", db, False, hostile=True) == 1  # some calls failed, as promised
    assert "failed alone: every other call was loaded" in capsys.readouterr().out
    with duckdb.connect(str(db), read_only=True) as con:
        by_status = dict(con.execute("SELECT status, count(*) FROM etl_calls GROUP BY ALL").fetchall())
        assert by_status.get("failed", 0) >= 1 and by_status["loaded"] >= n_calls * 0.9
        assert sum(by_status.values()) == n_calls
        for (table,) in con.execute("SHOW TABLES").fetchall():
            leaked = con.execute(f"SELECT count(*) FROM {table} t WHERE t::VARCHAR LIKE ?", [f"%{PLANTED_SECRET_PREFIX}%"])
            assert leaked.fetchone()[0] == 0, table


def test_a_demo_output_in_use_is_not_replaced(tmp_path):
    from pipeline.load.duckdb import lock_path
    from pipeline.lock import OutputLock

    db = tmp_path / "ultravox-demo.duckdb"
    prepare_output("duckdb", db)
    before = db.read_bytes()
    with OutputLock(lock_path(db)):  # another demo (or run) is writing to it right now
        with pytest.raises(OutputError, match="another run is writing to"):
            prepare_output("duckdb", db)
    assert db.read_bytes() == before

"""`ultravox-stages demo`: the whole path on synthetic data, no key, no network.

The demo replaces its output on every run, so it only ever replaces what an earlier
demo created: a DuckDB file holding the row ``demo = true`` in ``etl_state``, or a
Parquet/Delta folder holding the file ``.ultravox-demo``. Both marks are written
right after the empty warehouse is created, before any call is exported, so even an
interrupted demo is recognised next time. Anything else is refused (exit 2).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import shutil
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

import click
import duckdb
import pyarrow as pa

from pipeline import reports, schema
from pipeline.config import Settings
from pipeline.errors import EXIT_OK, EXIT_PARTIAL, OutputError
from pipeline.load import open_warehouse, query_connection
from pipeline.lock import OutputLock, read_lock
from pipeline.log import Reporter, plural
from pipeline.runner import run_export
from pipeline.sandbox import Sandbox, SandboxOptions, SyntheticData

#: Reports from sql/ shown at the end of the demo (the same ones `report` runs).
DEMO_REPORTS = ("token_growth_by_model",)
ERRORS_BY_PROVIDER = """
    SELECT coalesce(v.provider, '(none)') AS provider, count(*) AS stages, sum(s.error_count) AS errors
    FROM call_stages s
    LEFT JOIN stage_voices v ON v.call_stage_id = s.call_stage_id AND v.role = 'external'
    GROUP BY ALL ORDER BY errors DESC, stages DESC"""
#: Marks a Parquet/Delta folder as created by the demo.
DEMO_MARKER = ".ultravox-demo"
#: Marks a DuckDB file as created by the demo (a row of etl_state).
DEMO_STATE_KEY = "demo"
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")
#: Sandbox hostile kinds `demo --hostile` uses: each fails its call (or is redacted) at once, no retries.
DEMO_HOSTILE_KINDS = ("deep_nesting", "invalid_next", "reused_stage_id", "secret_shapes")
#: Share of calls the hostile demo makes misbehave.
HOSTILE_SHARE = 0.03


def refusal(output: Path) -> OutputError:
    return OutputError(
        f"refusing to replace {output}: it was not created by `ultravox-stages demo`; "
        "choose another --output or delete it yourself"
    )


def is_demo_output(fmt: str, output: Path) -> bool:
    """True only for an output an earlier demo created (read-only check, never raises)."""
    if output.is_symlink():
        return False
    if fmt != "duckdb":
        return output.is_dir() and (output / DEMO_MARKER).is_file()
    if not output.is_file():
        return False
    from pipeline.load.duckdb import check_is_duckdb_file

    try:
        check_is_duckdb_file(output)
        with duckdb.connect(str(output), read_only=True) as con:
            row = con.execute("SELECT value FROM etl_state WHERE key = ?", [DEMO_STATE_KEY]).fetchone()
    except (OutputError, duckdb.Error, OSError):
        return False
    return row is not None and row[0] == "true"


def _inside_working_dir(output: Path) -> bool:
    """The output is the working directory or one of its parents (never removed)."""
    here = Path.cwd().resolve()
    target = output.resolve()
    return target == here or target in here.parents


def _lock_file(fmt: str, output: Path) -> Path | None:
    """The lock file a run holds on ``output`` (None: the format has no local lock file)."""
    if fmt == "duckdb":
        from pipeline.load.duckdb import lock_path

        return lock_path(output)
    if fmt == "parquet":
        from pipeline.load.parquet import LOCK, STAGING

        return output / STAGING / LOCK
    return None


def _output_lock(fmt: str, output: Path) -> AbstractContextManager[object]:
    lock = _lock_file(fmt, output)
    return nullcontext() if lock is None else OutputLock(lock)


def _check_not_in_use(fmt: str, output: Path) -> None:
    lock = _lock_file(fmt, output)
    if lock is not None and read_lock(lock)[0]:
        raise OutputError(f"another run is writing to {output}; wait for it to finish or choose another --output")


def _remove_demo_output(fmt: str, output: Path) -> None:
    with _output_lock(fmt, output):
        if fmt == "duckdb":
            output.unlink()
            Path(f"{output}.wal").unlink(missing_ok=True)
        else:
            shutil.rmtree(output)


def _demo_row() -> pa.Table:
    return pa.Table.from_pylist(
        [{"key": DEMO_STATE_KEY, "value": "true", "updated_at": datetime.now(timezone.utc)}],
        schema=schema.ETL_STATE.arrow_schema,
    )


def _create_marked(fmt: str, output: Path, memory_limit: str) -> None:
    """An empty warehouse at ``output`` that carries the demo mark."""
    with open_warehouse(fmt, output, False, memory_limit) as warehouse:
        if fmt == "duckdb":
            warehouse.upsert(schema.ETL_STATE, _demo_row())
        else:
            (output / DEMO_MARKER).write_text("created by `ultravox-stages demo`; the next demo replaces it\n")


def prepare_output(fmt: str, output: Path, memory_limit: str = Settings.duckdb_memory_limit) -> None:
    """Make room for a fresh demo at ``output``: a new path, or an earlier demo's output."""
    if _URI.match(str(output)):  # Path() has already folded "s3://" into "s3:/"
        raise OutputError(f"demo writes a local output only, not {output}; choose a local --output")
    if output.exists() or output.is_symlink():
        if _inside_working_dir(output):
            raise refusal(output)
        _check_not_in_use(fmt, output)
        if not is_demo_output(fmt, output):
            raise refusal(output)
        _remove_demo_output(fmt, output)
    _create_marked(fmt, output, memory_limit)


def _sandbox_options(key: str, hostile: bool) -> SandboxOptions:
    if not hostile:
        return SandboxOptions(api_key=key)
    return SandboxOptions(api_key=key, hostile=DEMO_HOSTILE_KINDS, hostile_share=HOSTILE_SHARE)


def run_demo(n_calls: int, fmt: str, output: Path, progress: bool | None, hostile: bool = False) -> int:
    settings = Settings(format=fmt, output=str(output), concurrency=32, max_rps=5000.0)
    prepare_output(fmt, output, settings.duckdb_memory_limit)
    key = secrets.token_urlsafe(16)  # a throwaway key for the in-process sandbox only
    data = SyntheticData(n_calls=n_calls, seed=0)
    with Sandbox(data, _sandbox_options(key, hostile)) as sandbox:
        settings = dataclasses.replace(settings, base_url=sandbox.base_url)
        what = "synthetic calls, a few of them hostile" if hostile else "synthetic calls"
        click.echo(f"Simulated Ultravox API on {sandbox.base_url}: exporting {n_calls} {what}…", err=True)
        result = run_export(settings, list(data.call_ids), key, Reporter(progress=progress))
    run = result.run
    click.echo(
        f"Exported {plural(run.calls_requested, 'call')} in {result.seconds:.1f}s: "
        f"{run.calls_loaded} loaded, {run.calls_not_found} not found, {run.calls_failed} failed; "
        f"{plural(run.http_requests, 'HTTP request')}, {plural(run.http_retries, 'retry', 'retries')}."
    )
    if hostile and run.calls_failed:
        click.echo(
            f"The {run.calls_failed} failed call(s) failed alone: every other call was loaded. "
            f"See why: ultravox-stages status --output {output}"
        )
    _show_warehouse(fmt, output)
    return EXIT_OK if run.calls_failed == 0 else EXIT_PARTIAL


def _show_warehouse(fmt: str, output: Path) -> None:
    con = query_connection(fmt, output)
    counts = con.execute(
        "SELECT (SELECT count(*) FROM call_stages), (SELECT count(*) FROM stage_inactivity_messages),"
        " (SELECT count(*) FROM stage_voices), (SELECT coalesce(sum(error_count), 0) FROM call_stages)"
    ).fetchall()[0]
    click.echo(f"Warehouse {output}: {counts[0]} stages, {counts[1]} inactivity messages, {counts[2]} voices, {counts[3]} stage errors.")
    result_set = con.execute(ERRORS_BY_PROVIDER)
    names = [d[0] for d in result_set.description]
    click.echo(f"\nErrors by voice provider\n{reports.render_table(names, result_set.fetchall())}")
    con.close()
    for name in DEMO_REPORTS:
        description, _ = reports.load_report(name)
        table = reports.run_report(fmt, output, name, "table", {})
        click.echo(f"\n{description}  (ultravox-stages report {name} --output {output})\n{table}")
    click.echo(
        f"\nNext: ultravox-stages report --output {output}   (lists {len(reports.report_names())} reports)"
        f"  ·  ultravox-stages status --output {output}"
    )

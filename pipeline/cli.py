"""The command line: a thin click layer over runner, sandbox, reports and status."""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline import __version__
from pipeline.calls_input import read_call_ids
from pipeline.config import FORMATS, Settings, api_key_from_env, load_settings
from pipeline.discover import Discovery, parse_day
from pipeline.errors import EXIT_OK, EXIT_PARTIAL, InputError, StagesError
from pipeline.http import check_base_url
from pipeline.log import Reporter
from pipeline.runner import RunResult, run_export, run_replay

F = TypeVar("F", bound=Callable[..., Any])


def _apply(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def decorator(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorator


debug_option = click.option("--debug", is_flag=True, help="Show tracebacks for errors.")

output_options = _apply(
    [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML settings file (see config.example.toml)."),
        click.option("--format", "format", type=click.Choice(FORMATS), default=None, help="Warehouse format [default: duckdb]."),
        click.option("--output", type=click.Path(), default=None, help="DuckDB file or Parquet folder [default: ultravox_stages.duckdb / ultravox_stages_parquet]."),
        click.option("--log-format", type=click.Choice(["text", "json"]), default=None, help="stderr as text or one JSON object per line [default: text]."),
        click.option("--progress/--no-progress", default=None, help="Progress bar [default: on when stderr is a terminal]."),
        click.option("--wait", is_flag=True, help="Wait for another run writing the same output instead of exiting 2."),
        debug_option,
    ]
)

fetch_options = _apply(
    [
        click.option("--base-url", default=None, help="Ultravox API origin [default: https://api.ultravox.ai]."),
        click.option("--concurrency", type=int, default=None, help="Calls in flight at most [default: 16]."),
        click.option("--page-size", type=int, default=None, help="pageSize sent to the API [default: 100]."),
        click.option("--max-rps", type=float, default=None, help="Client-side cap on requests per second [default: 150]."),
        click.option("--refresh", is_flag=True, default=None, help="Re-fetch calls already loaded."),
        click.option("--raw-dir", type=click.Path(file_okay=False), default=None, help="Land every page received here (jsonl.gz, secrets redacted)."),
        click.option("--allow-insecure-http", is_flag=True, default=None, help="Allow plain http to a non-loopback host."),
    ]
)


def handle_errors(fn: F) -> F:
    """One clear line and the contract's exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or os.environ.get("ULTRAVOX_STAGES_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except StagesError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: the warehouse holds every batch committed so far; run again to finish", err=True)
            sys.exit(130)
        except Exception as exc:  # an unexpected bug: still one line unless --debug
            if debug:
                raise
            click.echo(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", err=True)
            sys.exit(EXIT_PARTIAL)

    return wrapper  # type: ignore[return-value]


def _settings(config_file: str | None, **cli: Any) -> Settings:
    return load_settings(config_file, cli)


def _reporter(settings: Settings, progress: bool | None) -> Reporter:
    return Reporter(settings.log_format, progress)


def _exit_for(result: RunResult) -> None:
    if result.run.calls_failed or result.bad_lines:
        sys.exit(EXIT_PARTIAL)
    sys.exit(EXIT_OK)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ultravox-stages")
def cli() -> None:
    """Export Ultravox call stages into DuckDB or Parquet, idempotently.

    \b
    Start here (no key, no network):   ultravox-stages demo
    Export real calls:                 ULTRAVOX_API_KEY=... ultravox-stages run --calls-file ids.txt
    Exit codes: 0 ok · 1 some calls failed · 2 usage/config/input error · 3 auth rejected or API unreachable
    """


@cli.command()
@click.option("--calls-file", default=None, help="One call UUID a line; '-' reads stdin; '#' comments ignored.")
@click.option("--call-id", "call_ids", multiple=True, help="A call UUID (repeatable).")
@click.option("--since", default=None, help="Also list calls created on or after this date (YYYY-MM-DD) with GET /api/calls.")
@click.option("--until", default=None, help="With --since/--incremental: calls created on or before this date.")
@click.option("--incremental", is_flag=True, default=None, help="List calls from the stored watermark minus the overlap window.")
@click.option("--overlap-hours", type=float, default=None, help="Overlap window of --incremental [default: 24].")
@click.option("--keep-deleted", is_flag=True, default=None, help="Keep stages of calls the API reports deleted (flag them).")
@fetch_options
@output_options
@handle_errors
def run(
    calls_file: str | None,
    call_ids: tuple[str, ...],
    since: str | None,
    until: str | None,
    config_file: str | None,
    progress: bool | None,
    wait: bool,
    debug: bool,
    **cli_settings: Any,
) -> None:
    """Export the stages of the given calls from the Ultravox API."""
    settings = _settings(config_file, calls_file=calls_file, **cli_settings)
    check_base_url(settings.base_url, settings.allow_insecure_http)
    ids = read_call_ids(settings.calls_file, call_ids)
    reporter = _reporter(settings, progress)
    if ids.duplicates:
        reporter.warning("duplicate_ids", f"{ids.duplicates} duplicate call ID(s) ignored", duplicates=ids.duplicates)
    discovery = None
    if since or until or settings.incremental:
        if until and not (since or settings.incremental):
            raise InputError("--until needs --since or --incremental")
        discovery = Discovery(
            since=parse_day("--since", since),
            until=parse_day("--until", until),
            incremental=settings.incremental,
            overlap_hours=settings.overlap_hours,
            keep_deleted=settings.keep_deleted,
        )
    elif not ids.ids:
        raise InputError("no call IDs given: pass --calls-file FILE, --call-id ID, --since DATE or --incremental")
    api_key = api_key_from_env(settings)
    result = run_export(settings, ids.ids, api_key, reporter, wait_for_lock=wait, discovery=discovery)
    reporter.summary(result.run, result.seconds, str(settings.output_path))
    _exit_for(result)


@cli.command()
@click.argument("raw_dir", type=click.Path(exists=True, file_okay=False))
@output_options
@handle_errors
def replay(raw_dir: str, config_file: str | None, progress: bool | None, wait: bool, debug: bool, **cli_settings: Any) -> None:
    """Rebuild or update the warehouse from a raw landing zone (no API calls)."""
    settings = _settings(config_file, **cli_settings)
    reporter = _reporter(settings, progress)
    result = run_replay(Path(raw_dir), settings, reporter, wait_for_lock=wait)
    reporter.summary(result.run, result.seconds, str(settings.output_path))
    _exit_for(result)


@cli.command()
@click.option("--calls", "n_calls", type=int, default=500, show_default=True, help="Synthetic calls to export.")
@click.option("--format", "format", type=click.Choice(FORMATS), default="duckdb", show_default=True)
@click.option("--output", type=click.Path(), default=None, help="[default: ultravox-demo.duckdb / ultravox-demo-parquet]")
@click.option("--progress/--no-progress", default=None)
@debug_option
@handle_errors
def demo(n_calls: int, format: str, output: str | None, progress: bool | None, debug: bool) -> None:
    """Try it with no key and no network: export synthetic calls from the built-in simulated API."""
    from pipeline.demo import run_demo

    output = output or ("ultravox-demo.duckdb" if format == "duckdb" else "ultravox-demo-parquet")
    sys.exit(run_demo(n_calls, format, Path(output), progress))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--calls", "n_calls", type=int, default=500, show_default=True, help="Synthetic calls served.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--api-key", "sandbox_key", default="sandbox-key", show_default=True, help="Key the sandbox expects in X-API-Key.")
@click.option("--no-auth", is_flag=True, help="Accept requests without a key.")
@click.option("--latency-ms", type=float, default=0.0, show_default=True, help="Added to every answer.")
@click.option("--fault-rate", type=float, default=0.0, show_default=True, help="Fraction of requests answered with a transient fault.")
@click.option("--rate-limit", type=float, default=None, help="Requests/s before answering 429.")
@click.option("--write-ids", type=click.Path(dir_okay=False), default=None, help="Write the served call IDs to this file.")
@debug_option
@handle_errors
def sandbox(
    host: str,
    port: int,
    n_calls: int,
    seed: int,
    sandbox_key: str,
    no_auth: bool,
    latency_ms: float,
    fault_rate: float,
    rate_limit: float | None,
    write_ids: str | None,
    debug: bool,
) -> None:
    """Serve the simulated Ultravox API in the foreground (Ctrl-C stops)."""
    from pipeline import sandbox as sb

    data = sb.SyntheticData(n_calls=n_calls, seed=seed)
    options = sb.SandboxOptions(
        api_key=None if no_auth else sandbox_key,
        latency_ms=latency_ms,
        fault_rate=fault_rate,
        rate_limit_rps=rate_limit,
    )
    if write_ids:
        sb.write_call_ids(data, Path(write_ids))
    key_note = "no key needed" if no_auth else f"export ULTRAVOX_API_KEY={sandbox_key}"
    click.echo(f"Simulated Ultravox API on http://{host}:{port} with {n_calls} calls ({key_note})", err=True)
    if write_ids:
        click.echo(f"Call IDs written to {write_ids}", err=True)
    try:
        sb.serve(data, options, host, port)
    except KeyboardInterrupt:
        pass


def _warehouse_at(output: str | None) -> tuple[str, Path]:
    """report/status read either output: a folder is Parquet, a file is DuckDB."""
    if output is None:
        defaults = [(fmt, Settings(format=fmt).output_path) for fmt in FORMATS]
        found = [(fmt, path) for fmt, path in defaults if path.exists()]
        return found[0] if found else defaults[0]
    path = Path(output)
    return ("parquet" if path.is_dir() else "duckdb"), path


warehouse_option = click.option(
    "--output", type=click.Path(), default=None,
    help="Warehouse to read: a DuckDB file or a Parquet folder [default: ultravox_stages.duckdb, else ultravox_stages_parquet].",
)


@cli.command()
@click.argument("name", required=False)
@warehouse_option
@click.option("--format", "style", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--since", default=None, help="Only stages created on or after this date (YYYY-MM-DD).")
@click.option("--until", default=None, help="Only stages created on or before this date (YYYY-MM-DD).")
@click.option("--model", default=None, help="Only this model.")
@debug_option
@handle_errors
def report(name: str | None, output: str | None, style: str, since: str | None, until: str | None, model: str | None, debug: bool) -> None:
    """Run a named SQL report from sql/; without NAME, list the reports."""
    from pipeline import reports

    if name is None:
        click.echo(reports.list_reports())
        return
    fmt, path = _warehouse_at(output)
    click.echo(reports.run_report(fmt, path, name, style, {"since": since, "until": until, "model": model}))


@cli.command()
@warehouse_option
@click.option("--format", "style", type=click.Choice(["table", "json"]), default="table", show_default=True)
@debug_option
@handle_errors
def status(output: str | None, style: str, debug: bool) -> None:
    """Last runs, calls by status, failed calls and why; exit 1 if the last run did not succeed."""
    from pipeline import status as st

    fmt, path = _warehouse_at(output)
    text, healthy = st.status_report(fmt, path, style)
    click.echo(text)
    sys.exit(EXIT_OK if healthy else EXIT_PARTIAL)


def main() -> None:
    # Everything imported so far (httpx, duckdb, pyarrow, ...) lives as long as the
    # process: keep it out of the cyclic GC's full collections, which otherwise
    # pause a run for ~0.1 s each, stalling every request in flight.
    gc.freeze()
    cli(prog_name="ultravox-stages")


"""The command line: a thin click layer over runner, sandbox, reports and status."""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pipeline import __version__
from pipeline.calls_input import read_call_ids
from pipeline.config import DEFAULT_OUTPUTS, FORMATS, Settings, api_key_from_env, load_settings, read_config_file
from pipeline.errors import EXIT_OK, EXIT_PARTIAL, EXIT_SIGINT, EXIT_WAREHOUSE, InputError, StagesError, UsageError, register_secret, scrub
from pipeline.log import Reporter
from pipeline.runner import RunInterrupted, RunResult, run_export, run_replay
from pipeline.sandbox.hostile import HOSTILE_KINDS

if TYPE_CHECKING:
    from pipeline.discover import Discovery

F = TypeVar("F", bound=Callable[..., Any])

#: The Reporter of the command running now: errors go out in its format (text or JSON).
_active_reporter: Reporter | None = None


def _apply(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def decorator(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorator


debug_option = click.option("--debug", is_flag=True, help="Also print tracebacks (the exit code stays the same).")

output_options = _apply(
    [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML settings file (see config.example.toml)."),
        click.option("--format", "format", type=click.Choice(FORMATS), default=None,
                     help="Warehouse format [default: that of an existing --output, else duckdb]."),
        click.option("--output", type=str, default=None,
                     help="DuckDB file, Parquet folder, or Delta folder / s3:// URI "
                          "[default: ultravox_stages.duckdb / ultravox_stages_parquet / ultravox_stages_delta]."),
        click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
                     help="stderr as text, or one JSON object per line for log shippers [default: text]."),
        click.option("--progress/--no-progress", default=None, help="Progress bar [default: on when stderr is a terminal]."),
        click.option("--wait", is_flag=True, help="Wait for another run writing the same output instead of exiting 2."),
        click.option("--wait-seconds", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                     help="Like --wait, but exit 2 after waiting this long."),
        debug_option,
    ]
)

fetch_options = _apply(
    [
        click.option("--base-url", default=None, help="Ultravox API origin [default: https://api.ultravox.ai]."),
        click.option("--concurrency", type=int, default=None, help="Calls in flight at most [default: 16]."),
        click.option("--page-size", type=int, default=None, help="pageSize sent to the API [default: 100]."),
        click.option("--max-rps", type=float, default=None, help="Client-side cap on requests per second [default: 195; Ultravox allows 200 per key]."),
        click.option("--refresh", is_flag=True, default=None, help="Re-fetch calls already loaded."),
        click.option("--raw-dir", type=click.Path(file_okay=False), default=None, help="Land every page received here (jsonl.gz, secrets redacted)."),
        click.option("--allow-insecure-http", is_flag=True, default=None, help="Allow plain http to a non-loopback host."),
    ]
)


def _error_reporter(kwargs: dict[str, Any]) -> Reporter:
    if _active_reporter is not None:
        return _active_reporter
    return Reporter(kwargs.get("log_format") or "text", progress=False)


def _fail(kwargs: dict[str, Any], message: str, code: int, exc: BaseException | None = None,
          event: str = "error", level: str = "error") -> None:
    """One line (or one JSON object) on stderr, the traceback first with --debug, then exit."""
    reporter = _error_reporter(kwargs)
    if exc is not None and (kwargs.get("debug") or os.environ.get("ULTRAVOX_STAGES_DEBUG") == "1"):
        reporter.end_progress()
        sys.stderr.write(scrub("".join(traceback.format_exception(exc))))
    reporter.error(message, code, event=event, level=level)
    sys.exit(code)


def _quiet_broken_pipe() -> None:
    # The reader of stdout went away (`report | head`): that is its choice, not an error.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout is no real file (tests)
        pass
    sys.exit(EXIT_OK)


def handle_errors(fn: F) -> F:
    """One clear line and the contract's exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _active_reporter
        _active_reporter = None
        try:
            return fn(*args, **kwargs)
        except StagesError as exc:
            _fail(kwargs, f"error: {exc}", exc.exit_code, exc)
        except RunInterrupted as exc:
            _fail(kwargs, str(exc), exc.exit_code, None, event="interrupted", level="warning")
        except KeyboardInterrupt as exc:
            _fail(kwargs, "interrupted: the warehouse holds every batch committed so far; run again to finish",
                  EXIT_SIGINT, exc, event="interrupted", level="warning")
        except BrokenPipeError:
            _quiet_broken_pipe()
        except Exception as exc:  # a bug or an unforeseen failure: one line, exit 4
            # A library's message may span lines (pyarrow adds its C++ call site): its first line.
            first = next((line.strip() for line in scrub(str(exc)).splitlines() if line.strip()), "")[:300]
            _fail(kwargs, f"internal error: {type(exc).__name__}: {first}; rerun with --debug for a traceback",
                  EXIT_WAREHOUSE, exc)

    return wrapper  # type: ignore[return-value]


def detect_format(location: str) -> str | None:
    """The format of an existing output; None when nothing is there yet.

    An object-store URI is Delta; a folder holding ``call_stages/_delta_log`` is Delta,
    another folder Parquet; a file DuckDB."""
    if "://" in location:
        return "delta"
    path = Path(location)
    if path.is_dir():
        return "delta" if (path / "call_stages" / "_delta_log").is_dir() else "parquet"
    if path.is_file():
        return "duckdb"
    return None


def warehouse_at(output: str | None, fmt: str | None = None) -> tuple[str, str]:
    """(format, location) of the output to use: the given format, else the one found there.

    Without ``output``: the first default output that exists (duckdb, parquet, delta)."""
    if output is None:
        for default_fmt in FORMATS if fmt is None else (fmt,):
            location = DEFAULT_OUTPUTS[default_fmt]
            if detect_format(location) is not None:
                return fmt or detect_format(location) or default_fmt, location
        chosen = fmt or FORMATS[0]
        return chosen, DEFAULT_OUTPUTS[chosen]
    return fmt or detect_format(output) or FORMATS[0], output


def _as_path(location: str) -> Path:
    return location if "://" in location else Path(location)  # type: ignore[return-value]


def _settings(config_file: str | None, **cli: Any) -> Settings:
    settings = load_settings(config_file, cli)
    format_given = cli.get("format") is not None or (config_file is not None and "format" in read_config_file(config_file))
    if settings.output is not None and not format_given:
        fmt, _ = warehouse_at(settings.output)
        if fmt != settings.format:
            return dataclasses.replace(settings, format=fmt)
    return settings


def _reporter(settings: Settings, progress: bool | None) -> Reporter:
    global _active_reporter
    _active_reporter = Reporter(settings.log_format, progress)
    return _active_reporter


def _exit_for(result: RunResult) -> None:
    if result.run.calls_failed or result.bad_lines:
        sys.exit(EXIT_PARTIAL)
    sys.exit(EXIT_OK)


def _wait(wait: bool, wait_seconds: float | None) -> tuple[bool, float | None]:
    return wait or wait_seconds is not None, wait_seconds


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ultravox-stages")
def cli() -> None:
    """Export Ultravox call stages into DuckDB, Parquet or Delta Lake, idempotently.

    \b
    Start here (no key, no network):   ultravox-stages demo
    Export real calls:                 ULTRAVOX_API_KEY=... ultravox-stages run --calls-file ids.txt
    Exit codes: 0 ok · 1 some calls failed · 2 usage/config/input error · 3 auth rejected or API
    unreachable · 4 warehouse or internal error · 130/143 stopped by SIGINT/SIGTERM
    """


@cli.command(short_help="Export the stages of calls from the Ultravox API.")
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
    wait_seconds: float | None,
    debug: bool,
    **cli_settings: Any,
) -> None:
    """Export the stages of the given calls from the Ultravox API.

    The API key is read from the ULTRAVOX_API_KEY environment variable (never from
    a file or a flag). Calls already loaded are skipped unless --refresh.

    \b
    Example:
      ULTRAVOX_API_KEY=... ultravox-stages run --calls-file ids.txt --output stages.duckdb
      ULTRAVOX_API_KEY=... ultravox-stages run --incremental --format parquet --output lake/
    """
    from pipeline.http import check_base_url  # the HTTP stack only for commands that fetch

    settings = _settings(config_file, calls_file=calls_file, **cli_settings)
    check_base_url(settings.base_url, settings.allow_insecure_http)
    ids = read_call_ids(settings.calls_file, call_ids)
    reporter = _reporter(settings, progress)
    if ids.duplicates:
        reporter.warning("duplicate_ids", f"{ids.duplicates} duplicate call ID(s) ignored", duplicates=ids.duplicates)
    discovery = _discovery(since, until, settings)
    if discovery is None and not ids.ids:
        if ids.source_given:
            reporter.event("nothing_to_do", f"nothing to do: {settings.calls_file} lists no call IDs")
            sys.exit(EXIT_OK)
        raise InputError("no call IDs given: pass --calls-file FILE, --call-id ID, --since DATE or --incremental")
    api_key = _api_key(settings)
    waiting, seconds = _wait(wait, wait_seconds)
    result = run_export(settings, ids.ids, api_key, reporter, wait_for_lock=waiting, discovery=discovery,
                        wait_seconds=seconds)
    reporter.summary(result.run, result.seconds, settings.output_location)
    _exit_for(result)


def _discovery(since: str | None, until: str | None, settings: Settings) -> Discovery | None:
    if not (since or until or settings.incremental):
        return None
    if until and not (since or settings.incremental):
        raise InputError("--until needs --since or --incremental")
    from pipeline.discover import Discovery, parse_day

    return Discovery(
        since=parse_day("--since", since),
        until=parse_day("--until", until),
        incremental=settings.incremental,
        overlap_hours=settings.overlap_hours,
        keep_deleted=settings.keep_deleted,
    )


def _api_key(settings: Settings) -> str:
    from pipeline.http import check_api_key

    api_key = api_key_from_env(settings)
    register_secret(api_key)
    check_api_key(api_key, settings.api_key_env)  # before any request: a key that cannot be sent is exit 2
    return api_key


@cli.command(short_help="Rebuild or update the warehouse from a raw landing zone.")
@click.argument("raw_dir", type=click.Path(exists=True, file_okay=False))
@output_options
@handle_errors
def replay(raw_dir: str, config_file: str | None, progress: bool | None, wait: bool, wait_seconds: float | None,
           debug: bool, **cli_settings: Any) -> None:
    """Rebuild or update the warehouse from a raw landing zone (no API calls).

    \b
    Example:
      ultravox-stages replay raw/ --output rebuilt.duckdb
    """
    settings = _settings(config_file, **cli_settings)
    reporter = _reporter(settings, progress)
    waiting, seconds = _wait(wait, wait_seconds)
    result = run_replay(Path(raw_dir), settings, reporter, wait_for_lock=waiting, wait_seconds=seconds)
    reporter.summary(result.run, result.seconds, settings.output_location)
    _exit_for(result)


@cli.command(short_help="Try it: no key, no network, synthetic calls.")
@click.option("--calls", "n_calls", type=click.IntRange(min=1), default=500, show_default=True, help="Synthetic calls to export.")
@click.option("--format", "format", type=click.Choice(FORMATS), default="duckdb", show_default=True, help="Warehouse format.")
@click.option("--output", type=click.Path(), default=None, help="[default: ultravox-demo.duckdb / ultravox-demo-parquet / ultravox-demo-delta]")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on when stderr is a terminal].")
@click.option("--hostile", is_flag=True, help="Make a few synthetic calls misbehave (endless nesting, broken next links, reused stage ids, hidden credentials): each fails alone, secrets stay redacted.")
@debug_option
@handle_errors
def demo(n_calls: int, format: str, output: str | None, progress: bool | None, hostile: bool, debug: bool) -> None:
    """Try it with no key and no network: export synthetic calls from the built-in simulated API.

    \b
    Example:
      ultravox-stages demo --calls 200
      ultravox-stages demo --hostile --format parquet
    """
    from pipeline.demo import run_demo

    output = output or {"duckdb": "ultravox-demo.duckdb", "parquet": "ultravox-demo-parquet"}.get(format, "ultravox-demo-delta")
    sys.exit(run_demo(n_calls, format, Path(output), progress, hostile=hostile))


@cli.command(short_help="Serve the simulated Ultravox API (for trying, tests, benchmarks).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8765, show_default=True, help="Port to listen on.")
@click.option("--calls", "n_calls", type=int, default=500, show_default=True, help="Synthetic calls served.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic data (same seed, same calls).")
@click.option("--api-key", "sandbox_key", default="sandbox-key", show_default=True, help="Key the sandbox expects in X-API-Key.")
@click.option("--no-auth", is_flag=True, help="Accept requests without a key.")
@click.option("--latency-ms", type=float, default=0.0, show_default=True, help="Added to every answer.")
@click.option("--fault-rate", type=float, default=0.0, show_default=True, help="Fraction of requests answered with a transient fault.")
@click.option("--rate-limit", type=float, default=None, help="Requests/s before answering 429.")
@click.option("--write-ids", type=click.Path(dir_okay=False), default=None, help="Write the served call IDs to this file.")
@click.option("--hostile", "hostile", multiple=True, type=click.Choice(sorted(HOSTILE_KINDS)), metavar="KIND",
              help=f"Serve hostile answers of this kind to a share of the calls (repeatable): {', '.join(sorted(HOSTILE_KINDS))}.")
@click.option("--hostile-share", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Fraction of the calls that get one of the --hostile kinds.")
@click.option("--big-prompts", is_flag=True, help="About a quarter of the stages carry a ~100 KB system prompt.")
@click.option("--huge-prompt-calls", type=click.IntRange(min=0), default=0, show_default=True,
              help="This many calls carry a 60 MB system prompt.")
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
    hostile: tuple[str, ...],
    hostile_share: float,
    big_prompts: bool,
    huge_prompt_calls: int,
    debug: bool,
) -> None:
    """Serve the simulated Ultravox API in the foreground (Ctrl-C stops).

    \b
    Example:
      ultravox-stages sandbox --calls 1000 --fault-rate 0.1 --hostile echo_key --write-ids ids.txt
    """
    from pipeline import sandbox as sb

    data = sb.SyntheticData(n_calls=n_calls, seed=seed, big_prompts=big_prompts, huge_prompt_calls=huge_prompt_calls)
    options = sb.SandboxOptions(
        api_key=None if no_auth else sandbox_key,
        latency_ms=latency_ms,
        fault_rate=fault_rate,
        rate_limit_rps=rate_limit,
        hostile=hostile,
        hostile_share=hostile_share,
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


warehouse_option = click.option(
    "--output", type=str, default=None,
    help="Warehouse to read: a DuckDB file, a Parquet or Delta folder, or an s3:// Delta URI "
         "[default: the first of ultravox_stages.duckdb, ultravox_stages_parquet, ultravox_stages_delta that exists].",
)


@cli.command(short_help="Run a named SQL report; without NAME, list them.")
@click.argument("name", required=False)
@warehouse_option
@click.option("--format", "style", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True, help="Output style.")
@click.option("--since", default=None, help="Only stages created on or after this date (YYYY-MM-DD).")
@click.option("--until", default=None, help="Only stages created on or before this date (YYYY-MM-DD).")
@click.option("--model", default=None, help="Only this model.")
@debug_option
@handle_errors
def report(name: str | None, output: str | None, style: str, since: str | None, until: str | None, model: str | None, debug: bool) -> None:
    """Run a named SQL report from sql/; without NAME, list the reports.

    \b
    Example:
      ultravox-stages report token_growth_by_model --output stages.duckdb --format csv
    """
    from pipeline import reports

    if name is None:
        click.echo(reports.list_reports())
        return
    fmt, location = warehouse_at(output)
    click.echo(reports.run_report(fmt, _as_path(location), name, style, {"since": since, "until": until, "model": model}))


@cli.command(short_help="Last runs, calls by status, failed calls and why.")
@warehouse_option
@click.option("--format", "style", type=click.Choice(["table", "json"]), default="table", show_default=True, help="Output style.")
@debug_option
@handle_errors
def status(output: str | None, style: str, debug: bool) -> None:
    """Last runs, calls by status, failed calls and why; exit 1 if the last run did not succeed.

    \b
    Example:
      ultravox-stages status --output stages.duckdb --format json
    """
    from pipeline import status as st

    fmt, location = warehouse_at(output)
    text, healthy = st.status_report(fmt, _as_path(location), style)
    click.echo(text)
    sys.exit(EXIT_OK if healthy else EXIT_PARTIAL)


@cli.command(short_help="Every table of an output: row count and column descriptions.")
@warehouse_option
@click.option("--format", "style", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True, help="Output style.")
@debug_option
@handle_errors
def tables(output: str | None, style: str, debug: bool) -> None:
    """Every table of an output with its row count and column descriptions.

    \b
    Example:
      ultravox-stages tables --output stages.duckdb
    """
    from pipeline import explore

    fmt, location = warehouse_at(output)
    click.echo(explore.render_tables(explore.list_tables(fmt, location), style))


@cli.command(short_help="Ad-hoc read-only SQL against any output.")
@click.argument("sql")
@warehouse_option
@click.option("--format", "style", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True, help="Output style.")
@debug_option
@handle_errors
def query(sql: str, output: str | None, style: str, debug: bool) -> None:
    """Run one read-only SQL statement (DuckDB dialect) against the output's tables.

    \b
    Example:
      ultravox-stages query "SELECT model, count(*) FROM call_stages GROUP BY model" --output lake/
    """
    from pipeline import explore

    fmt, location = warehouse_at(output)
    click.echo(explore.run_query(fmt, location, sql, style))


@cli.command(short_help="Compact and vacuum a Delta output.")
@warehouse_option
@click.option("--retention-hours", type=click.FloatRange(min=0), default=168.0, show_default=True,
              help="Vacuum unreferenced files older than this.")
@click.option("--wait", is_flag=True, help="Wait for a run writing the output instead of exiting 2.")
@debug_option
@handle_errors
def maintain(output: str | None, retention_hours: float, wait: bool, debug: bool) -> None:
    """Compact small files, vacuum old ones and checkpoint every table of a Delta output.

    \b
    Example:
      ultravox-stages maintain --output s3://bucket/stages --retention-hours 24
    """
    fmt, location = warehouse_at(output, "delta" if output is None else None)
    if fmt != "delta":
        raise UsageError(f"{location} is a {fmt} output: maintain compacts Delta outputs (--format delta)")
    from pipeline.load.delta import maintain as maintain_delta

    figures = maintain_delta(location, retention_hours, wait_for_lock=wait)
    for table, counts in figures.items():
        click.echo(f"{table}: {counts['files_before']} → {counts['files_after']} files, "
                   f"{counts['files_vacuumed']} vacuumed, version {counts['version']}")


def main() -> None:
    # Everything imported so far (httpx, duckdb, pyarrow, ...) lives as long as the
    # process: keep it out of the cyclic GC's full collections, which otherwise
    # pause a run for ~0.1 s each, stalling every request in flight.
    gc.freeze()
    try:
        code = cli.main(prog_name="ultravox-stages", standalone_mode=False)
    except click.ClickException as exc:  # bad flags: click's message, as JSON if asked for
        if _json_requested(sys.argv[1:]):
            Reporter("json").error(f"error: {exc.format_message()}", exc.exit_code)
        else:
            exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(EXIT_SIGINT)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def _json_requested(args: list[str]) -> bool:
    return any(a == "--log-format=json" or (a == "--log-format" and b == "json") for a, b in zip(args, args[1:] + [""]))

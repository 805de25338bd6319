"""`ultravox-stages demo`: the whole path on synthetic data, no key, no network."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import click

from pipeline.config import Settings
from pipeline.errors import EXIT_OK, EXIT_PARTIAL
from pipeline.load import query_connection
from pipeline.log import Reporter
from pipeline.runner import run_export
from pipeline.sandbox import Sandbox, SandboxOptions, SyntheticData

DEMO_QUERIES = {
    "Tokens by model": """
        SELECT model, count(*) AS stages,
               sum(latest_token_count) AS latest_tokens,
               round(avg(latest_token_count - initial_token_count), 1) AS avg_growth,
               sum(error_count) AS errors
        FROM call_stages GROUP BY model ORDER BY stages DESC""",
    "Errors by voice provider": """
        SELECT coalesce(v.provider, '(none)') AS provider, count(*) AS stages,
               sum(s.error_count) AS errors
        FROM call_stages s LEFT JOIN stage_voices v
          ON v.call_stage_id = s.call_stage_id AND v.role = 'external'
        GROUP BY 1 ORDER BY errors DESC, stages DESC""",
}


def _table(con: object, sql: str) -> str:
    rel = con.sql(sql)  # type: ignore[attr-defined]
    names = rel.columns
    rows = [["" if v is None else str(v) for v in row] for row in rel.fetchall()]
    widths = [max(len(n), *(len(r[i]) for r in rows)) if rows else len(n) for i, n in enumerate(names)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(names), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run_demo(n_calls: int, fmt: str, output: Path, progress: bool | None) -> int:
    # A fresh demo every time: the output is ours (demo only ever writes its own).
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    key = secrets.token_urlsafe(16)  # a throwaway key for the in-process sandbox only
    data = SyntheticData(n_calls=n_calls, seed=0)
    with Sandbox(data, SandboxOptions(api_key=key)) as sandbox:
        settings = Settings(base_url=sandbox.base_url, format=fmt, output=str(output), concurrency=32, max_rps=5000.0)
        click.echo(f"Simulated Ultravox API on {sandbox.base_url}: exporting {n_calls} synthetic calls…", err=True)
        result = run_export(settings, list(data.call_ids), key, Reporter(progress=progress))
    run = result.run
    click.echo(
        f"\nExported {run.calls_requested} calls in {result.seconds:.1f}s: "
        f"{run.calls_loaded} loaded, {run.calls_not_found} not found, {run.calls_failed} failed; "
        f"{run.http_requests} HTTP requests, {run.http_retries} retries."
    )
    con = query_connection(fmt, output)
    counts = con.execute(
        "SELECT (SELECT count(*) FROM call_stages), (SELECT count(*) FROM stage_inactivity_messages),"
        " (SELECT count(*) FROM stage_voices), (SELECT coalesce(sum(error_count), 0) FROM call_stages)"
    ).fetchall()[0]
    click.echo(f"Warehouse {output}: {counts[0]} stages, {counts[1]} inactivity messages, {counts[2]} voices, {counts[3]} stage errors.")
    for title, sql in DEMO_QUERIES.items():
        click.echo(f"\n{title}\n{_table(con, sql)}")
    con.close()
    click.echo(
        f"\nNext: duckdb {output}  ·  ultravox-stages report --output {output}  ·  ultravox-stages status --output {output}"
    )
    return EXIT_OK if run.calls_failed == 0 else EXIT_PARTIAL

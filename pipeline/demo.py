"""`ultravox-stages demo`: the whole path on synthetic data, no key, no network."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import click

from pipeline import reports
from pipeline.config import Settings
from pipeline.errors import EXIT_OK, EXIT_PARTIAL
from pipeline.load import query_connection
from pipeline.log import Reporter
from pipeline.runner import run_export
from pipeline.sandbox import Sandbox, SandboxOptions, SyntheticData

#: Reports from sql/ shown at the end of the demo (the same ones `report` runs).
DEMO_REPORTS = ("token_growth_by_model",)
ERRORS_BY_PROVIDER = """
    SELECT coalesce(v.provider, '(none)') AS provider, count(*) AS stages, sum(s.error_count) AS errors
    FROM call_stages s
    LEFT JOIN stage_voices v ON v.call_stage_id = s.call_stage_id AND v.role = 'external'
    GROUP BY ALL ORDER BY errors DESC, stages DESC"""


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
    return EXIT_OK if run.calls_failed == 0 else EXIT_PARTIAL

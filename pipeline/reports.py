"""`ultravox-stages report`: named SQL reports from ``sql/`` run against either output.

A report is one ``sql/<name>.sql`` file whose first line is ``-- name: <name>`` and
second line ``-- <one-line description>``; more ``--`` lines may document columns,
parameters and NULL handling. The files ship in the wheel as the data package
``pipeline.sql`` (see pyproject.toml); a source checkout falls back to ``sql/`` next
to the package.

Parameters (``--since``, ``--until``, ``--model``) are always bound as DuckDB named
parameters ``$since``, ``$until``, ``$model`` -- never formatted into the SQL text. A
report receives exactly the parameters its SQL mentions (DuckDB rejects unused named
parameters), so a filter given to a report that does not use it (``recent_runs``,
``failed_calls``, ``data_freshness``) is ignored; each report's header says which
parameters it takes. Dates are validated for every report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import secrets
import uuid
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import duckdb

from pipeline.errors import UsageError
from pipeline.records import rfc3339

STYLES = ("table", "csv", "json")
PARAMETERS = ("since", "until", "model")
#: Marks, in the listing, the reports that ignore --since/--until/--model.
NO_FILTERS = "[no filters]"

_NAME_LINE = re.compile(r"^--\s*name:\s*(?P<name>[A-Za-z0-9_]+)\s*$")
_DESCRIPTION_LINE = re.compile(r"^--\s*(?P<text>\S.*?)\s*$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Comments and string literals are removed before looking for $parameters, so that
# JSON paths such as '$.stability' or a `$since` in a comment are never mistaken for one.
_COMMENT_OR_STRING = re.compile(r"--[^\n]*|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_PARAMETER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


#: Each voice beside its stage's common columns: what every sql/voices_<provider>.sql
#: report selects from (the per-provider files only type their provider's settings).
STAGE_VOICE_ROWS_SQL = """
CREATE OR REPLACE TEMP VIEW stage_voice_rows AS
SELECT
  v.call_id::VARCHAR AS call_id,
  v.call_stage_id::VARCHAR AS call_stage_id,
  s.stage_index,
  s.created,
  s.model AS stage_model,
  v.role,
  v.voice_id,
  v.model AS tts_model,
  v.speed,
  v.provider,
  v.settings
FROM stage_voices v
JOIN call_stages s ON s.call_stage_id = v.call_stage_id
"""



class ReportFileError(Exception):
    """A file in sql/ that breaks the report conventions (a bug in the package)."""


# --------------------------------------------------------------------------- discovery


def _sql_dir() -> Traversable:
    """The installed ``pipeline.sql`` data package, else ``sql/`` beside the package."""
    try:
        packaged = resources.files("pipeline.sql")
        if any(entry.name.endswith(".sql") for entry in packaged.iterdir()):
            return packaged
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "sql"


def _report_files() -> dict[str, Traversable]:
    folder = _sql_dir()
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    files = {e.name[: -len(".sql")]: e for e in entries if e.name.endswith(".sql") and e.is_file()}
    return dict(sorted(files.items()))


def report_names() -> list[str]:
    return list(_report_files())


def parse_report(name: str, text: str) -> tuple[str, str]:
    """(description, sql) of a report file's text; checks the two header lines."""
    lines = text.lstrip("\ufeff").splitlines()
    if len(lines) < 3:
        raise ReportFileError(f"sql/{name}.sql: expected `-- name:`, a description line and SQL")
    match = _NAME_LINE.match(lines[0].strip())
    if not match or match.group("name") != name:
        raise ReportFileError(f"sql/{name}.sql: line 1 must be `-- name: {name}`")
    described = _DESCRIPTION_LINE.match(lines[1].strip())
    if not described:
        raise ReportFileError(f"sql/{name}.sql: line 2 must be `-- <description>`")
    sql = text.lstrip("\ufeff").strip().rstrip(";").strip()
    unknown = sorted(set(sql_parameters(sql)) - set(PARAMETERS))
    if unknown:
        raise ReportFileError(f"sql/{name}.sql: unknown parameters {unknown} (known: {list(PARAMETERS)})")
    return described.group("text"), sql


def load_report(name: str) -> tuple[str, str]:
    """(description, sql) of the named report; UsageError listing the known names."""
    files = _report_files()
    if name not in files:
        known = ", ".join(files) or "(none found)"
        raise UsageError(f"unknown report {name!r}; known reports: {known}")
    return parse_report(name, files[name].read_text(encoding="utf-8"))


def sql_parameters(sql: str) -> list[str]:
    """The named parameters ($name) a query uses, in first-use order."""
    code = _COMMENT_OR_STRING.sub(" ", sql)
    seen: dict[str, None] = {}
    for found in _PARAMETER.findall(code):
        seen.setdefault(found, None)
    return list(seen)


def list_reports() -> str:
    """One line per report: name and description, aligned."""
    described = []
    for name in report_names():
        text, sql = load_report(name)
        if not sql_parameters(sql):
            text += f"  {NO_FILTERS}"
        described.append((name, text))
    if not described:
        return "no reports found (the sql/ folder is missing from this installation)"
    width = max(len(name) for name, _ in described)
    lines = ["Reports (run: ultravox-stages report NAME [--since DATE] [--until DATE] [--model M] [--format table|csv|json]):"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in described]
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


def _check_date(flag: str, value: str) -> date:
    if not _DATE.match(value):
        raise UsageError(f"--{flag} {value!r} is not a date in the form YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--{flag} {value!r} is not a valid date (YYYY-MM-DD)") from None


def bind_parameters(name: str, sql: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The named parameters for ``sql``: exactly those it mentions, validated."""
    given = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
    unknown = sorted(set(given) - set(PARAMETERS))
    if unknown:
        raise UsageError(f"unknown report parameter(s) {unknown}; known: {list(PARAMETERS)}")
    values: dict[str, Any] = {}
    if "since" in given:
        values["since"] = _check_date("since", str(given["since"]))
    if "until" in given:
        values["until"] = _check_date("until", str(given["until"]))
    if "since" in values and "until" in values and values["since"] > values["until"]:
        raise UsageError(f"--since {values['since']} is after --until {values['until']}")
    if "model" in given:
        values["model"] = str(given["model"])
    # Exactly the parameters the SQL mentions: NULL for a filter not given, and a filter
    # the report does not use is dropped (DuckDB rejects unused named parameters).
    return {p: values.get(p) for p in sql_parameters(sql)}


def run_query(
    con: duckdb.DuckDBPyConnection, sql: str, bound: Mapping[str, Any]
) -> tuple[list[str], list[str], list[tuple[Any, ...]]]:
    """Column names, DuckDB type names and rows of one parameterised query."""
    con.execute("SET TimeZone = 'UTC'")
    cursor = con.execute(sql, dict(bound)) if bound else con.execute(sql)
    description = cursor.description or []
    names = [d[0] for d in description]
    types = [str(d[1]) for d in description]
    return names, types, cursor.fetchall()


def run_report(
    fmt: str, path: Path, name: str, style: str, params: Mapping[str, Any] | None = None
) -> str:
    """Run the named report against the warehouse at ``path`` and render it."""
    if style not in STYLES:
        raise UsageError(f"unknown output style {style!r}; use one of {', '.join(STYLES)}")
    _description, sql = load_report(name)
    bound = bind_parameters(name, sql, params)
    from pipeline.load import query_connection

    con = query_connection(fmt, Path(path))
    con.execute(STAGE_VOICE_ROWS_SQL)
    try:
        names, types, rows = run_query(con, sql, bound)
    except duckdb.Error as exc:
        raise UsageError(f"report {name!r} failed on {path}: {str(exc).splitlines()[0]}") from exc
    finally:
        con.close()
    return render(names, types, rows, style)


# --------------------------------------------------------------------------- output


def render(names: Sequence[str], types: Sequence[str], rows: Sequence[Sequence[Any]], style: str) -> str:
    if style == "csv":
        return render_csv(names, rows)
    if style == "json":
        return render_json(names, types, rows)
    return render_table(names, rows)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def _text(value: Any) -> str:
    """A cell as plain text (csv and table): exact, UTC timestamps, NULL empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return rfc3339(value) if value.tzinfo is not None else value.isoformat()
    if isinstance(value, (date, time)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return str(value.total_seconds())
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, (list, tuple, dict)):
        return _dumps(_jsonable(value))
    return str(value)


def _table_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        text = f"{value:.4f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    if isinstance(value, Decimal):
        text = format(value, "f")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return _text(value).replace("\r", "\\r").replace("\n", "\\n")


def render_table(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned text: header, a dashed rule under each column, numbers right-aligned."""
    cells = [[_table_cell(v) for v in row] for row in rows]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    numeric = [
        any(_is_number(row[i]) for row in rows) and all(row[i] is None or _is_number(row[i]) for row in rows)
        for i in range(len(names))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(names)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    if not rows:
        out.append("(no rows)")
    return "\n".join(out)


def render_csv(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([_text(v) for v in row])
    return buffer.getvalue().rstrip("\n")


class _Exact:
    """A DECIMAL on its way into JSON: written as its exact digits, never via float."""

    __slots__ = ("literal",)

    def __init__(self, value: Decimal):
        if value == value.to_integral_value():
            self.literal = str(int(value))
        else:
            text = format(value, "f")
            self.literal = text.rstrip("0").rstrip(".") if "." in text else text


def _jsonable(value: Any) -> Any:
    """JSON-safe: DECIMAL → exact number, timestamps → RFC 3339 UTC (naive ones are UTC), NaN → null."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return _Exact(value) if value.is_finite() else None
    if isinstance(value, datetime):
        return rfc3339(value if value.tzinfo else value.replace(tzinfo=timezone.utc))
    if isinstance(value, (date, time, timedelta)):
        return _text(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    return str(value)


def _dumps(value: Any, indent: int | None = None) -> str:
    """json.dumps of a :func:`_jsonable` value, DECIMALs as exact number literals.

    The json module can only write a Decimal through float (``315576000120.663677766``
    would become ``315576000120.6637``), so each one is written as a unique placeholder
    string first and then replaced by its digits; read it back exactly with
    ``json.loads(text, parse_float=decimal.Decimal)``.
    """
    literals: list[str] = []
    marker = f"\x00decimal-{secrets.token_hex(8)}:"

    def placeholder(obj: Any) -> str:
        if isinstance(obj, _Exact):
            literals.append(obj.literal)
            return f"{marker}{len(literals) - 1}"
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

    text = json.dumps(value, indent=indent, ensure_ascii=False, default=placeholder)
    if not literals:
        return text
    quoted = re.escape(json.dumps(marker, ensure_ascii=False)[:-1])
    return re.sub(quoted + r'(\d+)"', lambda m: literals[int(m.group(1))], text)


def json_text(value: Any) -> str:
    """Indented JSON of any value, in the same style as ``render_json`` (RFC 3339, exact decimals)."""
    return _dumps(_jsonable(value), indent=2)


def render_json(names: Sequence[str], types: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An array of objects; JSON columns are embedded as JSON, not as strings."""
    json_columns = {i for i, t in enumerate(types) if t.upper() == "JSON"}
    records = []
    for row in rows:
        record: dict[str, Any] = {}
        for i, (name, value) in enumerate(zip(names, row)):
            if i in json_columns and isinstance(value, str):
                try:
                    record[name] = json.loads(value)
                    continue
                except ValueError:
                    pass
            record[name] = _jsonable(value)
        records.append(record)
    return _dumps(records, indent=2)

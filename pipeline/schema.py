"""The one definition of every warehouse table (see CONTRACT.md, "Warehouse tables").

DuckDB DDL, Arrow schemas for the transformer and the Parquet layout are all derived
from :data:`TABLES`. UUID columns are UUID in DuckDB and plain strings in Arrow and
Parquet (Spark and Trino have no portable UUID type); JSON columns are JSON in DuckDB
and strings elsewhere; decimals and UTC timestamps are standard Parquet types.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

UUID = "UUID"
JSON = "JSON"
TIMESTAMPTZ = "TIMESTAMPTZ"
DECIMAL = "DECIMAL(38,9)"

_ARROW_TYPES: dict[str, pa.DataType] = {
    UUID: pa.string(),
    JSON: pa.string(),
    "VARCHAR": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    TIMESTAMPTZ: pa.timestamp("us", tz="UTC"),
    DECIMAL: pa.decimal128(38, 9),
}


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    nullable: bool = True

    @property
    def arrow_type(self) -> pa.DataType:
        return _ARROW_TYPES[self.sql_type]


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    #: Data tables are replaced per call; bookkeeping tables are upserted by key.
    per_call: bool
    #: Hive partition column for the Parquet layout (derived, not stored in DuckDB).
    partition_by: str | None = None

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(c.name, c.arrow_type, nullable=c.nullable) for c in self.columns]
        )

    def create_sql(self) -> str:
        cols = ",\n  ".join(
            f"{c.name} {c.sql_type}{'' if c.nullable else ' NOT NULL'}" for c in self.columns
        )
        return (
            f"CREATE TABLE IF NOT EXISTS {self.name} (\n  {cols},\n"
            f"  PRIMARY KEY ({', '.join(self.primary_key)})\n)"
        )


def _cols(spec: str) -> tuple[Column, ...]:
    """Parse ``name TYPE [NOT NULL]`` lines: keeps the table list readable."""
    out = []
    for line in spec.strip().splitlines():
        parts = line.split()
        nullable = not line.rstrip().endswith("NOT NULL")
        out.append(Column(parts[0], parts[1], nullable))
    return tuple(out)


CALL_STAGES = Table(
    "call_stages",
    _cols(
        """
        call_stage_id UUID NOT NULL
        call_id UUID NOT NULL
        stage_index INTEGER NOT NULL
        created TIMESTAMPTZ
        model VARCHAR
        system_prompt VARCHAR
        temperature DOUBLE
        language_hint VARCHAR
        voice VARCHAR
        time_exceeded_message VARCHAR
        initial_token_count BIGINT
        latest_token_count BIGINT
        error_count BIGINT
        experimental_settings JSON
        initial_state JSON
        inactivity_message_count INTEGER NOT NULL
        raw JSON NOT NULL
        run_id VARCHAR NOT NULL
        extracted_at TIMESTAMPTZ NOT NULL
        """
    ),
    primary_key=("call_stage_id",),
    per_call=True,
    partition_by="created_date",
)

STAGE_INACTIVITY_MESSAGES = Table(
    "stage_inactivity_messages",
    _cols(
        """
        call_stage_id UUID NOT NULL
        call_id UUID NOT NULL
        position INTEGER NOT NULL
        duration VARCHAR
        duration_seconds DECIMAL(38,9)
        offset_seconds DECIMAL(38,9)
        message VARCHAR
        end_behavior VARCHAR NOT NULL
        """
    ),
    primary_key=("call_stage_id", "position"),
    per_call=True,
    partition_by="created_date",
)

STAGE_VOICES = Table(
    "stage_voices",
    _cols(
        """
        call_stage_id UUID NOT NULL
        call_id UUID NOT NULL
        role VARCHAR NOT NULL
        provider VARCHAR
        voice_id VARCHAR
        model VARCHAR
        speed DOUBLE
        settings JSON
        """
    ),
    primary_key=("call_stage_id", "role"),
    per_call=True,
    partition_by="created_date",
)

ETL_CALLS = Table(
    "etl_calls",
    _cols(
        """
        call_id UUID NOT NULL
        status VARCHAR NOT NULL
        stage_count INTEGER
        attempts INTEGER NOT NULL
        last_run_id VARCHAR
        last_attempt_at TIMESTAMPTZ
        last_success_at TIMESTAMPTZ
        error VARCHAR
        """
    ),
    primary_key=("call_id",),
    per_call=False,
)

ETL_RUNS = Table(
    "etl_runs",
    _cols(
        """
        run_id VARCHAR NOT NULL
        started_at TIMESTAMPTZ NOT NULL
        finished_at TIMESTAMPTZ
        status VARCHAR NOT NULL
        calls_requested BIGINT
        calls_loaded BIGINT
        calls_not_found BIGINT
        calls_failed BIGINT
        stages_loaded BIGINT
        http_requests BIGINT
        http_retries BIGINT
        tool_version VARCHAR
        options JSON
        """
    ),
    primary_key=("run_id",),
    per_call=False,
)

CALLS = Table(
    "calls",
    _cols(
        """
        call_id UUID NOT NULL
        created TIMESTAMPTZ
        joined TIMESTAMPTZ
        ended TIMESTAMPTZ
        end_reason VARCHAR
        billed_duration VARCHAR
        billed_duration_seconds DECIMAL(38,9)
        agent_id VARCHAR
        metadata JSON
        deleted_at TIMESTAMPTZ
        raw JSON NOT NULL
        run_id VARCHAR NOT NULL
        extracted_at TIMESTAMPTZ NOT NULL
        """
    ),
    primary_key=("call_id",),
    per_call=False,
)

ETL_STATE = Table(
    "etl_state",
    _cols(
        """
        key VARCHAR NOT NULL
        value VARCHAR
        updated_at TIMESTAMPTZ NOT NULL
        """
    ),
    primary_key=("key",),
    per_call=False,
)

#: The three tables a call's stages are flattened into, replaced as a unit per call.
DATA_TABLES: tuple[Table, ...] = (CALL_STAGES, STAGE_INACTIVITY_MESSAGES, STAGE_VOICES)
BOOKKEEPING_TABLES: tuple[Table, ...] = (ETL_CALLS, ETL_RUNS)
#: Call discovery (`run --since/--incremental`): listed calls and the watermark.
DISCOVERY_TABLES: tuple[Table, ...] = (CALLS, ETL_STATE)
TABLES: dict[str, Table] = {t.name: t for t in DATA_TABLES + BOOKKEEPING_TABLES + DISCOVERY_TABLES}

CALL_STATUSES = ("loaded", "not_found", "failed")

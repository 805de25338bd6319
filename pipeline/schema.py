"""The one definition of every warehouse table: names, types, keys and descriptions.

DuckDB DDL, Arrow schemas for the transformer and the Parquet layout are all derived
from :data:`TABLES`. UUID columns are UUID in DuckDB and plain strings in Arrow and
Parquet (Spark and Trino have no portable UUID type); JSON columns are JSON in DuckDB
and strings elsewhere; decimals and UTC timestamps are standard Parquet types.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

UUID = "UUID"
JSON = "JSON"
TIMESTAMPTZ = "TIMESTAMPTZ"
DECIMAL = "DECIMAL(38,9)"



@functools.cache
def _arrow_types() -> dict[str, pa.DataType]:
    """Arrow's type of each SQL type (pyarrow loaded on first use: replay's reader never loads it)."""
    import pyarrow as pa

    return {
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
    #: One line for `ultravox-stages tables`: what the column means.
    description: str = ""

    @property
    def arrow_type(self) -> pa.DataType:
        return _arrow_types()[self.sql_type]


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    #: Data tables are replaced per call; bookkeeping tables are upserted by key.
    per_call: bool
    #: Hive partition column for the Parquet layout (derived, not stored in DuckDB).
    partition_by: str | None = None
    #: One line for `ultravox-stages tables`: what a row is.
    description: str = ""

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def arrow_schema(self) -> pa.Schema:
        import pyarrow as pa

        return pa.schema(
            [pa.field(c.name, c.arrow_type, nullable=c.nullable) for c in self.columns]
        )

    def create_sql(self) -> str:
        """DDL. The per-call tables declare no PRIMARY KEY: the loader keeps them unique
        (a call replaced as a unit, a stage id held by one call), and DuckDB's index of
        one would hold every stored key in memory, growing with the warehouse."""
        cols = [f"{c.name} {c.sql_type}{'' if c.nullable else ' NOT NULL'}" for c in self.columns]
        if not self.per_call:
            cols.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n  " + ",\n  ".join(cols) + "\n)"


def _cols(spec: str) -> tuple[Column, ...]:
    """Parse ``name TYPE [NOT NULL] -- description`` lines: keeps the table list readable."""
    out = []
    for line in spec.strip().splitlines():
        definition, _, description = line.partition(" -- ")
        parts = definition.split()
        nullable = not definition.rstrip().endswith("NOT NULL")
        out.append(Column(parts[0], parts[1], nullable, description.strip()))
    return tuple(out)


CALL_STAGES = Table(
    "call_stages",
    _cols(
        """
        call_stage_id UUID NOT NULL -- the stage's id (callStageId)
        call_id UUID NOT NULL -- the call the stage belongs to
        stage_index INTEGER NOT NULL -- 0-based position of the stage in its call, in the order the API lists them
        created TIMESTAMPTZ -- when the stage started (UTC)
        model VARCHAR -- the LLM that served the stage
        system_prompt VARCHAR -- the system prompt of the stage
        temperature DOUBLE -- sampling temperature of the model
        language_hint VARCHAR -- BCP47 language code given to guide speech recognition
        voice VARCHAR -- the Ultravox voice (name or id) the stage speaks with, when one is set
        time_exceeded_message VARCHAR -- what the agent says when the call reaches its maximum duration
        initial_token_count BIGINT -- prompt length in tokens when the stage started (NULL when unknown)
        latest_token_count BIGINT -- latest prompt length in tokens, updated as the stage goes on (NULL when unknown)
        error_count BIGINT -- number of errors during the stage
        experimental_settings JSON -- experimental settings of the stage, as received
        initial_state JSON -- the tool-readable initial state of the stage, as received
        inactivity_message_count INTEGER NOT NULL -- number of inactivity messages (rows in stage_inactivity_messages)
        raw JSON NOT NULL -- the stage exactly as received, secrets redacted, unknown fields kept
        run_id VARCHAR NOT NULL -- the run that last wrote this stage (etl_runs.run_id)
        extracted_at TIMESTAMPTZ NOT NULL -- when that run fetched the stage (UTC)
        """
    ),
    primary_key=("call_stage_id",),
    per_call=True,
    partition_by="created_date",
    description="one row per stage of a call",
)

STAGE_INACTIVITY_MESSAGES = Table(
    "stage_inactivity_messages",
    _cols(
        """
        call_stage_id UUID NOT NULL -- the stage the message belongs to
        call_id UUID NOT NULL -- the call of that stage
        position INTEGER NOT NULL -- 0-based order of the message within the stage
        duration VARCHAR -- the protobuf Duration string as received, e.g. "1.5s"
        duration_seconds DECIMAL(38,9) -- exact seconds of duration: the wait after the previous message (the last activity for the first)
        offset_seconds DECIMAL(38,9) -- cumulative seconds after the last activity when this message fires
        message VARCHAR -- the text spoken when the user stays silent
        end_behavior VARCHAR NOT NULL -- what happens after the message; END_BEHAVIOR_UNSPECIFIED when the API omits it
        """
    ),
    primary_key=("call_stage_id", "position"),
    per_call=True,
    partition_by="created_date",
    description="one row per inactivity message of a stage",
)

STAGE_VOICES = Table(
    "stage_voices",
    _cols(
        """
        call_stage_id UUID NOT NULL -- the stage using the voice
        call_id UUID NOT NULL -- the call of that stage
        role VARCHAR NOT NULL -- external (the stage's externalVoice) or override (its voiceOverrides)
        provider VARCHAR -- the API's provider key (elevenLabs, cartesia, lmnt, google, inworld, respeecher, generic, or a new one as-is)
        voice_id VARCHAR -- the provider's voiceId
        model VARCHAR -- the provider's TTS model (model or modelId)
        speed DOUBLE -- speaking speed (speed or speakingRate)
        settings JSON -- the provider object as received, credentials redacted
        """
    ),
    primary_key=("call_stage_id", "role"),
    per_call=True,
    partition_by="created_date",
    description="one row per external voice or voice override of a stage",
)

ETL_CALLS = Table(
    "etl_calls",
    _cols(
        """
        call_id UUID NOT NULL -- a call ever requested
        status VARCHAR NOT NULL -- loaded, not_found or failed (failed calls are retried by the next run)
        stage_count INTEGER -- stages of the call as of its last successful fetch
        attempts INTEGER NOT NULL -- how many runs have fetched the call
        last_run_id VARCHAR -- the run that fetched the call last
        last_attempt_at TIMESTAMPTZ -- when the call was last fetched (UTC)
        last_success_at TIMESTAMPTZ -- when the call was last loaded or found missing (UTC)
        error VARCHAR -- short reason of the last failure, no secrets
        """
    ),
    primary_key=("call_id",),
    per_call=False,
    description="one row per call ever requested: its load status",
)

ETL_RUNS = Table(
    "etl_runs",
    _cols(
        """
        run_id VARCHAR NOT NULL -- sortable run id: start time and a random suffix
        started_at TIMESTAMPTZ NOT NULL -- when the run started (UTC)
        finished_at TIMESTAMPTZ -- when the run ended (UTC); NULL while running or after a crash
        status VARCHAR NOT NULL -- running, succeeded, partial, auth_failed, unreachable, interrupted or crashed
        calls_requested BIGINT -- calls the run set out to fetch
        calls_loaded BIGINT -- calls loaded
        calls_not_found BIGINT -- calls the API answered 404 for
        calls_failed BIGINT -- calls that failed (retried by the next run)
        stages_loaded BIGINT -- stages written
        http_requests BIGINT -- HTTP requests sent
        http_retries BIGINT -- HTTP requests retried
        tool_version VARCHAR -- ultravox-stages version that ran
        options JSON -- the run's settings, no secrets
        """
    ),
    primary_key=("run_id",),
    per_call=False,
    description="one row per run of the tool",
)

CALLS = Table(
    "calls",
    _cols(
        """
        call_id UUID NOT NULL -- a call listed by --since/--incremental (GET /api/calls)
        created TIMESTAMPTZ -- when the call was created (UTC)
        joined TIMESTAMPTZ -- when the user joined (UTC)
        ended TIMESTAMPTZ -- when the call ended (UTC)
        end_reason VARCHAR -- why the call ended, as the API says (e.g. hangup, timeout)
        billed_duration VARCHAR -- billed duration as received (protobuf Duration string)
        billed_duration_seconds DECIMAL(38,9) -- exact seconds of billed_duration
        agent_id VARCHAR -- the agent the call ran under
        metadata JSON -- the call's metadata object, as received
        deleted_at TIMESTAMPTZ -- when the API first reported the call deleted (UTC); NULL if it was not
        raw JSON NOT NULL -- the listed call exactly as received, secrets redacted
        run_id VARCHAR NOT NULL -- the run that last listed the call
        extracted_at TIMESTAMPTZ NOT NULL -- when that run listed the call (UTC)
        """
    ),
    primary_key=("call_id",),
    per_call=False,
    description="one row per call listed from GET /api/calls",
)

ETL_STATE = Table(
    "etl_state",
    _cols(
        """
        key VARCHAR NOT NULL -- state name; watermark_created is the incremental watermark
        value VARCHAR -- the state's value as text
        updated_at TIMESTAMPTZ NOT NULL -- when the value last changed (UTC)
        """
    ),
    primary_key=("key",),
    per_call=False,
    description="key/value state kept between runs",
)

#: The three tables a call's stages are flattened into, replaced as a unit per call.
DATA_TABLES: tuple[Table, ...] = (CALL_STAGES, STAGE_INACTIVITY_MESSAGES, STAGE_VOICES)
BOOKKEEPING_TABLES: tuple[Table, ...] = (ETL_CALLS, ETL_RUNS)
#: Call discovery (`run --since/--incremental`): listed calls and the watermark.
DISCOVERY_TABLES: tuple[Table, ...] = (CALLS, ETL_STATE)
TABLES: dict[str, Table] = {t.name: t for t in DATA_TABLES + BOOKKEEPING_TABLES + DISCOVERY_TABLES}

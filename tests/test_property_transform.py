"""Property test: stages generated from the OpenAPI schema always transform cleanly."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from pipeline.transform import transform_calls

SPEC = Path(__file__).resolve().parent / "fixtures" / "ultravox_stages_openapi.yaml"
#: Drawing from the schema is what costs; the examples are the same on every run.
EXAMPLES = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _to_json_schema(node):
    """OpenAPI 3.0 → JSON Schema: `nullable`, component refs, enum `format`s."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref":
            out[key] = value.replace("#/components/schemas/", "#/$defs/")
        elif key in ("readOnly", "example", "description"):
            continue
        elif key == "format" and value in ("enum", "float", "double", "int32", "uri"):
            continue
        else:
            out[key] = _to_json_schema(value)
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _stage_schema():
    spec = yaml.safe_load(SPEC.read_text())
    defs = _to_json_schema(spec["components"]["schemas"])
    stage = copy.deepcopy(defs["CallStage"])
    # The transformer validates ids/timestamps itself; keep the generator on valid ones
    # for those and let everything else roam free.
    for name in ("callId", "callStageId", "created"):
        stage["properties"].pop(name, None)
    stage["required"] = [r for r in stage["required"] if r not in ("callId", "callStageId", "created")]
    stage["$defs"] = defs
    return stage


STAGES = from_schema(_stage_schema())


@pytest.mark.filterwarnings("ignore")
@EXAMPLES
@given(st.lists(STAGES, max_size=4), st.uuids(version=4))
def test_schema_generated_stages_transform_with_matching_row_counts(stages, call_uuid):
    call_id = str(call_uuid)
    for i, stage in enumerate(stages):
        stage["callId"] = call_id
        stage["callStageId"] = str(uuid.UUID(int=(call_uuid.int + i + 1) % (1 << 128)))
        stage["created"] = "2026-11-20T10:00:00.123456Z"
    result = transform_calls([(call_id, stages)], "run", datetime.now(timezone.utc))
    too_big = [s for s in stages for f in ("errorCount", "initialTokenCount", "latestTokenCount")
               if isinstance(s.get(f), int) and not -(2**63) <= s[f] < 2**63]
    if too_big:  # the schema has no bounds, BIGINT does: that call fails cleanly
        assert "out of the BIGINT range" in result.failures[call_id]
        assert result.tables["call_stages"].num_rows == 0
        return
    assert result.failures == {}, result.failures
    tables = result.tables
    assert tables["call_stages"].num_rows == len(stages)
    assert tables["stage_inactivity_messages"].num_rows == sum(len(s.get("inactivityMessages") or []) for s in stages)
    voices = sum(1 for s in stages for f in ("externalVoice", "voiceOverrides") if s.get(f))
    assert tables["stage_voices"].num_rows == voices


@pytest.mark.filterwarnings("ignore")
@EXAMPLES
@given(st.lists(STAGES, max_size=4), st.uuids(version=4))
def test_stages_as_received_bytes_give_the_same_tables_as_objects(stages, call_uuid):
    """`replay` hands stages over as msgspec.Raw bytes, the extractor as objects."""
    call_id = str(call_uuid)
    for i, stage in enumerate(stages):
        stage.update(callId=call_id, callStageId=str(uuid.UUID(int=(call_uuid.int + i + 1) % (1 << 128))),
                     created="2026-11-20T10:00:00.123456Z")
    now = datetime.now(timezone.utc)
    as_bytes = [msgspec.Raw(json.dumps(s, ensure_ascii=False, separators=(",", ":")).encode()) for s in stages]
    from_objects = transform_calls([(call_id, stages)], "run", now)
    from_bytes = transform_calls([(call_id, as_bytes)], "run", now)
    assert from_bytes.failures.keys() == from_objects.failures.keys()
    for name, table in from_objects.tables.items():
        assert from_bytes.tables[name].equals(table), name


@EXAMPLES
@given(st.lists(st.one_of(st.none(), st.text(max_size=300)), min_size=1, max_size=12), st.booleans())
def test_received_prompts_are_the_texts_sent_and_their_stages_keep_their_bytes(prompts, ensure_ascii):
    """Any text, escaped or not (a received prompt is unescaped from its token, never through a str)."""
    now = datetime.now(timezone.utc)
    calls, sent = [], {}
    for n, prompt in enumerate(prompts):
        call_id = str(uuid.UUID(int=n + 1))
        stage = {"callId": call_id, "callStageId": str(uuid.UUID(int=1000 + n)), "created": "2026-11-20T10:00:00Z",
                 "systemPrompt": prompt, "externalVoice": {"lmnt": {"voiceId": "lily"}}}
        body = json.dumps(stage, ensure_ascii=ensure_ascii, separators=(",", ":")).encode()
        calls.append((call_id, [msgspec.Raw(body)]))
        sent[call_id] = (prompt, body)
    result = transform_calls(calls, "run", now)
    assert result.failures == {}
    table = result.tables["call_stages"].to_pydict()
    for call_id, prompt, raw in zip(table["call_id"], table["system_prompt"], table["raw"], strict=True):
        assert (prompt, raw.encode()) == sent[call_id]

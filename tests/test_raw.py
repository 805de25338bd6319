"""The raw landing zone: healing a killed run's file, hostile lines, writer safety."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import textwrap
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conftest import invoke_cli
from pipeline import raw as raw_module
from pipeline.raw import BadLine, RawWriter, heal_partial_files, read_landing_zone
from pipeline.records import CallFetch
from pipeline.redact import MAX_NESTING

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-live-raw-5150"
WHEN = datetime(2026, 11, 21, tzinfo=timezone.utc)


def uid(n: int) -> str:
    return str(uuid.UUID(int=n))


def noise(n: int) -> str:
    """~1 KB that compresses poorly (the cut points must fall inside many lines), some non-ASCII."""
    return "é".join(hashlib.sha256(f"{n}/{k}".encode()).hexdigest() for k in range(16))


def stage(call_id: str, n: int, **fields: Any) -> dict[str, Any]:
    return {
        "callId": call_id, "callStageId": uid(100_000 + n), "created": "2026-11-20T10:00:00Z",
        "systemPrompt": f"Prompt {n} " + noise(n), "temperature": 0.4, "initialState": {},
        "externalVoice": {"generic": {"url": "https://tts.example", "headers": {"Authorization": SECRET}}},
        **fields,
    }


def fetch(n: int, **fields: Any) -> CallFetch:
    call_id = uid(n)
    page = {"results": [stage(call_id, n, **fields)], "next": None, "total": 1}
    return CallFetch(call_id, "loaded", pages=[page], page_urls=[f"https://api.ultravox.ai/api/calls/{call_id}/stages"],
                     fetched_at=WHEN)


def read_all(raw_dir: Path) -> tuple[list[CallFetch], list[BadLine]]:
    bad: list[BadLine] = []
    return list(read_landing_zone(raw_dir, bad.append)), bad


# --------------------------------------------------------------------------- kill -9


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_raw import fetch
    from pipeline.raw import RawWriter
    writer = RawWriter(Path({raw!r}), "killed-run")
    sizes = []
    for batch in range(6):
        writer.write([fetch(batch * 10 + i) for i in range(1 + batch)])
        sizes.append(os.path.getsize(writer.partial_path))
    print(" ".join(map(str, sizes)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.fixture(scope="module")
def killed_partial(tmp_path_factory) -> tuple[bytes, list[int]]:
    """The bytes of a .partial left by a writer killed with SIGKILL, and the file size
    after each of its batches."""
    raw_dir = tmp_path_factory.mktemp("killed")
    script = KILLED_WRITER.format(root=str(ROOT), tests=str(ROOT / "tests"), raw=str(raw_dir))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    [partial] = raw_dir.glob(".*.partial")
    return partial.read_bytes(), [int(x) for x in proc.stdout.split()]


def complete_lines(compressed: bytes) -> list[bytes]:
    """What a reader gets from a cut gzip stream: the lines up to the last newline."""
    try:
        data = zlib.decompressobj(wbits=31).decompress(compressed)
    except zlib.error:
        data = b""
    return data[: data.rfind(b"\n") + 1].splitlines(keepends=True)


def test_killed_writer_left_a_partial_that_is_cut(killed_partial) -> None:
    data, sizes = killed_partial
    assert len(sizes) == 6 and sizes[-1] == len(data) > 97 * 100  # enough cut points below
    with pytest.raises(EOFError):
        gzip.decompress(data)  # never closed: no gzip trailer
    assert len(complete_lines(data)) == sum(range(1, 7))


def test_healing_keeps_every_complete_line_at_any_cut(tmp_path, killed_partial) -> None:
    data, sizes = killed_partial
    everything = complete_lines(data)
    lines_per_batch = [sum(range(1, b + 2)) for b in range(6)]
    for cut in [*range(0, len(data), 97), len(data) - 1, len(data)]:
        raw_dir = tmp_path / f"cut{cut}"
        raw_dir.mkdir()
        (raw_dir / ".killed-run.jsonl.gz.partial").write_bytes(data[:cut])
        warnings: list[str] = []
        RawWriter(raw_dir, "next-run", warn=warnings.append).close()
        assert not list(raw_dir.glob(".*")), cut  # no partial, temp or own file left
        expected = complete_lines(data[:cut])
        # Every batch fsynced before the cut is there, in full.
        flushed = max([n for n, size in zip(lines_per_batch, sizes) if size <= cut], default=0)
        assert len(expected) >= flushed and expected == everything[: len(expected)]
        healed = raw_dir / "killed-run.jsonl.gz"
        if expected:
            text = gzip.decompress(healed.read_bytes())
            assert text.splitlines(keepends=True) == expected and SECRET.encode() not in text, cut
        else:
            assert not healed.exists()
        assert len(warnings) == 1 and ".killed-run.jsonl.gz.partial" in warnings[0]
        assert f"{len(expected)} complete line" in warnings[0] or (not expected and "no complete line" in warnings[0])
        fetches, bad = read_all(raw_dir)
        assert bad == [] and len(fetches) == len(expected), cut


def test_replay_of_a_healed_folder_exits_0(tmp_path, killed_partial) -> None:
    data, sizes = killed_partial
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    (raw_dir / ".killed-run.jsonl.gz.partial").write_bytes(data[: sizes[3] + 300])
    RawWriter(raw_dir, "next-run").close()
    res = invoke_cli("replay", str(raw_dir), "--output", str(tmp_path / "out.duckdb"), key=None)
    assert res.code == 0, res.stderr


def test_a_live_writers_partial_is_left_alone(tmp_path) -> None:
    live = RawWriter(tmp_path, "live-run")
    live.write([fetch(1)])
    other = RawWriter(tmp_path, "other-run")
    assert live.partial_path.exists() and other.warnings == []
    live.write([fetch(2)])
    live.close()
    other.close()
    fetches, bad = read_all(tmp_path)
    assert [f.call_id for f in fetches] == [uid(1), uid(2)] and bad == []


def test_several_gzip_members_and_an_interrupted_heal(tmp_path) -> None:
    first = gzip.compress(b'{"a":1}\n{"b":2}\n')
    second = gzip.compress(b'{"c":3}\n{"d":')
    (tmp_path / ".r.jsonl.gz.partial").write_bytes(first + second[:-8])  # second member lacks its trailer
    (tmp_path / ".r.jsonl.gz.healing").write_bytes(b"left by a heal that was killed")
    [message] = heal_partial_files(tmp_path)
    assert "3 complete line(s)" in message and "dropped an incomplete last line (5 bytes)" in message
    assert gzip.decompress((tmp_path / "r.jsonl.gz").read_bytes()) == b'{"a":1}\n{"b":2}\n{"c":3}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl.gz"]


def test_garbage_after_good_data_is_dropped_and_reported(tmp_path) -> None:
    good = zlib.compressobj(wbits=31)
    data = good.compress(b'{"a":1}\n') + good.flush(zlib.Z_SYNC_FLUSH)
    (tmp_path / ".g.jsonl.gz.partial").write_bytes(data + b"\xff" * 64)
    [message] = heal_partial_files(tmp_path)
    assert "1 complete line(s)" in message and "unreadable" in message
    assert gzip.decompress((tmp_path / "g.jsonl.gz").read_bytes()) == b'{"a":1}\n'


# --------------------------------------------------------------------------- writer


def test_lone_surrogates_never_break_a_batch(tmp_path) -> None:
    odd = json.loads('"half \\udc9f here"')
    writer = RawWriter(tmp_path, "run")
    assert writer.write([fetch(1, languageHint=odd, **{odd: {"generic": odd}}), fetch(2)]) == {}
    writer.close()
    text = gzip.decompress((tmp_path / "run.jsonl.gz").read_bytes()).decode("utf-8")
    assert text.count("half \ufffd here") == 3 and SECRET not in text  # a value, a key and its value
    fetches, bad = read_all(tmp_path)
    assert len(fetches) == 2 and bad == []


def test_a_page_that_cannot_be_redacted_is_not_landed(tmp_path) -> None:
    deep: Any = {"headers": {"Authorization": SECRET}}
    for _ in range(MAX_NESTING + 1):
        deep = [deep]
    bad_call = fetch(2)
    bad_call.pages.append({"results": [{"voiceOverrides": deep}], "next": None})
    bad_call.page_urls.append(bad_call.page_urls[0] + "?cursor=2")
    bad_call.pages[0]["next"] = "more"
    not_json = fetch(5, initialState={"x": object()})
    writer = RawWriter(tmp_path, "run")
    not_landed = writer.write([fetch(1), bad_call, fetch(3), CallFetch(uid(4), "not_found", fetched_at=WHEN), not_json])
    writer.close()
    data = gzip.decompress((tmp_path / "run.jsonl.gz").read_bytes())
    assert SECRET not in data.decode()
    assert [json.loads(x)["call_id"] for x in data.splitlines()] == [uid(1), uid(3), uid(4)]
    assert not_landed == {
        uid(2): f"a page is nested more than {MAX_NESTING} levels deep; cannot be redacted",
        uid(5): "a page cannot be written as JSON (TypeError)",
    }


@pytest.mark.parametrize("voice", [
    [{"generic": {"headers": {"Authorization": SECRET}}}],
    f"Authorization: {SECRET}",
    {"futureTts": {"Request": {"HEADERS": {"X": SECRET}}, "clientSecretValue": SECRET}},
])
def test_malformed_voices_land_redacted(tmp_path, voice: Any) -> None:
    writer = RawWriter(tmp_path, "run")
    writer.write([fetch(1, voiceOverrides=voice)])
    writer.close()
    assert SECRET not in gzip.decompress((tmp_path / "run.jsonl.gz").read_bytes()).decode()


# --------------------------------------------------------------------------- reading hostile lines


def line(n: int, **fields: Any) -> bytes:
    call_id = uid(n)
    record = {"call_id": call_id, "status": 200, "fetched_at": "2026-11-21T00:00:00Z",
              "url": f"https://api.ultravox.ai/api/calls/{call_id}/stages",
              "page": {"results": [stage(call_id, n, **fields)], "next": None}}
    return json.dumps(record).encode() + b"\n"


def test_deep_and_surrogate_lines_in_replay_input(tmp_path) -> None:
    deep = b'{"call_id":"' + uid(9).encode() + b'","status":200,"page":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    escaped = line(2).replace(b'"Prompt 2', b'"Prompt \\ud800 2')
    raw_bytes = line(3).replace(b"Prompt 3", "Prompt \udc00 3".encode("utf-8", "surrogatepass"))
    (tmp_path / "a.jsonl").write_bytes(line(1) + deep + escaped + raw_bytes + b"{not json\n")
    fetches, bad = read_all(tmp_path)
    assert [f.call_id for f in fetches] == [uid(1), uid(2), uid(3)]
    assert fetches[1].pages[0]["results"][0]["systemPrompt"].startswith("Prompt \ufffd 2")
    assert fetches[2].pages[0]["results"][0]["systemPrompt"].startswith("Prompt \ufffd 3")
    assert [b.where.rsplit(":", 1)[1] for b in bad] == ["2", "5"]
    assert "deeper than" in bad[0].reason


def test_overlong_line_is_a_bad_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(raw_module, "MAX_LINE_BYTES", 4_000)
    monkeypatch.setattr(raw_module, "_CHUNK", 1_000)
    long_line = line(2, systemPrompt="x" * 20_000)
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as out:
        out.write(line(1) + long_line + line(3) + long_line.rstrip(b"\n"))
    fetches, bad = read_all(tmp_path)
    assert [f.call_id for f in fetches] == [uid(1), uid(3)]
    assert [(b.where.rsplit(":", 1)[1], b.reason) for b in bad] == [
        ("2", "line longer than 4000 bytes"), ("4", "line longer than 4000 bytes")
    ]


# --------------------------------------------------------------------------- replayed stages are bytes


def _replayed_tables(tmp_path: Path, data: bytes):
    from pipeline.transform import transform_calls

    (tmp_path / "a.jsonl").write_bytes(data)
    fetches, bad = read_all(tmp_path)
    return transform_calls([(f.call_id, f.stages()) for f in fetches], "run", WHEN), bad


def test_replay_keeps_each_stages_bytes_as_received_for_raw(tmp_path) -> None:
    received = (b'{"callId": "' + uid(1).encode() + b'", "callStageId": "' + uid(5).encode()
                + b'", "created": "2026-11-20T10:00:00Z",  "temperature": 2.50, "futureField": {"a": [1e2]}}')
    record = b'{"call_id":"' + uid(1).encode() + b'","status":200,"url":"u","page":{"results":[' + received + b"]}}\n"
    result, bad = _replayed_tables(tmp_path, record)
    assert bad == [] and result.failures == {}
    [row] = result.tables["call_stages"].to_pylist()
    assert row["raw"] == received.decode() and row["temperature"] == 2.5


@pytest.mark.parametrize("voice_key", ["externalVoice", "externalVoic\\u0065", "EXTERNAL_VOICE"])
def test_replayed_secrets_are_redacted_even_when_landed_unredacted(tmp_path, voice_key: str) -> None:
    """A landing zone written by hand (or by an older tool) is not trusted to be redacted."""
    text = json.dumps(json.loads(line(1)), ensure_ascii=False).replace('"externalVoice"', f'"{voice_key}"') + "\n"
    assert SECRET in text and ("\\u" in text) == ("\\u" in voice_key)
    result, bad = _replayed_tables(tmp_path, text.encode())
    assert bad == [] and result.failures == {}
    for name, table in result.tables.items():
        assert SECRET not in json.dumps(table.to_pylist(), default=str), name
    [row] = result.tables["call_stages"].to_pylist()
    assert json.loads(row["raw"])["callStageId"] == uid(100_001)


def test_replayed_stage_with_a_lone_surrogate_escape_is_re_encoded(tmp_path) -> None:
    escaped = line(2).replace(b'"temperature": 0.4', b'"temperature": 0.4, "note": "a\\udbffb"')
    result, bad = _replayed_tables(tmp_path, escaped)
    assert bad == [] and result.failures == {}
    [raw] = result.tables["call_stages"]["raw"].to_pylist()
    assert json.loads(raw)["note"] == "a\ufffdb"


def test_replayed_stage_with_an_infinite_number_fails_its_call_only(tmp_path) -> None:
    data = line(1) + line(2).replace(b'"temperature": 0.4', b'"temperature": 1e400') + line(3)
    result, bad = _replayed_tables(tmp_path, data)
    assert bad == [] and list(result.failures) == [uid(2)]
    assert "NaN or Infinity" in result.failures[uid(2)]
    assert result.stage_counts == {uid(1): 1, uid(3): 1}


def test_text_that_is_not_utf8_anywhere_in_a_line_is_a_bad_line(tmp_path) -> None:
    broken = line(2).replace(b'"temperature": 0.4', b'"temperature": 0.4, "unknownField": "\xff\xfe"')
    result, bad = _replayed_tables(tmp_path, line(1) + broken)
    assert list(result.stage_counts) == [uid(1)]
    assert [b.where.rsplit(":", 1)[1] for b in bad] == ["2"] and "UTF-8" in bad[0].reason


def test_pages_whose_stages_are_bytes_land_redacted_and_replay_the_same(tmp_path) -> None:
    objects = fetch(1)
    as_bytes = fetch(1)
    as_bytes.pages = [{**page, "results": [msgspec.Raw(json.dumps(s).encode()) for s in page["results"]]}
                      for page in as_bytes.pages]
    for name, given in (("objects", objects), ("bytes", as_bytes)):
        writer = RawWriter(tmp_path / name, "run")
        assert writer.write([given]) == {}
        writer.close()
    landed = {name: gzip.decompress((tmp_path / name / "run.jsonl.gz").read_bytes()) for name in ("objects", "bytes")}
    assert SECRET.encode() not in landed["bytes"]
    assert landed["bytes"] == landed["objects"]


@pytest.mark.parametrize("damage", ["cut", "garbage", "flipped"])
def test_a_damaged_gzip_file_keeps_its_lines_before_the_damage_and_the_next_file_loads(tmp_path: Path, damage: str) -> None:
    from pipeline.sandbox import SyntheticData, write_landing_zone

    data = SyntheticData(n_calls=60, seed=4)
    calls = [(c, data.stages_for(c)) for c in data.call_ids]
    write_landing_zone(tmp_path / "a", calls[:50], run_id="a")
    write_landing_zone(tmp_path / "b", calls[50:], run_id="b")
    body = (tmp_path / "a" / "a.jsonl.gz").read_bytes()
    middle = len(body) // 2
    damaged = {"cut": body[:middle], "garbage": body + b"\x1f\x8b\x08garbage" * 50,
               "flipped": body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]}[damage]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl.gz").write_bytes(damaged)
    (raw / "b.jsonl.gz").write_bytes((tmp_path / "b" / "b.jsonl.gz").read_bytes())
    bad: list[BadLine] = []
    loaded = {fetch.call_id for fetch in read_landing_zone(raw, bad.append)}
    assert {c for c, _ in calls[50:]} <= loaded  # the next file is read whole
    assert any("a.jsonl.gz" in b.where and "unreadable from here on" in b.reason for b in bad) or damage == "flipped" and bad
    if damage == "garbage":
        assert loaded == {c for c, _ in calls}
    elif damage == "cut":
        assert 0 < len(loaded & {c for c, _ in calls[:50]}) < 50


def test_a_long_line_is_checked_for_utf8_a_piece_at_a_time(tmp_path, monkeypatch) -> None:
    """Lines of 1 MiB and more are decoded in pieces (not as one str): a character split
    between two pieces is fine, a bad byte past the first piece is still found."""
    monkeypatch.setattr(raw_module, "_DECODE_BELOW_BYTES", 1_000)
    # Two-byte characters straddle every piece boundary (json.dumps would escape them).
    split = line(1, systemPrompt="PROMPT").replace(b"PROMPT", "é".encode() * 3_000)
    broken = line(2, systemPrompt="x" * 3_000).replace(b"x" * 10 + b'"', b"x" * 9 + b'\xff"')
    result, bad = _replayed_tables(tmp_path, split + broken + line(3))
    assert sorted(result.stage_counts) == [uid(1), uid(3)]
    assert [b.where.rsplit(":", 1)[1] for b in bad] == ["2"] and "UTF-8" in bad[0].reason
    prompt, = [p for p in result.tables["call_stages"]["system_prompt"].to_pylist() if p.startswith("é")]
    assert prompt == "é" * 3_000

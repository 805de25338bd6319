import pytest

from pipeline.calls_input import normalize_call_id, read_call_ids
from pipeline.errors import InputError

A = "6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
B = "00000000-0000-4000-8000-000000000001"


@pytest.mark.parametrize(
    "text", [A, A.upper(), "{" + A + "}", "  " + A + "  ", "{" + A.upper() + "}"]
)
def test_normalises_to_canonical_lower_case(text):
    assert normalize_call_id(text) == A


@pytest.mark.parametrize(
    "text", ["", "not-a-uuid", A[:-1], A + "0", "{" + A, A.replace("-", ""), "urn:uuid:" + A, A + "}"]
)
def test_rejects_malformed(text):
    assert normalize_call_id(text) is None


def test_file_with_bom_crlf_comments_duplicates(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_bytes(
        ("\ufeff# exported from the dashboard\r\n" f"{A}\r\n\r\n  {B.upper()}  # trailing comment\r\n{{{A}}}\r\n").encode()
    )
    ids = read_call_ids(str(path), [])
    assert ids.ids == [A, B]
    assert ids.duplicates == 1


def test_bad_lines_are_all_listed_with_file_and_line(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text(f"{A}\nnope\n{B}\n12345\n")
    with pytest.raises(InputError) as err:
        read_call_ids(str(path), [])
    msg = str(err.value)
    assert f"{path}:2" in msg and f"{path}:4" in msg and f"{path}:1" not in msg
    assert err.value.exit_code == 2


def test_call_id_flags_are_validated_too():
    with pytest.raises(InputError, match="--call-id:2"):
        read_call_ids(None, [A, "bad"])


def test_unreadable_file(tmp_path):
    with pytest.raises(InputError, match="cannot read calls file"):
        read_call_ids(str(tmp_path / "missing.txt"), [])


def test_non_utf8_file(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not UTF-8"):
        read_call_ids(str(path), [])


def test_large_file_streams(tmp_path):
    import uuid

    path = tmp_path / "ids.txt"
    ids = [str(uuid.UUID(int=i)) for i in range(200_000)]
    path.write_text("\n".join(ids) + "\n")
    assert read_call_ids(str(path), []).ids == ids


# --------------------------------------------------------------------------- wrong and huge files

import io  # noqa: E402
import sys  # noqa: E402
import tracemalloc  # noqa: E402

from pipeline import calls_input  # noqa: E402


def test_dev_zero_is_refused_in_bounded_memory():
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as err:
            read_call_ids("/dev/zero", [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"/dev/zero:1: line longer than {calls_input.MAX_LINE_CHARS} characters" in str(err.value)
    assert err.value.exit_code == 2
    assert peak < 1_000_000


def test_a_gigantic_line_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "dump.json"
    with path.open("w") as fh:
        fh.write(A + "\n")
        fh.write('{"calls": [' + '"x", ' * 2_000_000)  # ~10 MB, no line end
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"dump.json:2: line longer than"):
            read_call_ids(str(path), [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_a_long_comment_within_the_limit_is_fine(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text(f"{A}  # {'x' * (calls_input.MAX_LINE_CHARS - 50)}\n")
    assert read_call_ids(str(path), []).ids == [A]


def test_too_many_lines_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(calls_input, "MAX_LINES", 100)
    path = tmp_path / "ids.txt"
    path.write_text("\n" * 101)
    with pytest.raises(InputError, match="more than 100 lines"):
        read_call_ids(str(path), [])
    path.write_text("\n" * 100)
    assert read_call_ids(str(path), []).ids == []


def test_too_many_ids_is_refused_and_says_the_limit(tmp_path, monkeypatch):
    import uuid

    monkeypatch.setattr(calls_input, "MAX_CALL_IDS", 5)
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(str(uuid.UUID(int=i)) for i in range(6)) + "\n")
    with pytest.raises(InputError, match="more than 5 call IDs"):
        read_call_ids(str(path), [])
    path.write_text("\n".join([str(uuid.UUID(int=i)) for i in range(5)] * 3) + "\n")  # duplicates do not count
    assert len(read_call_ids(str(path), []).ids) == 5


def test_bad_lines_listed_are_bounded(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("".join(f"bad-{i}\n" for i in range(50)))
    with pytest.raises(InputError) as err:
        read_call_ids(str(path), [])
    msg = str(err.value)
    assert msg.startswith("50 malformed call ID(s)")
    assert f"{path}:20 and 30 more" in msg and f"{path}:21" not in msg and "and 30 more" in msg
    assert "bad-" not in msg  # the file's content is not echoed


def test_empty_file_is_told_apart_from_no_file(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# nothing today\n\n")
    empty = read_call_ids(str(path), [])
    assert (empty.ids, empty.source_given) == ([], True)
    path.write_bytes(b"")
    assert read_call_ids(str(path), []).source_given is True
    none = read_call_ids(None, [A])
    assert (none.ids, none.source_given) == ([A], False)


def test_stdin_is_read_line_by_line(monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(f"\ufeff{A}\r\n# c\r\n{{{B}}}\r\n".encode()), encoding="latin-1")
    monkeypatch.setattr(sys, "stdin", stdin)
    ids = read_call_ids("-", [])
    assert (ids.ids, ids.source_given) == ([A, B], True)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_bytes(f"{A}\n{B}\n".encode() + b"\xff\xfe\n")
    with pytest.raises(InputError, match=r"not UTF-8 text \(line 3\)"):
        read_call_ids(str(path), [])

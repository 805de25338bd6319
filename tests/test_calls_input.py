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

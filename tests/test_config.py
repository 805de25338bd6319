import json
import re

import pytest

from pipeline.config import Settings, api_key_from_env, load_settings
from pipeline.errors import ConfigError, UsageError


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_defaults_match_contract():
    s = load_settings(None, {})
    assert (s.base_url, s.format, s.concurrency, s.page_size) == ("https://api.ultravox.ai", "duckdb", 16, 100)
    assert str(s.output_path) == "ultravox_stages.duckdb"
    assert str(Settings(format="parquet").output_path) == "ultravox_stages_parquet"


def test_precedence_cli_over_file_over_defaults(tmp_path):
    cfg = write(tmp_path, 'concurrency = 4\npage_size = 20\nbase_url = "http://127.0.0.1:9"\n')
    s = load_settings(cfg, {"concurrency": 32, "page_size": None})
    assert s.concurrency == 32  # CLI wins
    assert s.page_size == 20  # file wins over default (CLI not given)
    assert s.base_url == "http://127.0.0.1:9"
    assert s.max_rps == 195.0  # default


def test_settings_are_frozen():
    with pytest.raises(Exception):
        load_settings(None, {}).concurrency = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("concurency = 4", "unknown setting 'concurency'"),
        ('concurrency = "4"', "setting 'concurrency' must be int"),
        ("concurrency = -1", "'concurrency' must be greater than 0"),
        ("page_size = 0", "'page_size' must be greater than 0"),
        ("refresh = 1", "'refresh' must be bool"),
        ('format = "csv"', "'format' must be one of duckdb, parquet"),
        ("concurrency = true", "'concurrency' must be int"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), {})
    assert fragment in str(err.value)
    assert err.value.exit_code == 2


def test_invalid_toml_gives_line_and_column(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "concurrency = 4\npage_size = = 3\n"), {})
    assert "line 2" in str(err.value) and "column" in str(err.value)


@pytest.mark.parametrize("key", ["api_key", "API_KEY", "apikey"])
def test_key_in_toml_is_refused_without_echoing_it(tmp_path, key):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, f'{key} = "sk-super-secret-123"\n'), {})
    assert "environment" in str(err.value)
    assert "sk-super-secret-123" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(str(tmp_path / "nope.toml"), {})


def test_api_key_only_from_named_env(monkeypatch):
    monkeypatch.delenv("ULTRAVOX_API_KEY", raising=False)
    with pytest.raises(UsageError, match="ULTRAVOX_API_KEY"):
        api_key_from_env(Settings())
    monkeypatch.setenv("MY_KEY", "k1")
    assert api_key_from_env(Settings(api_key_env="MY_KEY")) == "k1"


def test_example_config_is_valid_and_complete():
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    text = example.read_text()
    # Every setting is documented in the example (commented out or set).
    for name in Settings.__dataclass_fields__:
        assert f"{name} =" in text, f"config.example.toml does not document {name}"
    uncommented = "\n".join(line.lstrip("# ") for line in text.splitlines() if "=" in line and not line.startswith("##"))
    tmp = Path(example.parent / ".pytest_example.toml")
    try:
        tmp.write_text(uncommented)
        load_settings(str(tmp), {})
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- hardening

SECRET = "sk-Zq81xTfK.pasted-by-mistake-42"


@pytest.mark.parametrize("key", ["max_rps", "timeout_seconds", "overlap_hours", "backoff_initial_seconds"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_cli_numbers_refuse_nan_and_infinity(key, value):
    with pytest.raises(ConfigError) as err:
        load_settings(None, {key: value})
    assert f"'{key}' must be a finite number" in str(err.value)
    assert err.value.exit_code == 2


@pytest.mark.parametrize("text", ["max_rps = nan", "max_rps = inf", "overlap_hours = -inf", "timeout_seconds = +nan"])
def test_toml_numbers_refuse_nan_and_infinity(tmp_path, text):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_settings(write(tmp_path, text), {})


@pytest.mark.parametrize("value", ["256MB", "1GiB", "512 MB", "1.5GB", "2gb", "64 MiB", "1TB"])
def test_memory_limit_accepts_duckdb_sizes(value):
    assert load_settings(None, {"duckdb_memory_limit": value}).duckdb_memory_limit == value


@pytest.mark.parametrize("value", ["lots", "256", "MB", "1PB", "-1", "5%", "1,5GB", "1KB", "0MB", "", SECRET])
def test_memory_limit_refuses_other_shapes(tmp_path, value):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, f"duckdb_memory_limit = {json.dumps(value)}"), {})
    message = str(err.value)
    assert "'duckdb_memory_limit' must be digits and a unit" in message and '"256MB"' in message
    assert SECRET not in message and "lots" not in message


def test_memory_limit_default():
    assert Settings().duckdb_memory_limit == "256MB"


@pytest.mark.parametrize(
    "text",
    [
        "concurrency = 4\npage_size = [1, 2",  # unclosed array at the end of the document
        'base_url = "https://x',  # unterminated string at the end
        "concurrency =",  # value missing at the end
        "concurrency = 4\n[table",
    ],
)
def test_toml_errors_always_carry_line_and_column(tmp_path, text):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), {})
    message = str(err.value)
    assert re.search(r"at line \d+, column \d+", message), message
    assert "end of document" not in message


def test_toml_error_at_the_end_points_at_the_last_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "concurrency = 4\npage_size = [1, 2"), {})
    assert "at line 2, column 18" in str(err.value)  # just after the last character


def test_toml_error_never_echoes_a_pasted_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, f"x = {{ '{SECRET}' = 1, '{SECRET}' = 2 }}\n"), {})
    assert SECRET not in str(err.value) and "line 1" in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        f'api_key_env = "{SECRET}"',
        f'base_url = 1\nconcurrency = "{SECRET}"',
        f'max_rps = "{SECRET}"',
        f'format = "{SECRET}"',
        f'log_format = "{SECRET}"',
        f'"{SECRET}" = 1',
        f'refresh = "{SECRET}"',
        f'calls_file = ["{SECRET}"]',
    ],
)
def test_a_pasted_key_is_never_echoed(tmp_path, text):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), {})
    assert SECRET not in str(err.value)
    assert "sk-" not in str(err.value)


def test_type_errors_name_setting_expected_and_received_types(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, f'concurrency = "{SECRET}"'), {})
    assert "setting 'concurrency' must be int, got a string" in str(err.value)
    with pytest.raises(ConfigError, match="'page_size' must be int, got a table"):
        load_settings(write(tmp_path, "page_size = {a = 1}"), {})


def test_short_choice_values_are_echoed(tmp_path):
    with pytest.raises(ConfigError, match="got 'csv'"):
        load_settings(write(tmp_path, 'format = "csv"'), {})


@pytest.mark.parametrize("name", ["ULTRAVOX_API_KEY", "MY_KEY", "_k2"])
def test_api_key_env_accepts_variable_names(name):
    assert load_settings(None, {"api_key_env": name}).api_key_env == name


@pytest.mark.parametrize("value", ["2KEY", "MY-KEY", "has space", "", "key=value", SECRET])
def test_api_key_env_refuses_anything_but_a_variable_name(value):
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"api_key_env": value})
    assert "NAME of an environment variable" in str(err.value)
    assert value == "" or value not in str(err.value)


def test_unknown_setting_suggests_the_closest_name(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'concurrency'"):
        load_settings(write(tmp_path, "concurency = 4"), {})


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"concurrency = 4\n# \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(str(path), {})


@pytest.mark.parametrize(
    "url, public",
    [
        ("https://user:pw@api.example:8443/base", "https://api.example:8443/base"),
        ("https://tok@api.example", "https://api.example"),
        ("https://api.ultravox.ai", "https://api.ultravox.ai"),
    ],
)
def test_public_options_never_hold_userinfo(url, public):
    options = Settings(base_url=url, output="s3://AKIAX:secretpart@bucket/prefix", format="delta").public_options()
    assert options["base_url"] == public
    assert options["output"] == "s3://bucket/prefix"
    assert "pw" not in json.dumps(options) and "secretpart" not in json.dumps(options)
    assert set(options) == set(Settings.__dataclass_fields__)


@pytest.mark.parametrize("flag, value", [("--max-rps", "nan"), ("--max-rps", "inf"), ("--overlap-hours", "-inf")])
def test_cli_flags_refuse_nan_and_infinity(tmp_path, flag, value):
    from click.testing import CliRunner

    from pipeline.cli import cli

    db = tmp_path / "w.duckdb"
    args = ["run", flag, value, "--call-id", "6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "--output", str(db),
            "--base-url", "http://127.0.0.1:9"]
    res = CliRunner().invoke(cli, args, env={"ULTRAVOX_API_KEY": "k-test-1234"})
    assert res.exit_code == 2, res.output
    assert "must be a finite number" in res.output
    assert not db.exists()


def test_memory_limit_is_checked_before_the_warehouse_is_opened(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli

    db = tmp_path / "w.duckdb"
    cfg = write(tmp_path, 'duckdb_memory_limit = "lots"\n')
    res = CliRunner().invoke(cli, ["run", "--config", cfg, "--call-id", "6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
                                   "--output", str(db)], env={"ULTRAVOX_API_KEY": "k-test-1234"})
    assert res.exit_code == 2 and "duckdb_memory_limit" in res.output and '"256MB"' in res.output
    assert not db.exists()


def test_replay_batches_default_by_format_and_a_setting_wins(tmp_path):
    assert Settings(format="duckdb").replay_batch() == (8000, 12 << 20)
    assert Settings(format="parquet").replay_batch() == Settings(format="delta").replay_batch() == (16000, 24 << 20)
    config = tmp_path / "c.toml"
    config.write_text("format = 'parquet'\nreplay_batch_bytes = 1000000\n")
    assert load_settings(str(config), {}).replay_batch() == (16000, 1_000_000)
    config.write_text("replay_batch_stages = 0\n")
    with pytest.raises(ConfigError, match="'replay_batch_stages' must be greater than 0"):
        load_settings(str(config), {})

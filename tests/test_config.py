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
    assert s.max_rps == 150.0  # default


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

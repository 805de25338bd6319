"""ultravox-stages: export Ultravox call stages into DuckDB or Parquet."""

__version__ = "0.1.0"

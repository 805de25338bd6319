"""ultravox-stages: export Ultravox call stages into DuckDB or Parquet."""

import os

__version__ = "0.1.0"

# pyarrow's allocator (mimalloc) reads this when pyarrow loads: arenas committed on
# first use rather than up front keep tens of MB less resident, at the same speed.
# A value set in the environment wins.
os.environ.setdefault("MIMALLOC_ARENA_EAGER_COMMIT", "0")

# Arrow's buffers, also those pyarrow's C++ allocates on its own (Parquet reads, compute
# kernels), come from the system allocator: glibc gives big freed blocks back, where
# mimalloc kept a long run's partly used pages (a 300k-stage replay into Parquet grew to
# 500 MB).
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

"""Keeping peak memory flat over long runs (README "Benchmarks": ≤ 300 MB).

Two allocator effects, measured on a 100,000-stage replay, made RSS sit 50-100 MB
above the data actually alive between batches:

* pyarrow's default memory pool (mimalloc) keeps freed pages mapped for reuse. The
  batches are a few large buffers, for which the system allocator is just as fast,
  and glibc hands big freed blocks back to the kernel;
* glibc keeps freed small blocks (the decoded JSON of a batch) in per-thread arenas;
  ``malloc_trim`` after each batch returns them.

Both are best effort: other platforms and C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

import pyarrow as pa


def _malloc_trim() -> Callable[[], None]:
    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl has no malloc_trim)
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> None:
        trim(0)

    return release


#: Give memory freed by the last batch back to the operating system.
release_free_memory: Callable[[], None] = _malloc_trim()


def use_system_allocator() -> None:
    """Arrow buffers from the system allocator instead of mimalloc/jemalloc."""
    pool = pa.system_memory_pool()
    if pa.default_memory_pool().backend_name != pool.backend_name:
        pa.set_memory_pool(pool)

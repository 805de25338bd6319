"""Keeping peak memory flat over long runs.

Three allocator effects made RSS sit well above the data actually alive between batches:

* pyarrow's default memory pool (mimalloc) keeps freed pages mapped for reuse. The
  batches are a few large buffers, for which the system allocator is just as fast,
  and glibc hands big freed blocks back to the kernel;
* glibc keeps freed small blocks (the decoded JSON of a batch) in per-thread arenas;
  ``malloc_trim`` after each batch returns them;
* glibc raises its mmap threshold after freeing a big block, so later 100 KB prompts land
  in the heap and fragment it, and every worker thread gets an arena of its own:
  :func:`use_system_allocator` fixes the threshold and caps the arenas.

Two more are set before pyarrow loads (``pipeline/__init__.py``): the system allocator
also for the buffers pyarrow's C++ allocates on its own, and mimalloc (pyarrow's own
default, which it still sets up) commits its arenas on first use instead of up front.

All are best effort: other platforms and C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

import pyarrow as pa


#: glibc mallopt parameters (malloc.h): a fixed mmap threshold, at most two arenas.
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
MMAP_THRESHOLD_BYTES = 64 * 1024
#: A replay's committing process holds no Python strings of prompts (they stay in Arrow
#: buffers): blocks up to 1 MiB come from the heap, reused from batch to batch instead of
#: being mapped and faulted in afresh (Parquet encoding allocates many of them).
REPLAY_MMAP_THRESHOLD_BYTES = 1 << 20
ARENA_MAX = 2


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> Callable[[], None]:
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)  # not glibc (e.g. musl has no malloc_trim)
    if trim is None:
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> None:
        trim(0)

    return release


#: Give memory freed by the last batch back to the operating system.
release_free_memory: Callable[[], None] = _malloc_trim()


def use_system_allocator(mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> None:
    """Arrow buffers from the system allocator instead of mimalloc/jemalloc, and glibc
    tuned for big short-lived strings (see the module docstring)."""
    pool = pa.system_memory_pool()
    if pa.default_memory_pool().backend_name != pool.backend_name:
        pa.set_memory_pool(pool)
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        mallopt(_M_ARENA_MAX, ARENA_MAX)

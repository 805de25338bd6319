"""A memory cgroup for one measured child process tree: every page its processes hold
(their own memory, the library pages they map, the page cache of what they read and
write) is charged once, under a hard limit, as in a container with a memory limit.
Summing each process's peak RSS instead counts the libraries both processes map twice.

Needs root and the memory controller (cgroup v1 or v2); :meth:`MemoryCgroup.create`
returns None where there is none to create, and the bench says so.
"""

from __future__ import annotations

import os
from pathlib import Path

_V1_FILES = {"limit": "memory.limit_in_bytes", "peak": "memory.max_usage_in_bytes", "events": "memory.oom_control"}
_V2_FILES = {"limit": "memory.max", "peak": "memory.peak", "events": "memory.events"}


def memory_hierarchy(mounts: str, own_cgroups: str) -> tuple[Path, int] | None:
    """(this process's memory cgroup directory, cgroup version) from the text of
    /proc/self/mounts and /proc/self/cgroup; None without a memory controller."""
    v1_root = v2_root = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup" and "memory" in fields[3].split(","):
            v1_root = Path(fields[1])
        elif fields[2] == "cgroup2" and v2_root is None:
            v2_root = Path(fields[1])
    for line in own_cgroups.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if v1_root is not None and "memory" in controllers.split(","):
            return v1_root / path.lstrip("/"), 1
        if v2_root is not None and hierarchy == "0" and not controllers:
            own = v2_root / path.lstrip("/")
            if (own / "cgroup.controllers").is_file() and "memory" in (own / "cgroup.controllers").read_text().split():
                return own, 2
    return None


class MemoryCgroup:
    """A fresh child cgroup with a hard memory limit; processes join it before they exec."""

    def __init__(self, path: Path, version: int):
        self.path = path
        self.files = _V1_FILES if version == 1 else _V2_FILES

    @classmethod
    def create(cls, name: str, limit_bytes: int | None, hierarchy: tuple[Path, int] | None = None) -> MemoryCgroup | None:
        """A child of this process's memory cgroup limited to ``limit_bytes`` (None: no
        limit, only the accounting); None if it cannot be made here (no controller, not
        root, a delegation that refuses it)."""
        if hierarchy is None:
            try:
                hierarchy = memory_hierarchy(Path("/proc/self/mounts").read_text(), Path("/proc/self/cgroup").read_text())
            except OSError:
                return None
            if hierarchy is None:
                return None
        parent, version = hierarchy
        group = cls(parent / name, version)
        try:
            group.path.mkdir(exist_ok=True)
            group._write("limit", str(limit_bytes) if limit_bytes is not None else "-1" if version == 1 else "max")
            if version == 1:
                group._write("peak", "0")  # v1 keeps the peak of earlier tenants until reset
            group.peak_bytes(), group.oom_kills()  # v2 before Linux 5.19 has no memory.peak
        except (OSError, ValueError):
            group.remove()
            return None
        return group

    def _write(self, which: str, value: str) -> None:
        (self.path / self.files[which]).write_text(value)

    def join(self) -> None:
        """Move the calling process into the group (from ``preexec_fn``: the child, before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int:
        return int((self.path / self.files["peak"]).read_text().split()[0])

    def oom_kills(self) -> int:
        """Processes of the group the kernel killed for memory."""
        for line in (self.path / self.files["events"]).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass  # a process still in it, or never made


def drop_page_cache() -> bool:
    """Drop clean cached pages (root only), so the measured run's library and file pages
    are charged to its own group, not to whoever read them first; False if refused."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        return False
    return True

"""The simulated Ultravox API: deterministic synthetic data served on loopback or in-process.

Used by ``ultravox-stages demo``, ``ultravox-stages sandbox``, the tests and the
benchmarks. Three endpoints behave like the live service:

* ``GET /api/calls/{call_id}/stages`` — the endpoint this tool exports;
* ``GET /api/calls`` — call discovery (``fromDate``/``toDate`` inclusive, ``sort``);
* ``GET /api/deleted_calls`` — calls removed by retention or by users.

Three layers: :mod:`~pipeline.sandbox.data` (:class:`SyntheticData`, derived from
``(seed, call index)`` alone), :mod:`~pipeline.sandbox.app` (:class:`SandboxApp`: routing,
faults, hostile modes and the rate limit, no I/O; ``httpx.MockTransport(app.handler)``
serves it without a socket) and :mod:`~pipeline.sandbox.server` (:class:`Sandbox` in a
thread, :class:`SandboxProcess` in a child process, :func:`serve` in the foreground).
The names of its faults and hostile modes are in :mod:`~pipeline.sandbox.hostile`.
Fault injection is deterministic per URL and attempt, not per arrival order; the calls
a hostile mode picks depend on ``fault_seed`` and the call id alone.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names → the module defining them, loaded on first use: `replay` and the CLI's option
# lists need no HTTP stack.
_WHERE = {
    "FAULT_KINDS": "hostile", "HOSTILE_KINDS": "hostile", "HOSTILE_KIND_DOCS": "hostile",
    "PLANTED_SECRET_PREFIX": "app", "PageHook": "app", "Reply": "app", "SandboxApp": "app", "SandboxOptions": "app",
    "SandboxStats": "app", "planted_secrets": "app",
    "SyntheticData": "data", "write_call_ids": "data", "write_landing_zone": "data",
    "Sandbox": "server", "SandboxProcess": "server", "serve": "server",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = sorted(_WHERE)

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
Fault injection is deterministic per URL and attempt, not per arrival order; the calls
a hostile mode picks depend on ``fault_seed`` and the call id alone.
"""

from pipeline.sandbox.app import (
    FAULT_KINDS,
    HOSTILE_KIND_DOCS,
    HOSTILE_KINDS,
    PLANTED_SECRET_PREFIX,
    PageHook,
    Reply,
    SandboxApp,
    SandboxOptions,
    SandboxStats,
    planted_secrets,
)
from pipeline.sandbox.data import SyntheticData, write_call_ids, write_landing_zone
from pipeline.sandbox.server import Sandbox, SandboxProcess, serve

__all__ = [
    "FAULT_KINDS", "HOSTILE_KINDS", "HOSTILE_KIND_DOCS", "PLANTED_SECRET_PREFIX", "PageHook", "Reply", "Sandbox",
    "SandboxApp", "SandboxOptions", "SandboxProcess", "SandboxStats", "SyntheticData", "planted_secrets", "serve",
    "write_call_ids",
    "write_landing_zone",
]

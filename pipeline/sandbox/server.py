"""The simulated API on a real socket: :class:`Sandbox` (a thread), :class:`SandboxProcess`
(a child process) and :func:`serve` (the foreground server behind ``ultravox-stages sandbox``).

The answers come from :class:`~pipeline.sandbox.app.SandboxApp`; this module only
delivers them, including what needs a socket: resets, truncated and slow bodies.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from functools import cached_property
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.sandbox.app import Reply, SandboxApp, SandboxOptions, SandboxStats
from pipeline.sandbox.hostile import HOSTILE_KINDS
from pipeline.sandbox.data import SyntheticData


#: How often the in-process server looks for a stop: ``stop()`` waits up to this long.
STOP_POLL_SECONDS = 0.01


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: SandboxApp) -> None:
        self.app = app
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self.stopping = threading.Event()  # ends slow_body answers in flight
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that hang up (BrokenPipe, ConnectionReset, timeouts) are normal here;
        # never print tracebacks to stderr.
        return

    def close_connections(self) -> None:
        self.stopping.set()
        with self.connections_lock:
            live = list(self.connections)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    server: _Server
    timeout = 120  # idle keep-alive connections are dropped after this

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on small answers
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return  # silent: never write to stderr

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        app = self.server.app
        headers = {k.lower(): v for k, v in self.headers.items()}
        app.stats.begin(headers)
        try:
            host = headers.get("host") or "%s:%s" % self.server.server_address[:2]
            self._write(app.answer(self.path, headers, f"http://{host}"))
        finally:
            app.stats.end()

    def _write(self, reply: Reply) -> None:
        if reply.mode == "reset":
            # Close without answering; linger 0 makes the close an RST.
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if reply.mode in ("truncated", "slow"):
            self.close_connection = True
        # Head and body in one write: one segment per answer keeps keep-alive answers fast.
        head = _head_bytes(reply)
        if reply.mode == "slow":
            self.wfile.write(head)
            self._trickle(reply.body, reply.pace)
            return
        self.wfile.write(head + reply.sent_body())

    def _trickle(self, body: bytes, pace: float) -> None:
        """One byte per pace seconds until done, the client hangs up or the server stops."""
        for at in range(len(body)):
            if at and not self._pause(pace):
                return
            self.wfile.write(body[at : at + 1])

    def _pause(self, seconds: float) -> bool:
        """Wait; False as soon as the server is stopping or the client has gone."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.server.stopping.wait(min(left, 0.05)) or self._peer_closed():
                return False
        return not self.server.stopping.is_set()

    def _peer_closed(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def _head_bytes(reply: Reply) -> bytes:
    """Status line and header fields of an HTTP/1.1 answer, blank line included."""
    try:
        reason = HTTPStatus(reply.status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {reply.status} {reason}", f"Date: {formatdate(usegmt=True)}"]
    lines += [f"{name}: {value}" for name, value in reply.head_fields()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Sandbox:
    """The simulated API in a background thread: ``with Sandbox(data) as box: box.base_url``."""

    def __init__(
        self, data: SyntheticData, options: SandboxOptions | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.data = data
        self.options = options or SandboxOptions()
        self.stats = SandboxStats()
        self.app = SandboxApp(data, self.options, self.stats)
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("sandbox not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Sandbox:
        if self._server is None:
            self._server = _Server(self._address, self.app)
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": STOP_POLL_SECONDS},
                                            name="uvx-sandbox", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reset_stats(self) -> None:
        self.stats.reset()

    def hostile_kind(self, call_id: str) -> str | None:
        """The hostile kind this sandbox gives the call, or None for a normal call."""
        return self.app.hostile_kind(call_id)

    def hostile_calls(self) -> dict[str, str]:
        """Every misbehaving call id → its kind (explicit ones and those picked by share)."""
        return self.app.hostile_calls()

    def served_stages(self, call_id: str) -> list[dict[str, Any]]:
        """See :meth:`SandboxApp.served_stages`."""
        return self.app.served_stages(call_id)

    def served_stage_ids(self, call_id: str) -> list[str]:
        """The ``callStageId`` values served for the call, in order."""
        return self.app.served_stage_ids(call_id)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SandboxProcess:
    """The simulated API in a child process (what ``ultravox-stages sandbox`` serves),
    for measurements: an in-process :class:`Sandbox` shares the interpreter lock with
    the client it serves, so it slows the client down and is slowed down by it.

    ``with SandboxProcess(n_calls=1000, latency_ms=50) as box: box.base_url, box.call_ids``
    — started when entered (it waits until the server accepts connections) and
    stopped when left. Every option but ``page_hook`` can be given.
    """

    def __init__(
        self,
        n_calls: int = 500,
        seed: int = 0,
        api_key: str | None = "sandbox-key",
        latency_ms: float = 0.0,
        rate_limit_rps: float | None = None,
        host: str = "127.0.0.1",
        startup_seconds: float = 30.0,
        hostile: tuple[str, ...] = (),
        hostile_share: float = 0.05,
        hostile_calls: dict[str, str] | None = None,
        big_prompts: bool = False,
        huge_prompt_calls: int = 0,
        **options: Any,
    ) -> None:
        self.n_calls, self.seed, self.api_key = n_calls, seed, api_key
        self.latency_ms, self.rate_limit_rps = latency_ms, rate_limit_rps
        self.host, self.startup_seconds = host, startup_seconds
        self.big_prompts, self.huge_prompt_calls = big_prompts, huge_prompt_calls
        self.options: dict[str, Any] = {
            "api_key": api_key, "latency_ms": latency_ms, "rate_limit_rps": rate_limit_rps, "hostile": list(hostile),
            "hostile_share": hostile_share, "hostile_calls": dict(hostile_calls or {}),
            **{name: sorted(v) if isinstance(v, (set, frozenset)) else v for name, v in options.items()},
        }
        _child_options(self.options)  # refuse bad options here, not in a silent child
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self._proc is None:
            raise RuntimeError("sandbox not started")
        return f"http://{self.host}:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running child (None before start and after stop)."""
        return self._proc

    @cached_property
    def call_ids(self) -> list[str]:
        """The served call IDs (derived from (seed, index) alone, like the child's)."""
        return SyntheticData(n_calls=self.n_calls, seed=self.seed).call_ids

    def start(self) -> SandboxProcess:
        for _ in range(3):  # the free port can be taken before the child binds it
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
            spec = {"host": self.host, "port": self.port, "n_calls": self.n_calls, "seed": self.seed,
                    "big_prompts": self.big_prompts, "huge_prompt_calls": self.huge_prompt_calls, "options": self.options}
            args = [sys.executable, "-c", "from pipeline.sandbox.server import serve_child; serve_child()", json.dumps(spec)]
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError("the sandbox process did not start")

    def _wait_ready(self) -> bool:
        assert self._proc is not None and self.port is not None
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _child_options(spec: dict[str, Any]) -> SandboxOptions:
    """SandboxOptions from JSON-friendly values (lists where the dataclass has tuples)."""
    values = dict(spec)
    for name in ("faults", "hostile"):
        if name in values:
            values[name] = tuple(values[name])
    if "always_fail" in values:
        values["always_fail"] = frozenset(values["always_fail"])
    options = SandboxOptions(**values)
    unknown = set(options.hostile) | set(options.hostile_calls.values())
    if unknown - HOSTILE_KINDS:
        raise ValueError(f"unknown hostile kinds: {sorted(unknown - HOSTILE_KINDS)}")
    return options


def serve_child() -> None:
    """Entry point of SandboxProcess's child: argv[1] is its JSON spec."""
    spec = json.loads(sys.argv[1])
    data = SyntheticData(n_calls=spec["n_calls"], seed=spec["seed"], big_prompts=spec["big_prompts"],
                         huge_prompt_calls=spec["huge_prompt_calls"])
    try:
        serve(data, _child_options(spec["options"]), spec["host"], spec["port"])
    except KeyboardInterrupt:
        pass


def serve(data: SyntheticData, options: SandboxOptions, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve in the foreground until interrupted (KeyboardInterrupt propagates). Prints nothing."""
    server = _Server((host, port), SandboxApp(data, options, SandboxStats()))
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.close_connections()
        server.server_close()

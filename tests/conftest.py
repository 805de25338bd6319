"""Shared fixtures: the simulated API on 127.0.0.1 and the real CLI, in-process (``cli``,
``invoke_cli``) or in a subprocess (``run_cli``: for signals, crashes and process boundaries)."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

KEY = "uvx-e2e-7f3a9c-DO-NOT-LEAK"
#: Modules whose tests take longest, started first so that no long test is left for the end
#: of a parallel run; the rest keep their order.
RUN_FIRST = (
    "test_delta_s3.py", "test_bench.py", "test_parquet.py", "test_warehouse_hardening.py", "test_parquet_crash.py",
    "test_e2e_parquet.py", "test_e2e_run.py", "test_property_transform.py", "test_sandbox_hostile.py",
    "test_e2e_faults.py", "test_cron.py", "test_delta.py", "test_e2e_hostile_kinds.py", "test_reports.py",
)
_STOPPER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="uvx-sandbox-stop")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(RUN_FIRST)))


def pytest_sessionfinish() -> None:
    _STOPPER.shutdown(wait=True)


@dataclass
class Expected:
    """Figures computed straight from the sandbox's data, independently of the pipeline."""

    calls: int
    stages: int
    messages: int
    voices: int
    latest_tokens: int
    initial_tokens: int
    errors: int


def expected_for(data, call_ids) -> Expected:
    stages = [s for cid in call_ids for s in data.stages_for(cid)]
    voices = sum(
        1 for s in stages for field in ("externalVoice", "voiceOverrides") if isinstance(s.get(field), dict) and s[field]
    )
    return Expected(
        calls=len(call_ids),
        stages=len(stages),
        messages=sum(len(s.get("inactivityMessages") or []) for s in stages),
        voices=voices,
        latest_tokens=sum(s.get("latestTokenCount") or 0 for s in stages),
        initial_tokens=sum(s.get("initialTokenCount") or 0 for s in stages),
        errors=sum(s.get("errorCount") or 0 for s in stages),
    )


@pytest.fixture
def start_sandbox() -> Iterator:
    """Factory: start_sandbox(n_calls=..., seed=..., **SandboxOptions) → running Sandbox."""
    from pipeline.sandbox import Sandbox, SandboxOptions, SyntheticData

    running = []

    def start(n_calls: int = 100, seed: int = 0, **options):
        options.setdefault("api_key", KEY)
        box = Sandbox(SyntheticData(n_calls=n_calls, seed=seed), SandboxOptions(**options))
        box.start()
        running.append(box)
        return box

    yield start
    for box in running:  # stop() waits for the server's poll: let that happen beside the next test
        _STOPPER.submit(box.stop)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, key: str | None = KEY, cwd: Path | None = None, stdin: str | None = None,
            env_extra: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
    env = {k: v for k, v in os.environ.items() if k not in ("ULTRAVOX_API_KEY", "ULTRAVOX_STAGES_DEBUG")}
    if key is not None:
        env["ULTRAVOX_API_KEY"] = key
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env,
        cwd=cwd, input=stdin, timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def invoke_cli(*args: str, key: str | None = KEY, cwd: Path | None = None, stdin: str | None = None,
               env_extra: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
    """``run_cli`` in this process: ``pipeline.cli.main`` under click's CliRunner isolation
    (stdin, stdout, stderr and the environment), so exit codes and messages are the real
    ones. ``timeout`` is accepted for the same signature; nothing here can hang a child."""
    from click.testing import CliRunner

    from pipeline.cli import main

    env: dict[str, str | None] = {"ULTRAVOX_API_KEY": key, "ULTRAVOX_STAGES_DEBUG": None}
    env.update(env_extra or {})
    argv = sys.argv
    with CliRunner().isolation(input=stdin, env=env) as (out, err, _mixed), contextlib.chdir(cwd or os.getcwd()):
        sys.argv = ["ultravox-stages", *args]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        finally:
            sys.argv = argv
            gc.unfreeze()  # main() freezes the heap for a long-lived process; a test run is not one
        stdout, stderr = out.getvalue(), err.getvalue()
    return CliResult(code, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"))


@pytest.fixture
def cli():
    """The CLI in-process; use ``run_cli`` where a real process boundary is the point."""
    return invoke_cli


def write_ids(path: Path, ids) -> Path:
    path.write_text("\n".join(ids) + "\n")
    return path


def eventually(condition: Callable[[], bool], seconds: float = 30.0, poll: float = 0.02) -> bool:
    """Whether ``condition()`` holds within ``seconds`` (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return condition()

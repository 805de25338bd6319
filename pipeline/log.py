"""What the user sees on stderr: warnings, a progress bar, one summary line.

``text`` is for people (progress bar only on a TTY); ``json`` is for cron and log
shippers: one JSON object per line with ``ts``, ``level``, ``event`` and fields.
Nothing secret is ever passed in here: callers hand over call IDs, counts and short
reasons only.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from pipeline.records import RunRecord, utcnow


class Reporter:
    def __init__(self, log_format: str = "text", progress: bool | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.json = log_format == "json"
        is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.show_progress = (is_tty if progress is None else progress) and not self.json
        self._last_draw = 0.0
        self._drawn = False

    def event(self, event: str, message: str, level: str = "info", **fields: Any) -> None:
        if self.json:
            record = {"ts": utcnow().isoformat(), "level": level, "event": event, "message": message, **fields}
            self._write(json.dumps(record, default=str))
        elif level != "debug":
            prefix = "" if level == "info" else f"{level}: "
            self._write(prefix + message)

    def warning(self, event: str, message: str, **fields: Any) -> None:
        self.event(event, message, level="warning", **fields)

    def progress(self, done: int, total: int, stages: int, retries: int, force: bool = False) -> None:
        if not self.show_progress:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = 28
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r[{bar}] calls {done}/{total} · stages {stages} · retries {retries}  ")
        self.stream.flush()
        self._drawn = True

    def summary(self, run: RunRecord, seconds: float, output: str) -> None:
        message = (
            f"{run.status}: {run.calls_requested} calls ({run.calls_loaded} loaded, "
            f"{run.calls_not_found} not found, {run.calls_failed} failed), "
            f"{run.stages_loaded} stages, {run.http_requests} requests, "
            f"{run.http_retries} retries in {seconds:.1f}s → {output} (run {run.run_id})"
        )
        fields = {k: v for k, v in run.as_row().items() if k not in ("options",)}
        self.event("run_finished", message, seconds=round(seconds, 3), output=output, **fields)

    def _write(self, line: str) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self._drawn = False
        self.stream.write(line + "\n")
        self.stream.flush()

"""What the user sees on stderr: warnings, a progress bar, one summary line.

``text`` is for people (progress bar only on a TTY); ``json`` is for cron and log
shippers: every stderr line is one JSON object with ``ts``, ``level``, ``event``,
``message`` and fields: ``run_started``, ``progress`` every few seconds, warnings,
``run_finished``, and errors (``event: error`` with ``exit_code``).
Nothing secret is ever passed in here: callers hand over call IDs, counts and short
reasons only.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from pipeline.errors import scrub
from pipeline.records import RunRecord, rfc3339, utcnow

#: Seconds between two ``progress`` events in JSON mode.
JSON_PROGRESS_EVERY = 5.0
#: Seconds between two redraws of the text progress bar.
BAR_REDRAW_EVERY = 0.1
CLEAR_LINE = "\r\033[K"


@dataclass
class Progress:
    """One snapshot of a run's progress (``total`` None: not known, e.g. replay)."""

    done: int
    total: int | None
    stages: int
    requests: int = 0
    retries: int = 0


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 call`` / ``2 calls``."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


class Reporter:
    def __init__(self, log_format: str = "text", progress: bool | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.json = log_format == "json"
        is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.show_progress = (is_tty if progress is None else progress) and not self.json
        self._last_draw = 0.0
        self._last_json = time.monotonic()
        self._rate_mark: tuple[float, int] = (time.monotonic(), 0)
        self._last_rate = 0.0
        self._drawn = False
        self._closed = False

    def event(self, event: str, message: str, level: str = "info", **fields: Any) -> None:
        if self.json:
            record = {"ts": rfc3339(utcnow()), "level": level, "event": event, "message": message, **fields}
            self._write(json.dumps(record, default=str, ensure_ascii=False))
        elif level != "debug":
            prefix = "" if level == "info" else f"{level}: "
            self._write(prefix + message)

    def machine(self, event: str, message: str, **fields: Any) -> None:
        """An event only log shippers need (JSON mode); people see the bar and summary."""
        if self.json:
            self.event(event, message, **fields)

    def warning(self, event: str, message: str, **fields: Any) -> None:
        self.event(event, message, level="warning", **fields)

    def error(self, message: str, exit_code: int, event: str = "error", level: str = "error") -> None:
        text = scrub(message)
        if self.json:
            self.event(event, text, level=level, exit_code=exit_code)
        else:
            self._write(text)

    def progress(self, snapshot: Progress, force: bool = False) -> None:
        now = time.monotonic()
        if self.json:
            if force or now - self._last_json >= JSON_PROGRESS_EVERY:
                self._last_json = now
                self._json_progress(snapshot, now)
            return
        if not self.show_progress or (not force and now - self._last_draw < BAR_REDRAW_EVERY):
            return
        self._last_draw = now
        self._draw(self._bar_text(snapshot, self._rate(snapshot.requests, now)))

    def end_progress(self) -> None:
        """Clear the bar: whatever is printed next starts on a clean line."""
        if self._drawn:
            self._raw_write(CLEAR_LINE)
            self._drawn = False

    def summary(self, run: RunRecord, seconds: float, output: str) -> None:
        message = (
            f"{run.status}: {plural(run.calls_requested, 'call')} ({run.calls_loaded} loaded, "
            f"{run.calls_not_found} not found, {run.calls_failed} failed), "
            f"{plural(run.stages_loaded, 'stage')}, {plural(run.http_requests, 'request')}, "
            f"{plural(run.http_retries, 'retry', 'retries')} in {seconds:.1f}s → {output} (run {run.run_id})"
        )
        fields = {k: rfc3339(v) if isinstance(v, datetime) else v for k, v in run.as_row().items() if k != "options"}
        self.event("run_finished", message, seconds=round(seconds, 3), output=output, **fields)

    def _json_progress(self, s: Progress, now: float) -> None:
        rate = self._rate(s.requests, now)
        total = "?" if s.total is None else s.total
        self.event(
            "progress", f"calls {s.done}/{total}", calls_done=s.done, calls_total=s.total, stages=s.stages,
            requests=s.requests, retries=s.retries, requests_per_second=round(rate, 1),
        )

    def _rate(self, requests: int, now: float) -> float:
        """Requests per second since the previous measurement at least a second ago."""
        then, before = self._rate_mark
        if now - then < 1.0:
            return self._last_rate
        self._rate_mark = (now, requests)
        self._last_rate = (requests - before) / (now - then)
        return self._last_rate

    @staticmethod
    def _bar_text(s: Progress, rate: float) -> str:
        if s.total is None:
            head = f"calls {s.done}"
        else:
            width = 20
            filled = int(width * s.done / s.total) if s.total else width
            head = f"[{'#' * filled}{'-' * (width - filled)}] calls {s.done}/{s.total}"
        text = f"{head} · stages {s.stages} · retries {s.retries}"
        return text + (f" · {rate:.0f} req/s" if rate > 0 else "")

    def _draw(self, text: str) -> None:
        # One line never wider than the terminal: a wrapped bar would stack on redraw.
        columns = shutil.get_terminal_size(fallback=(80, 24)).columns
        self._raw_write(CLEAR_LINE + text[: max(columns - 1, 1)])
        self._drawn = True

    def _write(self, line: str) -> None:
        self.end_progress()
        self._raw_write(line + "\n")

    def _raw_write(self, text: str) -> None:
        if self._closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            # The reader of stderr went away (`2>&1 | head`): the run goes on, silently.
            self._closed = True

"""Progress of long work (profile generation, embedding, training epochs, top-k search).

Two outputs of one `progress_bar` block: a rich bar with rate and ETA on stderr (a terminal; off with
`set_enabled(False)`, e.g. for `--json`), and, whatever the terminal, a progress line through the run
logger (Prefect's inside a flow or task run: the UI and `prefect flow-run logs` show it) at least every
`BRIDGEREC_PROGRESS_LOG_SECONDS` (60) while the block runs and once at its end when it ran that long:
`enrich: profiles: 120/500 users (24%), 0.35 users/s, ETA 18m 06s`. A slow run reads as slow, not hung.

Every step also feeds the stall watchdog (runtime/watchdog.py): `beat()` notes the time of the latest
progress, in this process and, when the watchdog set `BRIDGEREC_HEARTBEAT_FILE`, as that file's
modification time (at most once a second), so steps in worker processes count too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from bridgerec.runtime.logs import get_logger

_enabled = True
LOG_SECONDS_ENV = "BRIDGEREC_PROGRESS_LOG_SECONDS"
HEARTBEAT_ENV = "BRIDGEREC_HEARTBEAT_FILE"


class _Heartbeat:
    """The time (monotonic, this process) and description of the latest progress step."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.what = ""
        self._touched = 0.0

    def beat(self, what: str | None = None) -> None:
        self.at = time.monotonic()
        if what:
            self.what = what
        path = os.environ.get(HEARTBEAT_ENV)
        if path and self.at - self._touched >= 1.0:
            self._touched = self.at
            with contextlib.suppress(OSError):  # a heartbeat must never break the work
                os.utime(path)


heartbeat = _Heartbeat()


def beat(what: str | None = None) -> None:
    """Note that the work moved on (`what`: what it is doing now); progress bars call it on every step."""
    heartbeat.beat(what)


def set_enabled(enabled: bool) -> None:
    """Turn bars off (e.g. for `--json`, whose stdout must hold JSON only). Log lines stay on."""
    global _enabled
    _enabled = enabled


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressLog:
    """Counts the steps of one phase and logs done/total, rate and ETA every `interval` seconds (from a
    timer thread, so a long step between two advances does not silence it)."""

    def __init__(self, description: str, total: float | None, unit: str, interval: float) -> None:
        self.description, self.total, self.unit, self.interval = description, total, unit, interval
        self.done = 0.0
        self.started = time.monotonic()
        self._log = get_logger()  # captured here: the run logger belongs to the flow's context
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._timer: threading.Thread | None = None
        self.lines = 0

    def start(self) -> None:
        beat(self.description)
        if self.interval > 0:
            self._timer = threading.Thread(target=self._run, name="progress-log", daemon=True)
            self._timer.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.emit()

    def advance(self, steps: float, description: str | None) -> None:
        with self._lock:
            self.done += steps
            if description:
                self.description = description
        beat(self.description)

    def line(self) -> str:
        with self._lock:
            done, description = self.done, self.description
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        text = f"{description}: {done:,.0f}"
        if self.total:
            text += f"/{self.total:,.0f} {self.unit} ({done / self.total:.0%})"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.2f} {self.unit}/s, {_duration(elapsed)} elapsed"
        if self.total and rate > 0:
            text += f", ETA {_duration((self.total - done) / rate)}"
        elif self.total:
            text += ", ETA unknown (no step finished yet)"
        return text

    def emit(self) -> None:
        self.lines += 1
        with contextlib.suppress(Exception):  # logging must never break the work it reports on
            self._log.info("progress: %s", self.line())

    def close(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
        if self.interval > 0 and time.monotonic() - self.started >= self.interval:
            self.emit()  # the phase's final figures


class Bar:
    """What `progress_bar` yields: pass it to `advance`."""

    def __init__(self, rich: Progress | None, log: ProgressLog) -> None:
        self.rich, self.log = rich, log


def _log_seconds() -> float:
    try:
        return float(os.environ.get(LOG_SECONDS_ENV, "60"))
    except ValueError:
        return 60.0


@contextlib.contextmanager
def progress_bar(description: str, total: float | None = None, unit: str = "steps") -> Iterator[Bar]:
    """A bar with rate and ETA on stderr (when enabled) plus progress lines in the run's log."""
    log = ProgressLog(description, total, unit, _log_seconds())
    log.start()
    try:
        if not _enabled:
            yield Bar(None, log)
            return
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{unit}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=Console(file=sys.stderr), transient=False) as bar:
            bar.add_task(description, total=total, rate="")
            yield Bar(bar, log)
    finally:
        log.close()


def advance(bar: Bar | Any | None, steps: float = 1, description: str | None = None) -> None:
    if bar is None:
        return
    if isinstance(bar, Bar):
        bar.log.advance(steps, description)
        bar = bar.rich
        if bar is None:
            return
    task = bar.tasks[0]
    speed = task.speed
    bar.update(
        task.id,
        advance=steps,
        description=description or task.description,
        rate=f"{speed:,.0f}/s" if speed else "",
    )

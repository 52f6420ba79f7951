"""Progress of long work (profile generation, embedding, training epochs, top-k search).

Two outputs of one `progress_bar` block: a rich bar with rate and ETA on the terminal's stderr
(`console.err()`; off with `set_enabled(False)`, e.g. for `--json`), and, whatever the terminal, a
progress line through the run logger (Prefect's inside a flow or task run: the UI and `prefect flow-run
logs` show it; kept off the terminal, where the bar is) at least every `BRIDGEREC_PROGRESS_LOG_SECONDS`
(30) while the block runs and once at its end when it ran that long:
`enrich: user profiles: 12/48 users (25%), 2,816 tokens, 0.10 users/s, 2m 00s elapsed, ETA 6m 00s`.
A slow run reads as slow, not hung. Counters beside the main count (`counters=("tokens",)`) are shown
in the bar and the line; `advance(bar, n, tokens=k)` adds to them.

`status(text)` is a spinner for a wait that has no count (an engine starting): on a terminal only.

Every step also feeds the stall watchdog (runtime/watchdog.py): `beat()` notes the time of the latest
progress, in this process and, when the watchdog set `BRIDGEREC_HEARTBEAT_FILE`, as that file's
modification time (at most once a second), so steps in worker processes count too.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.spinner import Spinner
from rich.table import Column
from rich.text import Text

from bridgerec.runtime import console
from bridgerec.runtime.logs import DETAIL, get_logger

_enabled = True
LOG_SECONDS_ENV = "BRIDGEREC_PROGRESS_LOG_SECONDS"
DEFAULT_LOG_SECONDS = 30.0
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
    """Counts the steps of one phase and logs done/total, counters, rate and ETA every `interval` seconds
    (from a timer thread, so a long step between two advances does not silence it)."""

    def __init__(
        self,
        description: str,
        total: float | None,
        unit: str,
        interval: float,
        counters: tuple[str, ...] = (),
    ) -> None:
        self.description, self.total, self.unit, self.interval = description, total, unit, interval
        self.done = 0.0
        self.counts = dict.fromkeys(counters, 0.0)
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

    def advance(self, steps: float, description: str | None, counts: dict[str, float]) -> None:
        with self._lock:
            self.done += steps
            for name, n in counts.items():
                self.counts[name] = self.counts.get(name, 0.0) + n
            if description:
                self.description = description
        beat(self.description)

    def counters_text(self) -> str:
        with self._lock:
            return ", ".join(f"{n:,.0f} {name}" for name, n in self.counts.items())

    def rate_text(self) -> str:
        """The steps' rate since the start with its unit ("0.27 users/s"): what the bar shows, the figure
        the log lines give (rich's own estimate, over its last few updates, jumped to 1,322/s when a batch
        of users settled at once, and read as tokens/s beside the tokens counter)."""
        with self._lock:
            done = self.done
        rate = done / max(time.monotonic() - self.started, 1e-9)
        return f"{rate:,.0f} {self.unit}/s" if rate >= 10 else f"{rate:.2f} {self.unit}/s"

    def line(self) -> str:
        with self._lock:
            done, description = self.done, self.description
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        text = f"{description}: {done:,.0f}"
        if self.total:
            text += f"/{self.total:,.0f} {self.unit} ({min(done / self.total, 1.0):.0%})"
        else:
            text += f" {self.unit}"
        if self.counts:
            text += ", " + self.counters_text()
        text += f", {rate:,.2f} {self.unit}/s, {_duration(elapsed)} elapsed"
        if self.total and rate > 0:
            text += f", ETA {_duration(max(self.total - done, 0) / rate)}"
        elif self.total:
            text += ", ETA unknown (no step finished yet)"
        return text

    def emit(self) -> None:
        self.lines += 1
        with contextlib.suppress(Exception):  # logging must never break the work it reports on
            self._log.info("progress: %s", self.line(), extra=DETAIL)

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
        return float(os.environ.get(LOG_SECONDS_ENV, DEFAULT_LOG_SECONDS))
    except ValueError:
        return DEFAULT_LOG_SECONDS


# Off a terminal a bar's line is as wide as this: a file or a CI log has no width, and a bar with the
# training's counters (loss, validation figure) and a long description wrapped its ETA onto a second
# line at 120 (a new user's trial, stderr to a file).
OFF_TERMINAL_WIDTH = 240


def _keep_python_output() -> bool:
    """Whether a bar or spinner may take over sys.stdout/sys.stderr while it is drawn. rich does so on a
    terminal by default, printing whatever Python code writes there above the bar: the terminal. In a
    quiet session that output belongs to the log file (fds 1 and 2), so the streams are left alone: vLLM's
    and torch's notices during an engine start flooded the terminal that way (a user's trial under a
    real terminal; pipes, as in tests, never showed it). Under --verbose rich keeps them tidy above the bar."""
    return not console.quiet()


def _terminal() -> Console:
    """Bars on the terminal's stderr; off a terminal (a CI log, a file) OFF_TERMINAL_WIDTH columns wide,
    not 80, so a bar's figures stay on its one line."""
    stream = console.err()
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, width=None if interactive else OFF_TERMINAL_WIDTH)


@contextlib.contextmanager
def progress_bar(
    description: str, total: float | None = None, unit: str = "steps", counters: tuple[str, ...] = ()
) -> Iterator[Bar]:
    """A bar with rate and ETA on the terminal (when enabled) plus progress lines in the run's log."""
    log = ProgressLog(description, total, unit, _log_seconds(), counters)
    log.start()
    try:
        if not _enabled:
            yield Bar(None, log)
            return
        terminal = _terminal()
        narrow = terminal.width < NARROW_WIDTH
        figures = [
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn(f"{unit}", table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[counts]}", table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[rate]}", table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            _Eta(table_column=Column(no_wrap=True)),
        ]
        if narrow:  # the description on a line of its own, the bar and its figures below
            columns: list[ProgressColumn] = [BarColumn(bar_width=None), *figures]
        else:
            columns = [_Description("[bold]{task.description}", table_column=Column(ratio=1)), BarColumn()]
            columns += figures
        keep = _keep_python_output()
        with (_TwoLines if narrow else Progress)(
            *columns, console=terminal, transient=False, redirect_stdout=keep, redirect_stderr=keep
        ) as bar:
            task = bar.add_task(description, total=total, rate="", counts=log.counters_text())
            try:
                yield Bar(bar, log)
            except BaseException:
                # The bar's last frame stays on the terminal above the error line: say that the work
                # stopped there, its clock stopped, and no time remains to estimate. A bar stopped before
                # its first step says nothing the error line does not (a bad input file: the error line
                # alone, as the CLI promises), so it is taken off instead.
                if bar.tasks[0].completed:
                    bar.update(task, description=f"{bar.tasks[0].description} (stopped)")
                    bar.stop_task(task)
                else:
                    bar.update(task, visible=False)
                raise
    finally:
        log.close()


# Below this many columns a bar takes two lines: its description, then the bar with its figures. On one
# line at 80 columns rich cut the figures themselves ("35… users", "0:… ETA", a user's trial).
NARROW_WIDTH = 120


class _Description(TextColumn):
    """The bar's description, cut with an ellipsis where the line is short: the figures keep their room."""

    def render(self, task: Task) -> Text:
        text = super().render(task)
        text.no_wrap, text.overflow = True, "ellipsis"
        return text


class _TwoLines(Progress):
    """Each task's description on a line of its own above its bar and figures (narrow terminals)."""

    def get_renderables(self) -> Iterable[RenderableType]:
        for task in self.tasks:
            if task.visible:
                yield Text(task.description, style="bold", no_wrap=True, overflow="ellipsis")
        yield self.make_tasks_table(self.tasks)


class _Eta(TimeRemainingColumn):
    """`ETA 1:02:03` while the bar runs; nothing once its task stopped before its end (a failure)."""

    def render(self, task: Task) -> Text:
        if task.stop_time is not None and not task.finished:
            return Text("")
        return Text.assemble("ETA ", super().render(task))


def advance(bar: Bar | Any | None, steps: float = 1, description: str | None = None, **counts: float) -> None:
    """Add `steps` done (fractions allowed) and `counts` to the bar's counters; optionally relabel it."""
    if bar is None:
        return
    if isinstance(bar, Bar):
        bar.log.advance(steps, description, counts)
        counts_text, rate = bar.log.counters_text(), bar.log.rate_text()
        bar = bar.rich
        if bar is None:
            return
    else:
        beat(description)
        counts_text, rate = "", ""
    task = bar.tasks[0]
    bar.update(
        task.id, advance=steps, description=description or task.description, rate=rate, counts=counts_text
    )


def finish(bar: Bar | None) -> None:
    """Mark the bar's work complete at what was done (a loop that stopped early, e.g. on patience)."""
    if isinstance(bar, Bar):
        with bar.log._lock:
            bar.log.total = bar.log.done
        if bar.rich is not None:
            task = bar.rich.tasks[0]
            bar.rich.update(task.id, total=task.completed)


class BatchCredit:
    """Moves a bar as the requests of a batch finish, and settles it to exactly the batch's size when the
    batch is done or given up. Each request is worth `per_request` steps (`begin` sets it per batch: a
    batch of 64 users making 250 model calls moves 64/250 users a call). A retried or split batch credits
    its requests again; settling takes back whatever the batch was credited beyond its size, so the bar
    ends at the number of units however often they were tried."""

    def __init__(self, bar: Bar | None) -> None:
        self.bar = bar
        self.per_request = 1.0
        self.steps = 0.0  # credited since the last settle
        self.counts: dict[str, float] = {}

    def begin(self, per_request: float) -> None:
        self.per_request = per_request

    def on_request(self, n: int, tokens: int | None = None) -> None:
        steps = n * self.per_request
        self.steps += steps
        counts = {"tokens": float(tokens)} if tokens else {}
        for name, v in counts.items():
            self.counts[name] = self.counts.get(name, 0.0) + v
        advance(self.bar, steps, None, **counts)

    def settle(self, steps: float, **counts: float) -> None:
        """The batch's `steps` (and `counts`, e.g. tokens=) are final: advance by what was not credited."""
        rest = {name: v - self.counts.get(name, 0.0) for name, v in counts.items()}
        advance(self.bar, steps - self.steps, None, **rest)
        self.steps, self.counts = 0.0, {}


@contextlib.contextmanager
def status(text: str) -> Iterator[None]:
    """A spinner with `text` on the terminal while the block runs (nothing when bars are off or the
    terminal is not interactive); it leaves no line behind."""
    beat(text)
    terminal = _terminal()
    if not _enabled or not terminal.is_terminal:
        yield
        return
    keep = _keep_python_output()
    spinner = Spinner("dots", text=text, style="status.spinner")
    with Live(
        spinner,
        console=terminal,
        transient=True,
        refresh_per_second=12.5,
        redirect_stdout=keep,
        redirect_stderr=keep,
    ):
        yield

"""Progress bars for long work: rich bars on a terminal, silent when output is machine-read."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn bars off (e.g. for `--json`, whose stdout must hold JSON only)."""
    global _enabled
    _enabled = enabled


@contextlib.contextmanager
def progress_bar(
    description: str, total: float | None = None, unit: str = "steps"
) -> Iterator[Progress | None]:
    """A bar with rate and ETA on stderr; yields None when bars are off."""
    if not _enabled:
        yield None
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
        yield bar


def advance(bar: Progress | None, steps: float = 1, description: str | None = None) -> None:
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

"""What the terminal shows: bridgerec's own lines, its progress bars and the command's result. Everything
else (third-party warnings and notices, Prefect's console log, vLLM's and torch's C++ warnings) goes to the
command's log file in the workspace.

A command opens one `session`. In the quiet default the process's file descriptors 1 and 2 are pointed at
`WORKSPACE/logs/<UTC time>-<command>.log` until the process exits. Python logging filters could not do
this: much of the noise is written straight to fd 2 by C++ code (torch's NUMA notices, vLLM's kernels) or
by child processes (Prefect's server, vLLM's engine core), which inherit the descriptors. bridgerec writes
its own lines, bars and results to duplicates of the original descriptors taken before the switch
(`out()`, `err()`), and `logs.get_logger()`'s records are echoed there as plain sentences
(`show_record`). `--verbose` (or BRIDGEREC_VERBOSE=1) leaves the descriptors alone: everything shows
where it always did, and no log file is written.

Where stdout/stderr are not the process's descriptors 1 and 2 (a test's CliRunner), nothing is redirected
and the session behaves as `--verbose`.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

VERBOSE_ENV = "BRIDGEREC_VERBOSE"
LOG_DIR = "logs"


@dataclass
class _Session:
    out: TextIO  # the command's result (JSON, summary tables): the original stdout
    err: TextIO  # bridgerec's lines and bars: the original stderr
    log_path: Path | None  # None: nothing redirected (--verbose, or no real descriptors)
    show_info: bool  # echo bridgerec's INFO records (off under --json: only warnings and errors)


_session: _Session | None = None
_terminal: tuple[TextIO, TextIO] | None = None  # the original stdout/stderr, once fds 1 and 2 moved


def out() -> TextIO:
    """Where a command writes its result: the terminal's stdout, also while fd 1 goes to the log."""
    return _session.out if _session is not None else sys.stdout


def err() -> TextIO:
    """Where bridgerec writes its own lines and progress bars: the terminal's stderr."""
    return _session.err if _session is not None else sys.stderr


def log_path() -> Path | None:
    """The current session's log file (None when nothing is redirected)."""
    return _session.log_path if _session is not None else None


def quiet() -> bool:
    """Whether third-party output is kept off the terminal (then bridgerec echoes its own records)."""
    return _session is not None and _session.log_path is not None


def _real_descriptors() -> bool:
    """Whether sys.stdout/sys.stderr write to the process's fds 1 and 2 (not a test's in-memory streams)."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def new_log_path(workspace: Path, command: str, now: datetime | None = None) -> Path:
    """WORKSPACE/logs/<UTC time>-<command>.log (a suffix keeps two commands of one second apart)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(workspace) / LOG_DIR
    path = folder / f"{stamp}-{command}.log"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{stamp}-{command}-{n}.log"
    return path


def prune_logs(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` log files of `folder` (names sort by time); returns those deleted."""
    files = sorted(folder.glob("*.log"))
    gone = files[: max(len(files) - keep, 0)]
    for f in gone:
        with contextlib.suppress(OSError):
            f.unlink()
    return gone


def _redirect(path: Path) -> tuple[TextIO, TextIO]:
    """Point fds 1 and 2 at `path` (appending); returns text streams on the original descriptors (taken
    the first time; a later session in the same process moves fds 1 and 2 to its own file)."""
    global _terminal
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if _terminal is None:
        saved_out, saved_err = os.dup(1), os.dup(2)  # not inheritable: children never see the terminal
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        _terminal = (
            os.fdopen(saved_out, "w", buffering=1, encoding=encoding, errors="replace"),
            os.fdopen(saved_err, "w", buffering=1, encoding=encoding, errors="replace"),
        )

        def restore() -> None:  # at exit, after Prefect's and vLLM's own exit handlers wrote to the file
            for stream in (sys.stdout, sys.stderr, *_terminal):
                with contextlib.suppress(Exception):
                    stream.flush()
            with contextlib.suppress(OSError):
                os.dup2(saved_out, 1)
                os.dup2(saved_err, 2)

        atexit.register(restore)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
    finally:
        os.close(log_fd)
    return _terminal


def _log_to_file() -> None:
    """bridgerec's records logged outside a Prefect run (which has handlers of its own) go to the file."""
    logger = logging.getLogger("bridgerec")
    if not any(getattr(h, "bridgerec_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)  # fd 2: the log file
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
        handler.bridgerec_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


@contextlib.contextmanager
def session(
    workspace: Path | None,
    command: str,
    *,
    verbose: bool = False,
    as_json: bool = False,
    keep_logs: int = 30,
    log_level: str = "INFO",
) -> Iterator[Path | None]:
    """Route the command's output (see the module's doc); yields the log file's path, or None when
    nothing is redirected. The redirection lasts until the process exits (exit handlers of Prefect and
    vLLM still write to the file), and so does a redirected session: `err()` stays the terminal for a
    last `error:` line after the command's block. `log_level` (`runtime.log_level`) is the least level
    of bridgerec's own records in this process, in Prefect's run logs as outside them."""
    global _session
    previous = _session
    logging.getLogger("bridgerec").setLevel(log_level)
    path = None
    if not verbose and workspace is not None and _real_descriptors():
        path = new_log_path(Path(workspace), command)
        o, e = _redirect(path)
        prune_logs(path.parent, keep_logs)
        _session = _Session(o, e, path, show_info=not as_json)
        _log_to_file()
    else:
        _session = _Session(sys.stdout, sys.stderr, None, show_info=not as_json)
    try:
        yield path
    finally:
        for stream in (_session.out, _session.err):
            with contextlib.suppress(Exception):
                stream.flush()
        if path is None:
            _session = previous


def echo(text: str, style: str | None = None) -> None:
    """One line of bridgerec's own on the terminal (rich markup is not interpreted)."""
    from rich.console import Console
    from rich.text import Text

    Console(file=err(), soft_wrap=True, highlight=False).print(Text(text, style=style or ""))


def show_record(level: int, message: str, detail: bool) -> None:
    """Echo one of bridgerec's log records on the terminal in a quiet session: INFO and above (warnings
    and errors only under --json), never `detail` records (they stay in the log and Prefect's)."""
    if not quiet() or detail or level < logging.INFO:
        return
    assert _session is not None
    if level >= logging.WARNING:
        echo("warning: " + message, "yellow")
    elif _session.show_info:
        echo(message)

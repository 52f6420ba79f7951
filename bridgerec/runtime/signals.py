"""Signals that stop a command, and the process a night runs in.

SIGTERM (a scheduler, `kill`, a container stop), SIGINT (Ctrl-C) and SIGHUP (the terminal closed) end
a command early. Inside a flow
run, Prefect turns SIGTERM into its `TerminationSignal` (a `BaseException`), marks the runs Crashed and
then delivers the signal again to the handler that was there before it; with Python's default handler
that kills the process on the spot, so nothing after it runs: not the night's own record, not the
`atexit` hook that stops Prefect's temporary API server (left running with no parent). `stop_on_signals`
installs a handler that raises `Stopped` instead, so the command unwinds like any error: the night
records itself 'failed' with the signal's name, and the interpreter exits normally, its `atexit` hooks
included, with the conventional status 128 + the signal's number.

`this_process` names the process a night runs in (host, PID, start time), so that a later night can tell
a night still running from one whose process is gone (`process_alive`).
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import psutil


class Stopped(BaseException):
    """The command received a stop signal (SIGTERM). A BaseException, as KeyboardInterrupt is, so that
    no `except Exception` in between swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_signal(exc: BaseException | None) -> signal.Signals | None:
    """The signal that stopped the command, if `exc` (or an exception it was raised from or during) is
    `Stopped`, Prefect's `TerminationSignal` (it carries `.signal`) or KeyboardInterrupt (SIGINT)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Stopped):
            return signal.Signals(exc.signum)
        if isinstance(exc, KeyboardInterrupt):
            return signal.SIGINT
        number = getattr(exc, "signal", None)
        if isinstance(exc, BaseException) and not isinstance(exc, Exception) and isinstance(number, int):
            return signal.Signals(number)  # prefect.exceptions.TerminationSignal
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def _handlers(signals: tuple[signal.Signals, ...], handler: Any = None) -> Iterator[None]:
    """`handler` on `signals` for the block (None: the handlers are left as they are), and the previous
    handlers back afterwards. Outside the main thread, where signals cannot be handled, nothing changes."""
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        if handler is not None:
            for sig in signals:
                signal.signal(sig, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            with contextlib.suppress(ValueError, TypeError):  # TypeError: a handler not set from Python
                signal.signal(sig, old)


def stop_on_signals() -> contextlib.AbstractContextManager[None]:
    """While the block runs, SIGTERM and SIGHUP (the terminal closed) raise `Stopped` in the main thread
    (SIGINT raises KeyboardInterrupt, Python's default). The previous handlers come back afterwards."""
    return _handlers((signal.SIGTERM, signal.SIGHUP), _raise_stopped)


def ignore_stop_signals() -> None:
    """From here on SIGINT, SIGTERM and SIGHUP are ignored: for a command whose outcome is decided and
    recorded (a night that completed, was held or failed), so that a Ctrl-C while it shuts down (Prefect
    stopping its temporary API server at exit) cannot turn its exit status into 130 for a night recorded
    'completed' (a new user's trial, 2026-12-07). The shutdown itself takes seconds."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread: nothing to change
            signal.signal(sig, signal.SIG_IGN)


def handlers_restored() -> contextlib.AbstractContextManager[None]:
    """SIGINT's, SIGTERM's and SIGHUP's handlers put back as they were after the block: around a block
    that calls `ignore_stop_signals`, so that an in-process caller (a test's CliRunner) keeps its own."""
    return _handlers((signal.SIGINT, signal.SIGTERM, signal.SIGHUP))


def this_process() -> tuple[str, int, datetime]:
    """(host name, PID, start time in UTC) of the running process."""
    me = psutil.Process()
    return socket.gethostname(), me.pid, datetime.fromtimestamp(me.create_time(), UTC)


def process_alive(host: str | None, pid: int | None, started_at: datetime | None) -> bool | None:
    """Whether the process (host, pid, started_at) still runs: None when this machine cannot tell (another
    host, or nothing recorded); a PID that now belongs to a process started at another time is gone."""
    if host is None or pid is None or host != socket.gethostname():
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = float(process.create_time())
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None
    if started_at is None:
        return True
    return bool(abs(created - started_at.timestamp()) < 1.0)

"""A stage that stops making progress fails, instead of running on for ever.

Every progress step of a stage (runtime/progress.py: the bars of training batches, embedding and profile
batches, top-k search, ingest's steps) is a heartbeat. `Watchdog` watches the heartbeats of the block it
guards from a thread of its own: when none came for `stall_s` seconds, it raises `StageStalled` in the
thread that runs the block (a signal, so a wait in a system call is interrupted too), naming the stage,
how long it stalled, what it was doing last and where in the code it is stuck. A block stuck inside
native code that a signal cannot interrupt is ended after a grace period: the process exits with that
message in the log (a later night marks the night 'crashed', flows/nightly.py).

Heartbeats from worker processes (`runtime.runner: processes`) count too: the watchdog hands them a file
(`BRIDGEREC_HEARTBEAT_FILE`, inherited by the processes started while it watches) whose modification
time each of their progress steps advances.

The stage's time budget is separate: Prefect's `timeout_seconds` on the stage's flow run
(flows/stage.py), `runtime.stage_timeout_seconds`; `StageOverBudget` says it ran past it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from types import FrameType

from bridgerec.runtime.errors import InputError
from bridgerec.runtime.logs import get_logger
from bridgerec.runtime.progress import HEARTBEAT_ENV, heartbeat

GRACE_MIN_S = 30.0  # a stalled block that does not stop when asked is ended this long after at the latest


class StageStalled(InputError):
    """A stage made no progress for longer than `runtime.stall_seconds`. Not retried (exit code 2): the
    same inputs stall again; the message says where it was stuck."""


class StageOverBudget(InputError):
    """A stage ran longer than its time budget (`runtime.stage_timeout_seconds`). Not retried."""


def current_frame(ident: int | None) -> FrameType | None:
    """The frame thread `ident` is running now (None: no such thread), read with the garbage collector
    paused. On CPython 3.11 `sys._current_frames()` holds the runtime's thread-list lock while it
    allocates; a collection that starts there and frees a `threading.local` takes that lock again and the
    calling thread deadlocks for good, with every thread that starts or ends after it
    (python/cpython#106883, fixed in 3.12; the same pause is the fix proposed for 3.11)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return sys._current_frames().get(ident or -1)
    finally:
        if enabled:
            gc.enable()


def _where(frame: FrameType | None, depth: int = 3) -> str:
    """The innermost `depth` frames of a stack as `file:line in function`, innermost last."""
    if frame is None:
        return "unknown"
    frames = traceback.extract_stack(frame)[-depth:]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames))


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


HEARTBEAT_PREFIX = (
    "bridgerec-heartbeat-"  # + "<pid namespace>.<pid>-" of the watching process + mkstemp's part
)
STALE_UNOWNED_S = (
    24 * 3600.0
)  # a heartbeat file that names no process (before 2026-12-07) is stale after this
_OWNER = re.compile(r"(?P<ns>\d+)\.(?P<pid>\d+)-")


def pid_namespace() -> int:
    """The inode of this process's PID namespace (0 where /proc does not say): a pid means a process
    only within its namespace, and containers sharing one /tmp have namespaces of their own."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def heartbeat_prefix() -> str:
    """`bridgerec-heartbeat-<pid namespace>.<pid>-`: the start of this process's heartbeat file names."""
    return f"{HEARTBEAT_PREFIX}{pid_namespace()}.{os.getpid()}-"


def remove_stale_heartbeat_files(directory: str | None = None) -> list[str]:
    """Delete this user's heartbeat files in `directory` (the temp folder) whose process is gone: a stage
    process ended by SIGKILL (the OOM killer, `kill -9`) or by `os._exit` cannot delete its own, and every
    such night left one behind for good. A file names its process and that process's PID namespace; only
    files of this namespace are judged (another container's pids mean other processes), and one of the
    older form, naming no process, goes when a day old. Returns the paths deleted."""
    directory = directory or tempfile.gettempdir()
    here, removed = pid_namespace(), []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(HEARTBEAT_PREFIX) or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if st.st_uid != os.getuid():
                    continue
                owner = _OWNER.match(entry.name, len(HEARTBEAT_PREFIX))
                if owner is None:
                    gone = time.time() - st.st_mtime > STALE_UNOWNED_S
                else:
                    gone = here != 0 and int(owner["ns"]) == here and _process_gone(int(owner["pid"]))
                if gone:
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Watchdog:
    """Guards a block (`with Watchdog("train", 1800):`): `StageStalled` in the block's thread when no
    progress step came for `stall_s` seconds. `stall_s` None: off. `check_s`: how often it looks."""

    def __init__(self, stage: str, stall_s: float | None, check_s: float | None = None) -> None:
        self.stage, self.stall_s = stage, stall_s
        self.check_s = check_s if check_s is not None else min(5.0, (stall_s or 5.0) / 10)
        self.message: str | None = None
        self._stop = threading.Event()
        self._target = threading.current_thread()
        self._file: str | None = None

    def _last_beat(self) -> float:
        """Seconds since the latest progress step, here or in a worker process."""
        idle = time.monotonic() - heartbeat.at
        if self._file is not None:
            with contextlib.suppress(OSError):
                idle = min(idle, time.time() - os.stat(self._file).st_mtime)
        return idle

    def _watch(self) -> None:
        """Look every `check_s`: past `stall_s` without a heartbeat, raise in the guarded thread (again
        at every look while it stays stalled: a handler that swallowed it gets it again); a block that
        is still stalled `grace` seconds later is stuck where no exception reaches: end the process."""
        assert self.stall_s is not None
        grace = max(GRACE_MIN_S, self.stall_s / 4)
        stalled_at: float | None = None
        while not self._stop.wait(self.check_s):
            idle = self._last_beat()
            if idle < self.stall_s:
                stalled_at = None  # it moved on
                continue
            if stalled_at is None:
                stalled_at = time.monotonic()
                frame = current_frame(self._target.ident)
                doing = f", last: {heartbeat.what}" if heartbeat.what else ""
                self.message = (
                    f"stage {self.stage} made no progress for {_duration(idle)} (runtime.stall_seconds = "
                    f"{self.stall_s:g}{doing}); stuck at {_where(frame)}. It was stopped: look there, or "
                    "raise runtime.stall_seconds if that step is legitimately that slow"
                )
                get_logger().error("watchdog: %s", self.message)
            elif time.monotonic() - stalled_at > grace:
                get_logger().critical(
                    "watchdog: stage %s did not stop when asked (stuck in native code?); ending the process",
                    self.stage,
                )
                if self._file is not None:  # os._exit skips the context's cleanup
                    with contextlib.suppress(OSError):
                        os.unlink(self._file)
                os._exit(1)
            self._interrupt()

    def _interrupt(self) -> None:
        """Raise StageStalled in the guarded thread: by a signal in the main thread (it interrupts a
        blocking system call), by an asynchronous exception elsewhere."""
        if self._target is threading.main_thread():
            signal.pthread_kill(self._target.ident or 0, signal.SIGUSR1)
        else:
            import ctypes

            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self._target.ident or 0), ctypes.py_object(StageStalled)
            )

    def _raise(self, signum: int, frame: FrameType | None) -> None:
        raise StageStalled(self.message or f"stage {self.stage} stalled")

    @contextlib.contextmanager
    def _heartbeat_file(self) -> Iterator[None]:
        remove_stale_heartbeat_files()
        fd, path = tempfile.mkstemp(prefix=heartbeat_prefix())
        os.close(fd)
        previous = os.environ.get(HEARTBEAT_ENV)
        os.environ[HEARTBEAT_ENV] = self._file = path
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(HEARTBEAT_ENV, None)
            else:
                os.environ[HEARTBEAT_ENV] = previous
            with contextlib.suppress(OSError):
                os.unlink(path)

    def __enter__(self) -> Watchdog:
        if self.stall_s is None:
            return self
        heartbeat.beat(f"{self.stage} starting")
        self._exit = contextlib.ExitStack()
        self._exit.enter_context(self._heartbeat_file())
        if self._target is threading.main_thread():
            previous = signal.signal(signal.SIGUSR1, self._raise)
            self._exit.callback(signal.signal, signal.SIGUSR1, previous)
        self._thread = threading.Thread(target=self._watch, name=f"watchdog-{self.stage}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stall_s is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._exit.close()

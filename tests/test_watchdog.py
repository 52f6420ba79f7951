"""No stage can hang without end: the stall watchdog (runtime/watchdog.py) fed by the progress reporting
(runtime/progress.py), and the stages' time budgets (Prefect's timeout_seconds on the stage's flow run,
flows/stage.py). Real stalled functions, real threads and processes, a real Prefect flow run."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bridgerec.config import RuntimeSettings, StageTimeouts, load_settings
from bridgerec.runtime.progress import advance, progress_bar
from bridgerec.runtime.watchdog import (
    StageOverBudget,
    StageStalled,
    Watchdog,
    pid_namespace,
    remove_stale_heartbeat_files,
)


def wait_for_a_lock_nobody_releases() -> None:
    """A step that starts, reports one step of progress, then waits for ever (a lock never released,
    as a dead peer or a deadlock leaves it)."""
    with progress_bar("loading shards", total=10, unit="shards") as bar:
        advance(bar, 1)
        never = threading.Lock()
        never.acquire()
        never.acquire()  # blocks: nobody releases it


def slow_but_moving(seconds: float, every: float) -> int:
    steps = 0
    with progress_bar("slow steps", total=None) as bar:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(every)
            advance(bar, 1)
            steps += 1
    return steps


@pytest.fixture(autouse=True)
def warm() -> None:
    """The progress bars' imports done before a watchdog of a second times them (a loaded machine
    takes longer than that to import rich's renderers the first time)."""
    slow_but_moving(0.05, every=0.01)


def test_a_stalled_step_fails_with_where_it_is_stuck() -> None:
    started = time.monotonic()
    with pytest.raises(StageStalled) as info, Watchdog("demo", stall_s=1.0, check_s=0.1):
        wait_for_a_lock_nobody_releases()
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert message.startswith("stage demo made no progress for ") and "runtime.stall_seconds = 1" in message
    assert "last: loading shards" in message
    assert "in wait_for_a_lock_nobody_releases" in message  # where the stack was
    assert "raise runtime.stall_seconds" in message


def test_slow_progress_is_not_a_stall() -> None:
    with Watchdog("demo", stall_s=1.0, check_s=0.1):
        assert slow_but_moving(3.0, every=0.3) >= 5  # 3 s of work, never 1 s without a step


def test_the_watchdog_is_off_without_a_limit_and_leaves_no_trace() -> None:
    import os
    import signal

    before = signal.getsignal(signal.SIGUSR1)
    with Watchdog("demo", stall_s=None):
        time.sleep(0.2)
    with Watchdog("demo", stall_s=5.0, check_s=0.1):
        assert Path(os.environ["BRIDGEREC_HEARTBEAT_FILE"]).exists()
    assert "BRIDGEREC_HEARTBEAT_FILE" not in os.environ and signal.getsignal(signal.SIGUSR1) == before


def _worker(seconds: float) -> None:
    slow_but_moving(seconds, every=0.3)
    # A forked child inherits the test process's multiprocessing finalizers (Ray's, Prefect's, from
    # tests run before), whose cleanup can fail in the child and turn exit code 0 into 1: leave at once.
    os._exit(0)


def _stalled_worker() -> None:
    with progress_bar("worker", total=2) as bar:
        advance(bar, 1)
        time.sleep(60)


def test_progress_in_a_worker_process_counts() -> None:
    """`runtime.runner: processes`: the steps run in worker processes, the stage's thread only waits on
    them; their progress reaches the watchdog through the heartbeat file."""
    ctx = multiprocessing.get_context("fork")  # (spawn would spend the stall limit importing)
    with Watchdog("demo", stall_s=1.5, check_s=0.1):
        proc = ctx.Process(target=_worker, args=(4.0,))
        proc.start()
        proc.join()
    assert proc.exitcode == 0
    with pytest.raises(StageStalled), Watchdog("demo", stall_s=1.5, check_s=0.1):
        stuck = ctx.Process(target=_stalled_worker)
        stuck.start()
        try:
            stuck.join()
        finally:
            stuck.kill()
            stuck.join()


def test_a_stalled_stage_fails_its_flow_run(prefect_harness: None) -> None:
    """A stage row whose run stalls, as a real Prefect flow run of the stage flow: the flow fails with
    StageStalled, and the message reaches the caller."""
    from bridgerec.flows.stage import flow_for
    from bridgerec.stages import STAGE, Stage
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks import StageRun

    def stalls(run: StageRun[object]) -> object:
        wait_for_a_lock_nobody_releases()
        raise AssertionError("unreachable")

    stage = Stage(
        "stalls", lambda s: s.ingest, stalls, STAGE["ingest"].summary, lambda run: None, about="a test"
    )
    flow = flow_for(stage, RuntimeSettings(stall_seconds=1.0))
    started = time.monotonic()
    with pytest.raises(StageStalled, match="stage stalls made no progress"):
        flow(StageRun(object(), Workspace(Path("unused"))), None)
    assert time.monotonic() - started < 60


def test_a_stage_past_its_budget_fails_naming_the_budget(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingest stage with a budget of 50 ms (no flow run finishes that fast): Prefect stops the flow
    run, the caller gets StageOverBudget naming the stage, the budget and its key."""
    from bridgerec.flows.stage import run_stage

    cases = Path(__file__).resolve().parent / "cases" / "23-diverged-training"
    settings = load_settings(
        None,
        {
            "workspace": str(tmp_path / "ws"),
            "ingest.items": str(cases / "items.csv"),
            "ingest.interactions": str(cases / "interactions.csv"),
            "runtime.stage_timeout_seconds.ingest": 0.05,
        },
    )
    with pytest.raises(StageOverBudget) as info:
        run_stage("ingest", settings)
    assert str(info.value).startswith(
        "stage ingest ran past its time budget of 0.05 s (runtime.stage_timeout_seconds.ingest)"
    )
    assert not (tmp_path / "ws" / "ingest").exists()  # nothing half-written


def test_budgets_and_stall_limit_come_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGEREC_RUNTIME__STAGE_TIMEOUT_SECONDS__TRAIN", "600")
    monkeypatch.setenv("BRIDGEREC_RUNTIME__STALL_SECONDS", "120")
    runtime = load_settings(None).runtime
    assert runtime.stage_timeout_seconds.train == 600 and runtime.stall_seconds == 120
    assert StageTimeouts().enrich == 24 * 3600


# Reading another thread's frame while the collector frees a threading.local: on CPython 3.11 this
# deadlocks inside sys._current_frames() (python/cpython#106883), which hung a CI run's watchdog test
# for good on a loaded machine. A subprocess, so that a deadlock fails the test instead of hanging it.
FRAMES_UNDER_GC = """
import gc, sys, threading
from bridgerec.runtime.watchdog import current_frame

def read(ident):
    return sys._current_frames().get(ident) if sys.argv[1] == "raw" else current_frame(ident)

def garbage_local():
    local = threading.local()
    local.me = local  # a cycle: only a collection frees it

def watcher(target):
    for _ in range(2000):
        garbage_local()
        assert read(target) is not None

gc.set_threshold(1)  # a collection at nearly every allocation, inside the frame reading too
thread = threading.Thread(target=watcher, args=(threading.main_thread().ident,))
thread.start()
thread.join()
print("read 2000 frames")
"""


def _read_frames_under_gc(how: str, timeout: float) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            [sys.executable, "-c", FRAMES_UNDER_GC, how], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None  # deadlocked


def test_reading_where_a_thread_is_does_not_deadlock_with_the_collector() -> None:
    done = _read_frames_under_gc("watchdog", timeout=120)
    assert done is not None, "current_frame deadlocked"
    assert done.returncode == 0 and "read 2000 frames" in done.stdout, done.stderr
    if sys.version_info < (3, 12):  # the interpreter's bug the watchdog steps around is still there
        assert _read_frames_under_gc("raw", timeout=20) is None


HUNG_TEST = """
import threading


def test_hangs():
    never = threading.Lock()
    never.acquire()
    never.acquire()  # blocks in C: no signal handler runs here
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_a_hung_test_is_ended_by_the_suite_s_timeout(tmp_path: Path, workers: int) -> None:
    """The suite's own guard (pyproject.toml: faulthandler's stack dump, then pytest-timeout's `thread`
    method): a test blocked in C on a lock nobody releases ends with every thread's stack in the output,
    not when CI's limit kills the job; under xdist (as scripts/test.sh runs it) once, the test named, not
    once per replacement worker. The project's pytest configuration with 2 and 4 s instead of 870 and
    900 s."""
    (tmp_path / "test_hung.py").write_text(HUNG_TEST)
    (tmp_path / "test_fine.py").write_text("def test_fine():\n    pass\n")
    config = Path(__file__).resolve().parents[1] / "pyproject.toml"
    xdist = ["-n", str(workers), "--dist", "loadfile"] if workers else []
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(config), "--rootdir", str(tmp_path), "-p", "no:cacheprovider",
         "-o", "faulthandler_timeout=2", "-o", "timeout=4", *xdist, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Timeout (0:00:02)!" in output and "in test_hangs" in output, output  # the stack dump
    if workers:
        assert "crashed while running 'test_hung.py::test_hangs'" in output, output
        assert "1 failed, 1 passed" in output, output  # not started again on a replacement worker
    else:
        assert "1 failed, 1 passed" not in output  # without xdist the process itself ends: no summary
    assert time.monotonic() - started < 60


_IGNORES_THE_STOP = """
import os, sys, time
from bridgerec.runtime import watchdog
watchdog.GRACE_MIN_S = 0.5  # the grace before ending the process (30 s at least in a real stage)
with watchdog.Watchdog("demo", stall_s=1.0, check_s=0.1):
    print(os.environ[watchdog.HEARTBEAT_ENV], flush=True)
    while True:  # a step that swallows the stop, as native code that never returns to Python would
        try:
            time.sleep(60)
        except watchdog.StageStalled:
            pass
"""


def test_a_stage_that_ignores_the_stop_ends_the_process_and_leaves_no_heartbeat_file() -> None:
    """The last resort: a stalled step that does not stop when asked ends the process (exit 1) once the
    grace is over, and its heartbeat file goes with it (os._exit skips the usual cleanup)."""
    done = subprocess.run(
        [sys.executable, "-c", _IGNORES_THE_STOP], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    heartbeat = Path(done.stdout.strip())
    assert heartbeat.name.startswith("bridgerec-heartbeat-")
    assert not heartbeat.exists()
    assert "did not stop when asked" in done.stderr


_KILLED_MID_STAGE = """
import os, signal, sys, time
from bridgerec.runtime.watchdog import Watchdog
with Watchdog("train", 600):
    print(os.environ["BRIDGEREC_HEARTBEAT_FILE"], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer ends a stage: no cleanup runs
"""


def test_a_killed_stage_s_heartbeat_file_goes_with_the_next_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage process ended by SIGKILL cannot delete its heartbeat file: the next watchdog on the machine
    deletes it, since the process the file names is gone, and keeps those of live processes (another
    stage running beside it), those of other PID namespaces (a container sharing /tmp: the same pid is
    another process there) and unnamed ones younger than a day (the older form, which lingered)."""
    env = os.environ | {"TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_STAGE], capture_output=True, text=True, env=env)
    assert done.returncode == -9, done.stderr
    killed = Path(done.stdout.strip())
    assert killed.parent == tmp_path and killed.exists()  # left behind, as before
    ns = pid_namespace()
    alive = tmp_path / f"bridgerec-heartbeat-{ns}.{os.getppid()}-live"
    elsewhere = tmp_path / f"bridgerec-heartbeat-{ns + 1}.{killed.name.split('.')[1]}"  # another container's
    unnamed_old, unnamed_new = (
        tmp_path / "bridgerec-heartbeat-abc123",
        tmp_path / "bridgerec-heartbeat-def456",
    )
    for path in (alive, elsewhere, unnamed_old, unnamed_new):
        path.touch()
    os.utime(unnamed_old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with Watchdog("train", 600):  # the next stage on the machine
        mine = Path(os.environ["BRIDGEREC_HEARTBEAT_FILE"])
        assert mine.name.startswith(f"bridgerec-heartbeat-{ns}.{os.getpid()}-") and mine.parent == tmp_path
    assert not killed.exists() and not unnamed_old.exists() and not mine.exists()
    assert alive.exists() and elsewhere.exists() and unnamed_new.exists()
    assert remove_stale_heartbeat_files(str(tmp_path)) == []

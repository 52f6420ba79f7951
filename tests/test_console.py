"""What the terminal shows (bridgerec/runtime/console.py): bridgerec's own sentences and results, while
third-party output, written by Python code, by C code straight to fd 2 or by child processes, goes to the
command's log file in the workspace. Run in subprocesses: the session moves the process's descriptors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bridgerec.runtime import console
from tests.enrich_data import slice_workspace

SCRIPT = textwrap.dedent(
    """
    import ctypes, json, os, subprocess, sys, warnings
    from pathlib import Path
    from bridgerec.runtime import console
    from bridgerec.runtime.logs import DETAIL, get_logger

    level = "WARNING" if sys.argv[2] == "warning" else "INFO"
    with console.session(Path(sys.argv[1]), "demo", verbose=sys.argv[2] == "verbose", log_level=level) as path:
        log = get_logger()
        log.info("demo: %s rows read, %s kept", f"{8896:,}", f"{8896:,}")
        log.info("demo: per-epoch figures", extra=DETAIL)
        log.warning("demo: 3 users have fewer than k items")
        warnings.warn("reduce_op is deprecated", FutureWarning)
        libc = ctypes.CDLL(None)
        libc.write(2, b"[W utils.cpp:68] NUMA binding notice from C\\n", 44)
        subprocess.run(["sh", "-c", "echo child process notice >&2; echo child stdout"], check=True)
        print("a stray print to stdout")
        console.out().write(json.dumps({"ok": True, "log": str(path)}) + "\\n")
    """
)


def _run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "ws"), mode],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_quiet_session_keeps_third_party_output_in_the_log_file(tmp_path: Path) -> None:
    done = _run(tmp_path, "quiet")
    assert done.returncode == 0, done.stderr
    # stdout: exactly the result
    assert done.stdout.count("\n") == 1, done.stdout
    log = Path(__import__("json").loads(done.stdout)["log"])
    assert log.parent == tmp_path / "ws" / "logs" and log.name.endswith("-demo.log")
    # stderr: bridgerec's sentence and warning, nothing else
    assert done.stderr.splitlines() == [
        "demo: 8,896 rows read, 8,896 kept",
        "warning: demo: 3 users have fewer than k items",
    ]
    text = log.read_text()
    for noise in (
        "FutureWarning: reduce_op is deprecated",
        "NUMA binding notice from C",
        "child process notice",
        "child stdout",
        "a stray print to stdout",
        "demo: per-epoch figures",  # details are in the file
        "demo: 8,896 rows read",
    ):
        assert noise in text, noise


def test_verbose_session_shows_everything_and_writes_no_file(tmp_path: Path) -> None:
    done = _run(tmp_path, "verbose")
    assert done.returncode == 0, done.stderr
    both = done.stdout + done.stderr
    for noise in ("FutureWarning", "NUMA binding notice from C", "child process notice", "a stray print"):
        assert noise in both, noise
    assert '"log": "None"' in done.stdout
    assert not (tmp_path / "ws" / "logs").exists()


def test_log_level_warning_keeps_bridgerec_info_lines_out_of_terminal_and_file(tmp_path: Path) -> None:
    """`runtime.log_level: WARNING`: bridgerec's own info and detail lines are neither shown nor logged,
    its warnings are; third-party output still goes to the file (the setting was accepted and read by
    nothing until a contributor's audit)."""
    done = _run(tmp_path, "warning")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["warning: demo: 3 users have fewer than k items"]
    text = Path(__import__("json").loads(done.stdout)["log"]).read_text()
    assert "demo: 3 users have fewer than k items" in text and "NUMA binding notice from C" in text
    assert "demo: 8,896 rows read" not in text and "demo: per-epoch figures" not in text


TTY_SCRIPT = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    from bridgerec.runtime import console, progress

    engine_log = logging.getLogger("enginelike")
    with console.session(Path(sys.argv[1]), "demo", verbose=sys.argv[2] == "verbose") as path:
        with progress.status("demo: starting an engine"):
            # as vLLM's logger: a handler on sys.stdout, made when vLLM is first imported (in the block)
            engine_log.addHandler(logging.StreamHandler(sys.stdout))
            engine_log.warning("WARNING libtcmalloc is not found in LD_PRELOAD")
            print("Loading safetensors checkpoint shards", file=sys.stderr)
            time.sleep(0.3)
        with progress.progress_bar("demo: texts", total=2, unit="texts") as bar:
            print("a stray print while the bar is drawn")
            progress.advance(bar, 2)
        engine_log.warning("WARNING a later engine notice")  # the handler outlives the spinner
        console.out().write(f"log={path}\\n")
    """
)


def _run_on_a_terminal(tmp_path: Path, mode: str) -> str:
    """The script under a pseudo-terminal (rich draws its spinner and bars only on one); what the
    terminal received."""
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV} | {"COLUMNS": "120"}
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", TTY_SCRIPT, str(tmp_path / "ws"), mode],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, shown.decode(errors="replace")
    return shown.decode(errors="replace")


def test_a_spinner_or_bar_on_a_terminal_leaves_third_party_lines_in_the_log(tmp_path: Path) -> None:
    """rich's spinner and bars take over sys.stdout/sys.stderr on a terminal and print what Python code
    writes there above themselves. In a quiet session that sent vLLM's engine-start notices (its logger
    writes to sys.stdout) to the terminal, tangled with the spinner (a user's trial under a real
    terminal; pipes never showed it): now they stay in the log file; under --verbose they show."""
    shown = _run_on_a_terminal(tmp_path, "quiet")
    noise = (
        "libtcmalloc is not found",
        "Loading safetensors",
        "a stray print while the bar",
        "a later engine notice",
    )
    for text in noise:
        assert text not in shown, shown
    assert "demo: texts" in shown  # the bar itself is drawn
    log = Path(shown.split("log=")[1].split()[0])
    for text in noise:
        assert text in log.read_text(), text
    verbose = _run_on_a_terminal(tmp_path, "verbose")
    for text in noise:
        assert text in verbose, text


def test_old_log_files_are_pruned(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"2026120{i}T000000Z-run.log").write_text("x")
    gone = console.prune_logs(tmp_path, keep=2)
    assert [p.name[:9] for p in gone] == ["20261200T", "20261201T", "20261202T"]
    assert sorted(p.name[:9] for p in tmp_path.glob("*.log")) == ["20261203T", "20261204T"]


THIRD_PARTY = (
    "WARNING",
    "Warning",
    "already registered",
    "FutureWarning",
    "NUMA",
    "set_num_threads",
    "Triton",
    "Flow run",
    "Task run",
    "prefect",
    "it/s]",
)


@pytest.mark.slow
def test_enrich_command_shows_bridgerec_lines_and_keeps_the_rest_in_the_log(tmp_path: Path) -> None:
    """`bridgerec enrich` as a user runs it (a subprocess, both vLLM engines started): the terminal gets
    the log file's path, bridgerec's sentences, its bars and the summary, nothing from vLLM, torch or
    Prefect; the log file holds those."""
    ws = slice_workspace(tmp_path / "data", n_users=6, both_domains=2)
    config = tmp_path / "config.yaml"
    config.write_text(
        "enrich: {local_dim: 8, kmeans_k: 4}\n"
        "profiles: {max_users: 2, analyzer_max_tokens: 16, summarizer_max_tokens: 32, titles_per_cluster: 5}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV}
    # A wide terminal: the count is of the lines written, not of pytest's long paths wrapped at 80.
    env["COLUMNS"] = "160"
    done = subprocess.run(
        [sys.executable, "-m", "bridgerec.cli", "enrich", "--config", str(config), "-w", str(ws.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # the terminal: both streams, in order
        text=True,
        timeout=900,
        env=env,
    )
    terminal = done.stdout.splitlines()
    assert done.returncode == 0, "\n".join(terminal)
    noise = [line for line in terminal if any(word in line for word in THIRD_PARTY)]
    assert not noise, "\n".join(terminal)
    bars = [line for line in terminal if "━" in line]
    # The packaged LLM's one-time conversion (first use on a machine, as in CI's fresh clone) says so in
    # up to three `models:` lines; they are bridgerec's, but not part of every run.
    once = [line for line in terminal if line.startswith("models: ")]
    assert len(terminal) - len(bars) - len(once) <= 20, "\n".join(terminal)
    assert terminal[0].startswith("log: ") and any(
        "enrich: generated 2 profiles" in line for line in terminal
    )
    log = Path(terminal[0].split()[1])
    assert log.parent == ws.root / "logs"
    text = log.read_text()
    assert "Beginning flow run" in text  # Prefect's own log lines
    assert "set_num_threads" in text or "NUMA" in text  # vLLM's / torch's C++ notices
    assert "enrich: generated 2 profiles" in text  # bridgerec's lines are in the file too


def test_the_morning_read_is_drawn_on_a_terminal_and_kept_as_markdown_in_a_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`bridgerec run`'s summary is Markdown: on a terminal it is rendered (the table drawn, no `**` or
    `[...](file://...)` left); written to a pipe or a file it stays Markdown, as written."""
    import io

    from bridgerec.cli import print_markdown

    text = "# night: completed\n\n| stage | did |\n|---|---|\n| train | did |\n\n- gate: **first**: ok\n"
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    print_markdown(text)
    assert piped.getvalue() == text + "\n"

    leader, follower = os.openpty()
    with open(follower, "w", closefd=True) as tty:
        monkeypatch.setattr(sys, "stdout", tty)
        print_markdown(text)
        tty.flush()
        monkeypatch.undo()
        shown = os.read(leader, 65536).decode()
    os.close(leader)
    assert "night: completed" in shown and "first" in shown and "train" in shown
    assert "**" not in shown and "|---|" not in shown and "─" in shown, shown

"""The stage commands' first answers: a wrong or empty workspace, or one another process is writing, is one
`error:` line (exit 2) before torch, vLLM and Prefect are imported; and the night summary's report path
is plain text a terminal can copy."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bridgerec.cli import _check_inputs_quickly, app, print_night_summary
from bridgerec.config import load_settings

# Runs the command line in a fresh interpreter, then says which engines it had imported by its answer
# ('torch' in sys.modules could not tell in this process: other tests import torch).
_INVOKE = """
import sys
from bridgerec.cli import main
sys.argv = ["bridgerec", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    # A package counts once its submodules are (a lazy module stands in sys.modules alone).
    heavy = sorted(m for m in ("torch", "vllm", "faiss") if any(n.startswith(m + ".") for n in sys.modules))
    heavy += ["bridgerec.flows.stage"] if "bridgerec.flows.stage" in sys.modules else []
    print(f"exit {exc.code} heavy {','.join(heavy) or '-'}")
"""


def _env() -> dict[str, str]:
    """This environment without any BRIDGEREC_* setting (the commands below name their workspace)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BRIDGEREC_")}


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (
            "train",
            "train inputs not found (run ingest/enrich first): ingest/sequences: {ws}/ingest/sequences.parquet; "
            "ingest/items: {ws}/ingest/items.parquet; enrich/item_vectors: {ws}/enrich/item_vectors.parquet",
        ),
        ("enrich", "no finished ingest in {ws}/ingest: run `bridgerec ingest` first"),
        ("publish", "no trained model in {ws}/train: run `bridgerec train` first"),
    ],
)
def test_a_stage_on_a_missing_workspace_fails_before_the_engines_are_imported(
    command: str, error: str, tmp_path: Path
) -> None:
    """`bridgerec train -w no-such-ws` gave its one line after ~15 s (42 s under load): the stage table
    imports torch and vLLM, the stage flow Prefect's flow engine, before the inputs were checked (a user's
    trial). Now the line, the same as before, comes before any of them is imported (Prefect's settings
    are read first, for an unreachable API: case 26), and nothing is made there."""
    ws = tmp_path / "no-such-ws"
    done = subprocess.run(
        [sys.executable, "-c", _INVOKE, command, "-w", str(ws)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_env(),
    )
    assert done.stdout.strip().splitlines()[-1] == "exit 2 heavy -", done.stdout + done.stderr
    assert done.stderr == "error: " + error.format(ws=ws) + "\n"
    assert not ws.exists()


@pytest.mark.parametrize(
    ("name", "sets"),
    [
        ("ingest", {"ingest.source": "generic", "ingest.items": "missing-items.csv"}),
        ("enrich", {}),
        ("train", {}),
        ("train", {"train.model": "sasrec"}),  # no LLM tables: the enrich outputs are not inputs
        ("publish", {}),
    ],
)
@pytest.mark.parametrize("partial", [False, True])
def test_the_quick_check_says_what_the_stage_check_says(
    name: str, sets: dict[str, Any], partial: bool, tmp_path: Path
) -> None:
    """The check the command makes before the engines are imported (`_check_inputs_quickly`) raises the
    same error as the stage table's check (bridgerec/stages.py), on an empty workspace and on one with
    ingest's files but nothing after; where it lets a workspace through, so does the stage's check."""
    from bridgerec.stages import STAGE

    ws = tmp_path / "ws"
    if partial:
        (ws / "ingest").mkdir(parents=True)
        for table in ("sequences", "items"):
            (ws / "ingest" / f"{table}.parquet").write_bytes(b"")
    settings = load_settings(None, {"workspace": str(ws), **sets})
    check = STAGE[name].check
    assert check is not None

    def outcome(call: Any) -> tuple[type[BaseException], str] | None:
        try:
            call()
        except (FileNotFoundError, ValueError) as exc:
            return type(exc), str(exc)
        return None

    stage = outcome(lambda: check(STAGE[name].stage_run(settings)))
    quick = outcome(lambda: _check_inputs_quickly(name, settings))
    if stage is None:  # nothing missing for it (sasrec reads ingest's files only): none for the quick check
        assert name == "train" and partial and quick is None, quick
        return
    assert quick is not None and quick[1] == stage[1], (quick, stage)


_HOLD_THE_WORKSPACE = """
import sys, time
from bridgerec.storage.workspace import Workspace
with Workspace(sys.argv[1]).writing("nightly"):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_stage_on_a_workspace_a_night_is_writing_says_so_first(tmp_path: Path) -> None:
    """While `bridgerec run` was in its enrich stage, `bridgerec train` said its enrich inputs were missing
    (they were being written), where `bridgerec ingest` named the night's process. Now train, enrich and
    publish say what ingest says, before any input is checked (exit 2, one line); once the night is
    gone, the missing inputs are the answer again, and the probe left no holder's note behind."""
    ws = tmp_path / "ws"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_THE_WORKSPACE, str(ws)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        for command in ("train", "enrich", "publish"):
            out = CliRunner().invoke(app, [command, "-w", str(ws)])
            assert out.exit_code == 2, out.output
            assert out.stderr.startswith(f"error: workspace {ws} is being written by pid {holder.pid} on ")
            assert "(nightly, since " in out.stderr and out.stderr.count("\n") == 1, out.stderr
        out = CliRunner().invoke(app, ["publish", "-w", str(ws), "--run-id", "pop-0123456789ab"])
        assert out.exit_code == 2 and "is being written by pid" in out.stderr, out.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    out = CliRunner().invoke(app, ["train", "-w", str(ws)])
    assert out.exit_code == 2 and out.stderr.startswith("error: train inputs not found"), out.output
    assert not (ws / ".bridgerec.lock.json").exists()


_ESCAPES = re.compile(r"\x1b\][^\x1b]*\x1b\\|\x1b\[[0-9;]*m")  # OSC 8 hyperlinks and colours


def _read_all(leader: int) -> str:
    """Everything written to a pseudo-terminal whose other end is closed (one `os.read` returned part of
    it under load: a CI rehearsal)."""
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: nothing more, the other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_the_night_summary_prints_the_report_path_as_plain_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The summary's last bullet was a Markdown link that an 80-column terminal showed as its source,
    broken over three lines. Now the path is plain text, whole on one line (on a terminal also a link to
    the page), in a pipe and on a terminal, after the other bullets and before `Next:`."""
    import io

    from bridgerec.flows.night import NightSummary, summary_markdown

    report = tmp_path / "a-rather-long-workspace-folder-name" / "reports" / "night-20261207T021500Z-abc.html"
    night = NightSummary(
        night_id="night-20261207T021500Z-abc",
        status="completed",
        workspace=str(tmp_path),
        warehouse=str(tmp_path / "warehouse.duckdb"),
        report=str(report),
    )
    text = summary_markdown(night)
    assert len(f"- night report: {report}") > 80

    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    print_night_summary(night)
    # the artifact's Markdown (a link) and the piped text differ by the link alone
    assert piped.getvalue().rstrip("\n") == text.replace(f"[{report}]({report.as_uri()})", str(report))
    lines = piped.getvalue().splitlines()
    assert f"- night report: {report}" in lines and "](" not in piped.getvalue()
    assert lines.index(f"- night report: {report}") < next(
        i for i, s in enumerate(lines) if s.startswith("Next:")
    )

    monkeypatch.setenv("COLUMNS", "80")
    leader, follower = os.openpty()
    with open(follower, "w", closefd=True) as tty:
        monkeypatch.setattr(sys, "stdout", tty)
        print_night_summary(night)
        tty.flush()
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    shown = _read_all(leader)  # the writer is closed: read to the end, not one read's worth
    os.close(leader)
    visible = _ESCAPES.sub("", shown).replace("\r", "")
    assert f"• night report: {report}\n" in visible, visible
    assert "](" not in visible and "file://" not in visible
    assert report.as_uri() in shown  # the hyperlink's target
    assert visible.index("night report") < visible.index("Next:")

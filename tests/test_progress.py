"""Progress lines in the run log for long phases: done/total, rate and ETA at least every interval, from a
timer (a slow step between two advances still gets a line), with bars on or off."""

from __future__ import annotations

import io
import logging
import time

import pytest

from bridgerec.runtime import progress


@pytest.mark.parametrize("bars", [True, False])
def test_long_phase_logs_rate_and_eta_every_interval(
    bars: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(progress.LOG_SECONDS_ENV, "0.2")
    progress.set_enabled(bars)
    try:
        with (
            caplog.at_level(logging.INFO, logger="bridgerec"),
            progress.progress_bar("enrich: profiles", total=8, unit="users") as bar,
        ):
            for _ in range(4):
                time.sleep(0.1)
                progress.advance(bar, 1)
            time.sleep(0.5)  # one slow step: the timer still reports
            progress.advance(bar, 4)
    finally:
        progress.set_enabled(True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert len(lines) >= 3, lines
    assert any("/8 users (" in line and "users/s" in line and "ETA" in line for line in lines[:-1])
    assert lines[-1].startswith("progress: enrich: profiles: 8/8 users (100%)")


def test_short_phase_stays_quiet(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(progress.LOG_SECONDS_ENV, "60")
    with caplog.at_level(logging.INFO, logger="bridgerec"), progress.progress_bar("x", total=2) as bar:
        progress.advance(bar, 2)
    assert not [r for r in caplog.records if r.getMessage().startswith("progress: ")]


def test_a_bar_stopped_by_an_error_says_so_and_gives_no_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure inside a bar leaves its last frame above the `error:` line: it says `(stopped)` and shows
    no ETA (it showed the frame as if the work were still running); a bar that ran to its end keeps its
    ETA column."""
    stream = io.StringIO()
    monkeypatch.setattr(progress.console, "err", lambda: stream)
    with (
        pytest.raises(RuntimeError),
        progress.progress_bar("enrich: embedding", total=10, unit="items") as bar,
    ):
        progress.advance(bar, 4)
        raise RuntimeError("engine died")
    stopped = stream.getvalue().rstrip().splitlines()[-1]
    assert "enrich: embedding (stopped)" in stopped and "4/10" in stopped and "ETA" not in stopped
    stream.seek(0), stream.truncate()
    with progress.progress_bar("enrich: embedding", total=10, unit="items") as bar:
        progress.advance(bar, 10)
    done = stream.getvalue().rstrip().splitlines()[-1]
    assert "(stopped)" not in done and "10/10" in done and "ETA 0:00:00" in done
    assert " items/s " in done  # the rate names its unit (it read as tokens/s beside a tokens counter)


def test_a_bar_stopped_before_its_first_step_leaves_only_the_error_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad input file stopped ingest's bar at 0 of 7 steps, and the terminal kept an empty bar marked
    `(stopped)` above the `error:` line (a user's trial). A bar with no step done is taken off: what the
    terminal keeps of it is nothing."""
    for width in (130, 80):  # one line, and two below progress.NARROW_WIDTH
        stream = io.StringIO()
        monkeypatch.setattr(progress.console, "err", lambda s=stream: s)
        monkeypatch.setattr(progress, "OFF_TERMINAL_WIDTH", width)
        with (
            pytest.raises(ValueError),
            progress.progress_bar("ingest: reading raw files", total=7) as bar,
        ):
            raise ValueError("items.csv: cannot read the CSV header")
        assert bar is not None and "reading raw files" not in stream.getvalue(), width


def test_off_a_terminal_a_bar_with_training_counters_stays_on_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stderr to a file: the training's bar (a long description, loss and validation counters) ends on one
    line with its ETA, not wrapped onto a second."""
    stream = io.StringIO()
    monkeypatch.setattr(progress.console, "err", lambda: stream)
    with progress.progress_bar(
        "train: llm4cdsr-hybrid-bb05a110e130 epoch 4 of at most 20", total=1_234, unit="batches",
        counters=("loss", "valid NDCG@10"),
    ) as bar:  # fmt: skip
        progress.advance(bar, 1_234, loss=3.2104, **{"valid NDCG@10": 0.0591})
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1 and "1234/1234" in lines[0] and lines[0].rstrip().endswith("ETA 0:00:00"), lines


def test_on_a_narrow_terminal_a_bar_keeps_its_figures_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 80 columns the description takes a line of its own and the bar's figures stay whole: on one line
    rich cut the figures themselves ("35… users", "0:… ETA", a user's trial in an 80-column terminal). A
    wide terminal keeps one line, the description cut with an ellipsis before any figure."""
    from rich.console import Console

    label = "train llm4cdsr-hybrid epoch 2 of at most 20, loss 8.0574, best valid 0.1234"
    for width in (80, 100, 140):
        stream = io.StringIO()
        terminal = Console(file=stream, width=width)
        monkeypatch.setattr(progress, "_terminal", lambda terminal=terminal: terminal)
        with progress.progress_bar(label, total=160, unit="batches") as bar:
            progress.advance(bar, 18)
        lines = [line for line in stream.getvalue().splitlines() if line.strip()]
        assert all(len(line.rstrip()) <= width for line in lines), lines
        figures = lines[-1]
        assert "18/160 batches" in figures and "batches/s" in figures and "ETA" in figures, lines
        if width < progress.NARROW_WIDTH:
            assert lines[0].strip() == label and len(lines) == 2, lines
        else:
            assert len(lines) == 1 and lines[0].startswith("train llm4cdsr-hybrid"), lines

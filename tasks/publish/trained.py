"""Which trained run a publish scores: the train stage's best on the current inputs, or the one named
by `--run-id`, checked before anything is scored.

`find_trained_run` reads run records only (no torch, faiss or Prefect), so the CLI says a mistyped or
missing run in a second, before the stage's heavy imports; `resolve_trained_run` adds the check that a
named run was trained on today's catalogue, which loads it.
"""

from __future__ import annotations

import difflib

from bridgerec.runtime.errors import InputError
from bridgerec.storage.index_store import check_run_id
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.train import TrainedRun, TrainMissing, TrainOutputs


class PublishError(InputError):
    """Publishing cannot start: a missing or inconsistent input; the message says which."""


def _trained_runs_note(outputs: TrainOutputs, run_id: str, shown: int = 6) -> str:
    """What to add to "no trained run X": the workspace's complete trained runs, newest first (the
    leaderboard), and the closest to `run_id` (it pointed at a Parquet file)."""
    runs = [r.run_id for r in reversed(outputs.leaderboard())]
    if not runs:
        return "; this workspace has no trained run: run `bridgerec train` first"
    close = difflib.get_close_matches(run_id, runs, n=1)
    more = f" and {len(runs) - shown} more" if len(runs) > shown else ""
    hint = f"; did you mean {close[0]}?" if close else ""
    return f" (the trained runs, newest first: {', '.join(runs[:shown])}{more}){hint}"


def find_trained_run(workspace: Workspace, run_id: str | None = None) -> TrainedRun:
    """The trained run `run_id` (WORKSPACE/runs/<run_id>), or by default the best run of the train stage
    on the current inputs. Raises PublishError when there is none, when `run_id` is no id a run folder can
    have, or when the run is not complete (the message lists the workspace's runs and the closest id)."""
    outputs = TrainOutputs(workspace)
    try:
        if run_id is None:
            return outputs.best_run()
        return outputs.run(check_run_id(run_id))
    except TrainMissing as exc:
        raise PublishError(f"{exc}{'' if run_id is None else _trained_runs_note(outputs, run_id)}") from None
    except ValueError as exc:  # not an id a run folder can have
        raise PublishError(f"--run-id: {exc}") from None


def resolve_trained_run(workspace: Workspace, run_id: str | None = None) -> TrainedRun:
    """`find_trained_run`, and for a named run the check that it was trained on the workspace's current
    catalogue (it cannot score today's items otherwise; the best run is on the current inputs by
    definition). Raises PublishError."""
    trained = find_trained_run(workspace, run_id)
    if run_id is not None and (mismatch := TrainOutputs(workspace).catalogue_mismatch(trained)) is not None:
        raise PublishError(f"{mismatch}: it cannot score today's items; publish a run trained on them")
    return trained

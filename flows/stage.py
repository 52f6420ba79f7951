"""Flow: one stage of the pipeline, any row of the stage table (bridgerec/stages.py), as a Prefect flow
run named after the stage: check its inputs, run it, report.

Every step a stage calls through its runner is a task run of this flow (`TaskRuns`): one per shard, with
its own state, retries and logs. `runtime.runner` decides, in this one place for every stage, where the
mapped shards run: `local` (one after another in the flow's thread, sharing its engines) or `processes`
(`runtime.workers` worker processes, each with engines of its own).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from prefect import Flow, Task, flow, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.flow_engine import FlowRunTimeoutError  # (a TimeoutError: what a flow past its timeout raises)
from prefect.task_runners import ProcessPoolTaskRunner

from bridgerec.config import RuntimeSettings, Settings
from bridgerec.runtime.runner import Runner, step_of
from bridgerec.runtime.watchdog import StageOverBudget, Watchdog
from bridgerec.stages import STAGE, Stage, Summary
from bridgerec.tasks import StageRun

R = TypeVar("R")
T = TypeVar("T")


@functools.cache
def as_task(fn: Callable[..., Any]) -> Task[..., Any]:
    """`fn` as a Prefect task, named, retried and titled as its `step` declares. Stages skip unchanged
    work through their manifests and checkpoints, so Prefect's own result cache stays off."""
    s = step_of(fn)
    wrap = task(
        name=s.name,
        task_run_name=s.run_name,
        retries=s.retries,
        retry_delay_seconds=s.retry_delay_s,
        cache_policy=NO_CACHE,
    )
    return wrap(fn)


class TaskRuns(Runner):
    """A stage's steps as task runs of the current flow: `call` in the flow's thread, `map` in it too
    (`concurrent` False) or on the flow's task runner (`concurrent`: worker processes)."""

    def __init__(self, concurrent: bool) -> None:
        self.concurrent = concurrent

    def call(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        result: R = as_task(fn)(*args, **kwargs)
        return result

    def map(self, fn: Callable[..., R], shards: Sequence[T], *args: Any) -> list[R]:
        if self.concurrent:
            results: list[R] = as_task(fn).map(*(unmapped(a) for a in args), list(shards)).result()
            return results
        return [self.call(fn, *args, shard) for shard in shards]


def report(summary: Summary) -> None:
    """The stage's tables as artifacts of the flow run."""
    for table in summary.reports():
        create_table_artifact(key=table.key, table=table.rows, description=table.description)


def flow_for(stage: Stage[Any, Any], runtime: RuntimeSettings | None = None) -> Flow[..., Any]:
    """The Prefect flow of `stage`, its shards placed by `runtime` (default: local), its time budget
    (`runtime.stage_timeout_seconds`) and stall watchdog (`runtime.stall_seconds`) from `runtime`."""
    runtime = runtime or RuntimeSettings()
    budget = getattr(runtime.stage_timeout_seconds, stage.name, None)
    return _flow(stage, runtime.runner, runtime.workers, budget, runtime.stall_seconds)


@functools.cache
def _flow(
    stage: Stage[Any, Any], runner: str, workers: int, budget_s: float | None, stall_s: float | None
) -> Flow[..., Any]:
    concurrent = runner == "processes"

    def run_stage(run: StageRun[Any], options: dict[str, Any] | None = None) -> Any:
        run = replace(run, runner=TaskRuns(concurrent))
        with Watchdog(stage.name, stall_s):
            if stage.check is not None:
                run.runner.call(stage.check, run)
            if stage.sharded:  # its steps are the task runs
                summary = stage.run(run, **(options or {}))
            else:
                summary = run.runner.call(stage.run, run, **(options or {}))
        report(summary)
        return summary

    run_stage.__doc__ = f"The {stage.name} stage: {stage.about}."
    fl: Flow[..., Any] = flow(
        name=stage.name, log_prints=False, validate_parameters=False, timeout_seconds=budget_s
    )(run_stage)
    if concurrent:
        fl = fl.with_options(task_runner=ProcessPoolTaskRunner(max_workers=workers))  # type: ignore[arg-type]
    return fl


def run_stage(name: str, settings: Settings, *, force: bool = False, **options: Any) -> Any:
    """Run stage `name` as its flow with the settings tree's section; returns its typed summary.
    `options` go to the stage's run function (publish: `run_id`)."""
    stage = STAGE[name]
    try:
        return flow_for(stage, settings.runtime)(stage.stage_run(settings, force=force), options or None)
    except FlowRunTimeoutError:
        budget = getattr(settings.runtime.stage_timeout_seconds, name)
        raise StageOverBudget(
            f"stage {name} ran past its time budget of {budget:g} s (runtime.stage_timeout_seconds.{name}) "
            "and was stopped; what it finished is kept (a rerun resumes): raise the budget if the data grew, "
            "else look at the stage's progress in its log for where it slowed"
        ) from None

"""Flow: one stage of the pipeline, any row of the stage table (bridgerec/stages.py), as a Prefect flow
run named after the stage: check its inputs, run it, report.

Every step a stage calls through its runner is a task run of this flow (`TaskRuns`): one per shard, with
its own state, retries and logs. `runtime.runner` decides, in this one place for every stage, where the
mapped shards run: `local` (one after another in the flow's thread, sharing its engines), `processes`
(`runtime.workers` worker processes, each with engines of its own) or `ray` (Ray tasks on the cluster of
`runtime.ray.address`, each reserving the stage's `runtime.ray.resources`: flows/cluster.py).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from prefect import Flow, Task, flow, tags, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.flow_engine import FlowRunTimeoutError  # (a TimeoutError: what a flow past its timeout raises)
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from bridgerec.config import RuntimeSettings, Settings
from bridgerec.runtime.errors import is_transient
from bridgerec.runtime.logs import get_logger
from bridgerec.runtime.progress import advance, progress_bar
from bridgerec.runtime.runner import Runner, step_of
from bridgerec.runtime.watchdog import StageOverBudget, Watchdog
from bridgerec.stages import STAGE, Stage, Summary
from bridgerec.storage.workspace import Workspace
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
        retry_condition_fn=_transient_failure,
        cache_policy=NO_CACHE,
    )
    return wrap(fn)


def _transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition of every step: a failure the input causes (`InputError`: a bad file, a
    setting, a model vLLM cannot run) is not retried, since the same input fails the same way."""
    return not isinstance(state.data, BaseException) or is_transient(state.data)


class TaskRuns(Runner):
    """A stage's steps as task runs of the current flow: `call` in the flow's thread, `map` in it too
    (`concurrent` False) or on the flow's task runner (`concurrent`: worker processes, Ray tasks);
    `options` are the Ray options of each mapped task (flows/cluster.py: `shard_options`); `slots` the
    shards that run at once on one machine (`runtime.workers` processes); a Ray shard uses the CPUs its
    task reserves (`num_cpus`), as Ray itself sets OMP_NUM_THREADS for it."""

    def __init__(self, concurrent: bool, options: dict[str, Any] | None = None, slots: int = 1) -> None:
        self.concurrent = concurrent
        self.options = options
        self.slots = slots

    def shard_threads(self, threads: int) -> int:
        if self.options is not None and "num_cpus" in self.options:
            return max(1, int(self.options["num_cpus"]))
        return super().shard_threads(threads)

    def call(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        result: R = as_task(fn)(*args, **kwargs)
        return result

    def map(self, fn: Callable[..., R], shards: Sequence[T], *args: Any) -> list[R]:
        if self.concurrent:
            with self._remote_options():
                futures = as_task(fn).map(*(unmapped(a) for a in args), list(shards))
            # The shards' own bars are in their processes: here, one bar of shards done (a new user's
            # trial watched 8 minutes of `runtime.runner: processes` with nothing on the terminal).
            with progress_bar(f"{step_of(fn).name}: shards", total=len(futures), unit="shards") as bar:
                for _ in as_completed(futures):
                    advance(bar)
            results: list[R] = futures.result()
            return results
        return [self.call(fn, *args, shard) for shard in shards]

    @contextlib.contextmanager
    def _remote_options(self) -> Iterator[None]:
        if self.options is None:
            yield
            return
        from prefect_ray.context import remote_options

        with remote_options(**self.options):
            yield


def report(summary: Summary) -> None:
    """The stage's tables as artifacts of the flow run."""
    for table in summary.reports():
        create_table_artifact(key=table.key, table=table.rows, description=table.description)


def flow_for(stage: Stage[Any, Any], runtime: RuntimeSettings | None = None) -> Flow[..., Any]:
    """The Prefect flow of `stage`, its shards placed by `runtime` (default: local), its time budget
    (`runtime.stage_timeout_seconds`) and stall watchdog (`runtime.stall_seconds`) from `runtime`."""
    runtime = runtime or RuntimeSettings()
    return _flow(stage, runtime.model_dump_json())


def task_runner(stage: Stage[Any, Any], runtime: RuntimeSettings) -> tuple[TaskRunner[Any] | None, TaskRuns]:
    """Where `runtime.runner` puts the stage's mapped shards: the flow's task runner (None: Prefect's
    default, unused since `local` maps in the flow's thread) and the runner the stage calls its steps
    through. The one place the choice is made, for every stage."""
    if runtime.runner == "processes":
        return ProcessPoolTaskRunner(max_workers=runtime.workers), TaskRuns(True, slots=runtime.workers)
    if runtime.runner == "ray":
        from bridgerec.flows.cluster import Cluster, shard_options

        return Cluster(runtime.ray), TaskRuns(True, shard_options(runtime.ray, stage.name))
    return None, TaskRuns(concurrent=False)


@contextlib.contextmanager
def one_cluster(runtime: RuntimeSettings) -> Iterator[None]:
    """Connect to (or start) the Ray cluster once for everything inside (the nightly flow's stages) instead
    of once per stage flow; a no-op unless `runtime.runner` is ray."""
    if runtime.runner != "ray":
        yield
        return
    from bridgerec.flows.cluster import Cluster

    with Cluster(runtime.ray):
        yield


def workspace_tag(settings: Settings) -> str:
    """`workspace:/abs/path`: the Prefect tag that tells the flow runs of one workspace from another's. Every
    run on a machine or server is recorded in the same Prefect database, whichever workspace it ran on (a
    new user's trial: other workspaces' nights in `prefect flow-run ls`)."""
    return f"workspace:{settings.workspace.resolve()}"


def tag_flow_run(tag: str) -> None:
    """Add `tag` to the current flow run, once its settings are read: a deployment's run is created with
    the deployment's tags only, before anyone knows which workspace the worker's settings name. A
    failure to reach the API only loses the tag (logged); the run goes on."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id, current = flow_run.get_id(), list(flow_run.get_tags())
    if run_id is None or tag in current:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(UUID(str(run_id)), tags=[*current, tag])
    except Exception as exc:
        get_logger().warning("could not tag flow run %s with %s: %s", run_id, tag, exc)


def run_name(what: str, forced: Sequence[str] = ()) -> str:
    """A flow run's name in Prefect's UI and `prefect flow-run ls`: what it is and when it started,
    `train 2026-12-06 02:00:13 UTC`, with the stages a night forces (Prefect's default is a random
    `marble-kingfisher`, which tells one night from another by nothing)."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{what} {when}" + (f" (force: {', '.join(forced)})" if forced else "")


@functools.cache
def _flow(stage: Stage[Any, Any], runtime_json: str) -> Flow[..., Any]:
    runtime = RuntimeSettings.model_validate_json(runtime_json)
    runner, runs = task_runner(stage, runtime)
    budget_s = getattr(runtime.stage_timeout_seconds, stage.name, None)

    def run_stage(run: StageRun[Any], options: dict[str, Any] | None = None) -> Any:
        run = replace(run, runner=runs)
        with Watchdog(stage.name, runtime.stall_seconds):
            if stage.check is not None:
                run.runner.call(stage.check, run, **(options or {}))
            if stage.sharded:  # its steps are the task runs
                summary = stage.run(run, **(options or {}))
            else:
                summary = run.runner.call(stage.run, run, **(options or {}))
        report(summary)
        return summary

    run_stage.__doc__ = f"The {stage.name} stage: {stage.about}."
    fl: Flow[..., Any] = flow(
        name=stage.name,
        flow_run_name=functools.partial(run_name, stage.name),
        log_prints=False,
        validate_parameters=False,
        timeout_seconds=budget_s,
    )(run_stage)
    if runner is not None:
        fl = fl.with_options(task_runner=runner)
    return fl


def run_stage(name: str, settings: Settings, *, force: bool = False, **options: Any) -> Any:
    """Run stage `name` as its flow with the settings tree's section; returns its typed summary.
    `options` go to the stage's run function (publish: `run_id`)."""
    stage = STAGE[name]
    budget = getattr(settings.runtime.stage_timeout_seconds, name)
    started = time.monotonic()
    try:
        # a night already holds the workspace (re-entrant); the stage's flow run carries its tag
        with Workspace(settings.workspace).writing(f"stage {name}"), tags(workspace_tag(settings)):
            return flow_for(stage, settings.runtime)(stage.stage_run(settings, force=force), options or None)
    except Exception as exc:
        # Prefect stops a flow past its timeout by raising in its thread; landing inside a library's
        # callback (DuckDB's `register` wraps it: "... failed: CancelledError"), it can surface as that
        # library's error. Past the budget, the timeout is the cause whatever the exception says.
        late = budget is not None and time.monotonic() - started >= budget
        if not (isinstance(exc, FlowRunTimeoutError) or late):
            raise
        raise StageOverBudget(
            f"stage {name} ran past its time budget of {budget:g} s (runtime.stage_timeout_seconds.{name}) "
            "and was stopped; what it finished is kept (a rerun resumes): raise the budget if the data grew, "
            "else look at the stage's progress in its log for where it slowed"
        ) from None

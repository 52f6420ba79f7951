"""`runtime.runner: ray` for real: a local Ray (2 CPUs) started once for this module, a stage whose
shards are Prefect task runs executed as Ray tasks, a worker killed with `kill -9` in the middle of a
shard, and a cluster address that does not answer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from bridgerec.config import RaySettings, RuntimeSettings, ShardResources
from bridgerec.runtime.reports import TableReport
from bridgerec.runtime.runner import step
from bridgerec.stages import Stage
from bridgerec.storage.files import atomic_path
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # a Ray start (~15 s) and worker processes: scheduled first

RAY_CPUS = 2


@pytest.fixture(scope="module")
def ray_cluster(prefect_harness: None) -> Iterator[None]:
    """One local Ray for the module; its workers import the tests and report to the test API."""
    import ray
    from prefect.settings import PREFECT_API_URL

    env = {
        "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "OMP_NUM_THREADS": "1",
    }
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


class SquaresSummary(BaseModel):
    parts: list[dict[str, Any]]

    def reports(self) -> list[TableReport]:
        return []


@step("square", run_name="square-{shard}", retries=1)
def square_shard(folder: str, shard: int) -> dict[str, Any]:
    """One shard: its part written atomically (a killed shard leaves nothing half-written). When
    `folder/hold` exists the first attempt of shard 1 announces its pid and waits to be killed."""
    root = Path(folder)
    if shard == 1 and (root / "hold").exists() and not (root / "killed").exists():
        (root / "pid-1").write_text(str(os.getpid()))
        time.sleep(120)  # the test kills this process long before
    with atomic_path(root / f"part-{shard}.json") as tmp:
        tmp.write_text(json.dumps({"shard": shard, "square": shard * shard}))
    import ray

    return {
        "shard": shard,
        "pid": os.getpid(),
        "resources": ray.get_runtime_context().get_assigned_resources(),
    }


def run_squares(run: StageRun[Any]) -> SquaresSummary:
    return SquaresSummary(parts=run.runner.map(square_shard, list(range(4)), str(run.workspace.root)))


SQUARES: Stage[Any, Any] = Stage(  # named as a stage, for its `runtime.ray.resources` entry
    "enrich", lambda s: s, run_squares, SquaresSummary, lambda run: None, sharded=True
)


def _task_runs(flow_run_id: Any, settle_s: float = 60.0) -> list[Any]:
    """The flow run's task runs as the API has them, read again (every 0.5 s, at most `settle_s`) until
    every one is in a final state: a Ray worker reports its task run's states to the API as events, which
    the server records a moment later, so the flow can return before the last shard's Completed is
    stored (seen under CI's load after a killed worker's retry)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(),
            )

    deadline = time.monotonic() + settle_s
    runs = asyncio.run(read())
    while not all(r.state and r.state.is_final() for r in runs) and time.monotonic() < deadline:
        time.sleep(0.5)
        runs = asyncio.run(read())
    return runs


def _parts(root: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(root.glob("part-*"))}


def test_shards_run_as_ray_tasks_and_prefect_task_runs(ray_cluster: None, tmp_path: Path) -> None:
    """Each shard is a Prefect task run with its own state, run in a Ray worker process (not here), with
    the stage's resources; results come back in shard order."""
    from bridgerec.flows.stage import flow_for

    runtime = RuntimeSettings(runner="ray", ray=RaySettings(resources={"enrich": ShardResources(num_cpus=2)}))
    state = flow_for(SQUARES, runtime)(StageRun(None, Workspace(tmp_path)), return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert [p["shard"] for p in summary.parts] == [0, 1, 2, 3]
    assert all(p["pid"] != os.getpid() for p in summary.parts)
    assert all(p["resources"] == {"CPU": 2.0} for p in summary.parts)
    runs = _task_runs(state.state_details.flow_run_id)
    assert sorted(r.name for r in runs) == [f"square-{i}" for i in range(4)]
    assert all(r.state.is_completed() for r in runs)
    assert json.loads((tmp_path / "part-3.json").read_text()) == {"shard": 3, "square": 9}


def test_a_worker_killed_mid_shard_is_retried_and_the_output_is_whole(
    ray_cluster: None, tmp_path: Path
) -> None:
    """`kill -9` of the Ray worker running shard 1: Ray runs the shard again in another worker, the flow
    completes, and the parts equal an uninterrupted run's (nothing lost, nothing half-written)."""
    from bridgerec.flows.stage import flow_for

    runtime = RuntimeSettings(runner="ray")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    assert flow_for(SQUARES, runtime)(StageRun(None, Workspace(whole)), return_state=True).is_completed()

    (killed / "hold").touch()
    victims: list[int] = []

    def kill_when_running() -> None:
        pid_file = killed / "pid-1"
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                pid = int(pid_file.read_text())
                (killed / "killed").touch()
                os.kill(pid, signal.SIGKILL)
                victims.append(pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    state = flow_for(SQUARES, runtime)(StageRun(None, Workspace(killed)), return_state=True)
    killer.join()
    assert victims, "shard 1 never started"
    assert state.is_completed()
    summary = state.result()
    assert summary.parts[1]["pid"] != victims[0]  # the shard ran again, in another worker
    assert _parts(killed) == _parts(whole)
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no half-written part left
    runs = [r for r in _task_runs(state.state_details.flow_run_id) if r.name == "square-1"]
    assert runs and all(r.state.is_completed() for r in runs)


def test_an_unreachable_cluster_is_one_error_line(prefect_harness: None, tmp_path: Path) -> None:
    """A closed port on this machine: `error:` naming the address, exit 2, in seconds. (Ingest of the
    sample: a stage whose inputs are there, since a missing input is reported before any flow starts.)"""
    import socket

    from typer.testing import CliRunner

    from bridgerec.cli import app

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"ray://127.0.0.1:{port}"
    env = {"BRIDGEREC_RUNTIME__RUNNER": "ray", "BRIDGEREC_RUNTIME__RAY__ADDRESS": address}
    started = time.perf_counter()
    args = [
        "ingest",
        "--config",
        str(REPO / "configs" / "sample.yaml"),
        "--workspace",
        str(tmp_path),
        "--json",
    ]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and address in errors[0] and "Traceback" not in result.stderr
    assert time.perf_counter() - started < 60


def test_ray_settings_are_validated() -> None:
    from bridgerec.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"runtime\.ray\.resources"):
        load_settings(overrides={"runtime.ray.resources": {"enrich": {"num_gpus": -1}}})
    with pytest.raises(ConfigError, match=r"runtime\.runner"):
        load_settings(overrides={"runtime.runner": "dask"})
    s = load_settings(overrides={"runtime.runner": "ray", "runtime.ray.address": "auto"})
    assert s.runtime.ray.shard_resources("publish") == ShardResources(num_cpus=1, num_gpus=0)


def test_publish_shards_on_ray_equal_one_process(
    ray_cluster: None, sample_workspace: Path, tmp_path: Path
) -> None:
    """Publish scoring on Ray: the user shards run as Ray tasks (one Prefect task run each), each loads
    the staged vectors and the saved FAISS index and writes its own parts; the lists, serving rows and
    parts equal one process's."""
    import shutil

    import duckdb
    from prefect import flow
    from publish_data import workspace_vectors

    from bridgerec.flows.stage import task_runner
    from bridgerec.stages import STAGE
    from bridgerec.tasks.publish import PublishSettings, run_publish

    shutil.copytree(sample_workspace / "ingest", tmp_path / "ws" / "ingest")
    ws = Workspace(tmp_path / "ws")
    vectors = workspace_vectors(ws.root, seed=5)
    one = run_publish(
        StageRun(PublishSettings(k=5), ws, warehouse=tmp_path / "one" / "w.duckdb"),
        run_id="r",
        vectors=vectors,
    )
    runner, runs = task_runner(STAGE["publish"], RuntimeSettings(runner="ray"))
    assert runner is not None

    @flow(task_runner=runner)
    def publish_on_ray() -> Any:
        sharded = PublishSettings(k=5, users_per_shard=300, row_group_users=50)
        return run_publish(
            StageRun(sharded, ws, warehouse=tmp_path / "ray" / "w.duckdb", runner=runs),
            run_id="r",
            vectors=vectors,
        )

    state = publish_on_ray(return_state=True)
    assert state.is_completed()
    many = state.result()
    assert (one.shards, many.shards) == (1, 4) and many.rows == one.rows == 1000 * 2 * 5
    names = sorted(r.name for r in _task_runs(state.state_details.flow_run_id))
    assert [n for n in names if n.startswith("score")] == [f"score-users-{i}" for i in range(4)], names

    def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
        with duckdb.connect(str(path), read_only=True) as con:
            return con.execute(sql).fetchall()

    for sql in (
        "SELECT user_id, domain, rank, item_id, score FROM latest_recommendations ORDER BY ALL",
        "SELECT user_id, domain, item_ids, scores FROM latest_serving ORDER BY ALL",
    ):
        assert rows(tmp_path / "ray" / "w.duckdb", sql) == rows(tmp_path / "one" / "w.duckdb", sql)
    parts = (
        "SELECT kind, shard, sum(rows) FROM parts WHERE kind = 'recommendations' GROUP BY ALL ORDER BY ALL"
    )
    assert [r[2] for r in rows(tmp_path / "ray" / "w.duckdb", parts)] == [3000, 3000, 3000, 1000]

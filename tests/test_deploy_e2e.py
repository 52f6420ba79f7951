"""End to end as ops run it (docs/runbook.md): a real `prefect server` on 127.0.0.1, a process work pool,
deployments from prefect.yaml, a worker whose environment points the workspace elsewhere, and a run of
deployment `nightly` on the bundled sample that the server's *scheduler* creates (not a manual trigger),
polled through the API until it is Completed. A deploy without its config stops before registering
anything. Everything started here is stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import httpx
import pytest

from tests.train_data import EMBEDDING_CACHE

pytestmark = pytest.mark.slow  # minutes: scheduled first (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
        # The scheduler's main loop every 2 s instead of 60 s: a schedule added to a deployment fires
        # within seconds. (The loop is what the test proves works: SQLAlchemy 2.1 broke it.)
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the activated .venv of the runbook
        "BRIDGEREC_CONFIG": "configs/sample.yaml",
    }
    env.pop("BRIDGEREC_HOME", None)  # the deploy records the checkout it runs in
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("prefect server did not become healthy in 120 s")
        yield api, env
    finally:
        _stop(server)
        log.close()


def _prefect(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if ok:
        assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def _nightly_runs(client: httpx.Client, deployment_id: str) -> list[dict]:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return client.post("/flow_runs/filter", json=body).raise_for_status().json()


def test_scheduled_nightly_runs_on_a_worker(
    prefect_server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    api, env = prefect_server
    _prefect(env, "work-pool", "create", "bridgerec-process", "--type", "process")

    # A deploy that would register deployments crashing at run time stops first, with one clear line.
    broken = _prefect(
        {k: v for k, v in env.items() if k != "BRIDGEREC_CONFIG"}, "--no-prompt", "deploy", "--all", ok=False
    )
    assert broken.returncode != 0
    assert "error: $BRIDGEREC_CONFIG is not set" in broken.stdout + broken.stderr
    with httpx.Client(base_url=api, timeout=30) as client:
        assert client.post("/deployments/count", json={}).raise_for_status().json() == 0

    _prefect(env, "--no-prompt", "deploy", "--all")
    with httpx.Client(base_url=api, timeout=30) as client:
        deployment = client.get("/deployments/name/nightly/nightly").raise_for_status().json()
        by_cron = {s["schedule"]["cron"]: s for s in deployment["schedules"]}
        assert set(by_cron) == {"0 2 * * 1-6", "0 2 * * 0"}  # warm nights; Sunday's cold retrain:
        assert by_cron["0 2 * * 0"]["parameters"]["force"] == ["train"]  # the server keeps its parameter
        # Recorded at deploy time: the checkout the deploy ran in, the config as an absolute path.
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]
        assert deployment["parameters"]["config_file"] == str(REPO / "configs" / "sample.yaml")

        # The scheduler fills in the nightly 02:00 runs by itself (none is created by hand here).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _nightly_runs(client, deployment["id"]):
            time.sleep(1)
        nightly = _nightly_runs(client, deployment["id"])
        assert nightly and all(r["auto_scheduled"] for r in nightly), "the scheduler created no run"
        first = datetime.fromisoformat(nightly[0]["expected_start_time"])
        assert (first.hour, first.minute) == (2, 0)
    # The runbook's listing (and the input of its Late-run cancelling pipe): JSON with the run ids.
    listed = _prefect(env, "flow-run", "ls", "--flow-name", "nightly", "--state", "Scheduled", "-o", "json")
    assert {r["id"] for r in json.loads(listed.stdout)} >= {r["id"] for r in nightly}

    # An extra schedule 15 s ahead (as `prefect deployment schedule create nightly/nightly --interval
    # 86400 --anchor-date ...` makes, but through the API: the CLI's own start-up can take longer than 15 s
    # on a loaded machine, and the scheduler only creates runs due after it looks). The scheduler creates
    # the run; a worker runs it.
    with httpx.Client(base_url=api, timeout=30) as client:
        fire_at = datetime.now(UTC) + timedelta(seconds=15)
        schedule = {"interval": 86400, "anchor_date": fire_at.isoformat(), "timezone": "UTC"}
        client.post(
            f"/deployments/{deployment['id']}/schedules", json=[{"schedule": schedule, "active": True}]
        ).raise_for_status()
    workspace = tmp_path / "ws"
    worker_env = env | {  # where the worker runs, BRIDGEREC_* settings apply (docs/runbook.md)
        "BRIDGEREC_WORKSPACE": str(workspace),
        "BRIDGEREC_PROFILES__MODE": "none",  # profiles: test_nightly.py; here the schedule, deploy, worker
        "BRIDGEREC_ENRICH__EMBEDDING_CACHE": str(EMBEDDING_CACHE),  # the sample's texts, embedded once
        "BRIDGEREC_TRAIN__EPOCHS": "1",
        # One epoch of the default model can sit just under popularity (measured 0.0016 vs 0.0017), and
        # the gate would then rightly refuse the night; the floor is tested in test_gate*.py, not here.
        "BRIDGEREC_GATE__POPULARITY_FLOOR": "false",
    }
    worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "bridgerec-process", "--type", "process"],
        env=worker_env,
        cwd=tmp_path,  # the deployment's pull step, not the worker's directory, decides where flows run
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=api, timeout=30) as client:
            deadline = time.monotonic() + 1500
            run, state = None, None
            while time.monotonic() < deadline:
                # A server on SQLite answers slowly while the night writes to it ("database is locked"
                # retries on a loaded machine): a timed-out poll is polled again, until the deadline.
                with contextlib.suppress(httpx.TimeoutException):
                    if run is None:
                        due = [
                            r
                            for r in _nightly_runs(client, deployment["id"])
                            if abs(datetime.fromisoformat(r["expected_start_time"]) - fire_at)
                            < timedelta(seconds=2)
                        ]
                        run = due[0] if due else None
                    if run is not None:
                        run = client.get(f"/flow_runs/{run['id']}").raise_for_status().json()
                        state = run["state"]["type"]
                        if state in TERMINAL:
                            break
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(3)
        assert run is not None and run["auto_scheduled"], "the scheduler did not create the due run"
        assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-5000:]
        # Created with the deployment's tags; the flow adds its workspace's once its settings are read.
        assert {"bridgerec", "nightly", f"workspace:{(tmp_path / 'ws').resolve()}"} <= set(run["tags"])
    finally:
        _stop(worker)
        worker_log.close()

    assert (workspace / "ingest" / "manifest.json").exists()
    warehouse = workspace / "warehouse.duckdb"  # follows the workspace: BRIDGEREC_WORKSPACE alone moved it
    with duckdb.connect(str(warehouse), read_only=True) as con:
        users, rows = con.execute(
            "SELECT count(DISTINCT user_id), count(*) FROM latest_recommendations"
        ).fetchall()[0]
        night = con.execute("SELECT status, flow_run_id FROM runs WHERE kind = 'night'").fetchall()
    assert users == 1000 and rows == 1000 * 2 * 20  # k=20 in both domains for every user
    assert night == [("completed", run["id"])]

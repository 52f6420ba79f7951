"""End to end as ops run it: a real `prefect server` on 127.0.0.1, a process work pool, deployments from
prefect.yaml, a worker, and a run of deployment `nightly` on the bundled sample, polled through the API
until it is Completed. Everything started here is stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest

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
        "BRIDGEREC_HOME": str(REPO),
        "BRIDGEREC_CONFIG": "configs/sample.yaml",
    }
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


def _prefect(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_nightly_deployment_runs_on_a_worker(
    prefect_server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    api, env = prefect_server
    _prefect(env, "work-pool", "create", "bridgerec-process", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all")
    worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "bridgerec-process", "--type", "process"],
        env=env,
        cwd=REPO,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=api, timeout=30) as client:
            deployment = client.get("/deployments/name/nightly/nightly").raise_for_status().json()
            assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
            workspace = tmp_path / "ws"
            overrides = {
                "workspace": str(workspace),
                "warehouse": str(tmp_path / "warehouse.duckdb"),
                "profiles": {"max_users": 4},
                "train": {"epochs": 1},
            }
            run = (
                client.post(
                    f"/deployments/{deployment['id']}/create_flow_run",
                    json={"parameters": {"config_file": "configs/sample.yaml", "overrides": overrides}},
                )
                .raise_for_status()
                .json()
            )
            deadline = time.monotonic() + 900
            state = None
            while time.monotonic() < deadline:
                state = client.get(f"/flow_runs/{run['id']}").raise_for_status().json()["state"]["type"]
                if state in TERMINAL:
                    break
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(3)
        assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-5000:]
    finally:
        _stop(worker)
        worker_log.close()

    assert (workspace / "ingest" / "manifest.json").exists()
    warehouse = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(warehouse), read_only=True) as con:
        users, rows = con.execute(
            "SELECT count(DISTINCT user_id), count(*) FROM latest_recommendations"
        ).fetchall()[0]
    assert users == 1000 and rows == 1000 * 2 * 20  # k=20 in both domains for every user

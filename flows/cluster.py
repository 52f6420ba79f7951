"""The Ray cluster behind `runtime.runner: ray`: prefect-ray's `RayTaskRunner` connected to
`runtime.ray.address` (or a local Ray started for the run), with a clear error when the cluster does not
answer, and the Ray options each shard task of a stage asks for.

Every shard stays a Prefect task run (its own state, retries and logs in the UI); Ray decides where it
runs. Two retry layers: a shard whose worker process dies (a node lost, `kill -9`, out of memory) is
re-run by Ray (`max_retries`, the task run keeps its id), and a shard that raises is retried by Prefect
as its step declares (`retries`).
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

from prefect_ray import RayTaskRunner

from bridgerec.config import RaySettings
from bridgerec.runtime.errors import InputError

RAY_TASK_RETRIES = 3  # re-runs of a shard whose worker process died (Ray's default for tasks)


class ClusterUnreachable(InputError):
    """`runtime.ray.address` names a cluster that does not answer (one `error:` line, exit 2)."""


def shard_options(ray: RaySettings, stage: str) -> dict[str, Any]:
    """The `ray.remote` options of one shard task of `stage`: its CPUs and GPUs (Ray sets the task's
    CUDA_VISIBLE_DEVICES from them), and re-runs after a lost worker. A CPU shard's worker process is
    reused by the next shard (its engines with it: one engine start per worker and night); a GPU shard
    keeps Ray's default of a fresh process per task (`max_calls=1`), since a process cannot move its CUDA
    context to the GPU Ray assigns the next task: size GPU shards large (docs/runbook.md)."""
    res = ray.shard_resources(stage)
    options: dict[str, Any] = {"num_cpus": res.num_cpus, "max_retries": RAY_TASK_RETRIES}
    if res.num_gpus:
        options["num_gpus"] = res.num_gpus
    else:
        options["max_calls"] = 0  # keep the worker (and the engines it started) for the next shard
    return options


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of 'ray://host:port' or 'host:port'; None for '' and 'auto'."""
    if address in ("", "auto"):
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.hostname is None or parts.port is None:
        raise ClusterUnreachable(
            f"runtime.ray.address {address!r} is not an address: use '', 'auto', 'ray://HOST:10001' or "
            "'HOST:6379'"
        )
    return parts.hostname, parts.port


def check_address(ray: RaySettings) -> None:
    """Fail in `connect_timeout_s` when the cluster's address does not accept connections (Ray itself
    retries for minutes before giving up)."""
    target = _host_port(ray.address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=ray.connect_timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterUnreachable(
            f"runtime.ray.address {ray.address}: no Ray cluster answers there ({reason}); start the head "
            "(`ray start --head`, docs/runbook.md) or set runtime.ray.address to '' for a local Ray"
        ) from None


def _prefect_api_env() -> dict[str, str]:
    """The Prefect API the Ray workers report their task runs to: the configured one, or the local
    ephemeral server of this process (started here if needed), so that workers on this machine never start
    a temporary server of their own."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    return {"PREFECT_API_URL": url}


class Cluster(RayTaskRunner):
    """prefect-ray's task runner for `runtime.ray`: a local Ray (empty address) started with the
    configured CPUs, GPUs and dashboard, or the cluster at `address` after checking it answers. Ray workers
    report to this run's Prefect API."""

    def __init__(self, ray: RaySettings) -> None:
        self.settings = ray
        init: dict[str, Any] = {"ignore_reinit_error": True}
        if not ray.address:
            init |= {"num_cpus": ray.num_cpus, "num_gpus": ray.num_gpus}
            init["include_dashboard"] = ray.dashboard
        super().__init__(address=ray.address or None, init_kwargs=init)

    def duplicate(self) -> Cluster:
        return type(self)(self.settings)

    def __enter__(self) -> Cluster:
        import ray

        check_address(self.settings)
        if not ray.is_initialized():
            env = _prefect_api_env()
            self.init_kwargs["runtime_env"] = {"env_vars": env}
            if self.settings.address == "auto":
                self.address = None  # ray.init() alone joins the cluster of this machine
                self.init_kwargs["address"] = "auto"
        try:
            super().__enter__()
        except ConnectionError as exc:
            raise ClusterUnreachable(
                f"runtime.ray.address {self.settings.address or 'auto'}: {exc} (a cluster whose head was "
                "started where a Ray token exists uses token authentication: set RAY_AUTH_MODE=token and "
                "its token here, docs/runbook.md section 6)"
            ) from None
        return self

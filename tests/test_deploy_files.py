"""Deployment files, validated as far as this machine allows (no Docker engine runs here): the compose
file against the Compose specification, Dockerfiles with hadolint, prefect.yaml against our flows."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_file_is_valid_and_complete() -> None:
    from compose_spec import PyCompose

    compose = PyCompose.from_yaml((REPO / "docker" / "compose.yaml").read_text())  # raises if invalid
    assert set(compose.service_names()) == {
        "postgres", "prefect-server", "cpu-worker", "gpu-worker", "ray-head", "ray-worker", "cpu-worker-image",
    }  # fmt: skip
    raw = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    server = raw["services"]["prefect-server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert server["image"].startswith("prefecthq/prefect:3.7.7")
    assert raw["services"]["gpu-worker"]["profiles"] == ["gpu"]
    ray = raw["services"]
    assert (
        ray["ray-head"]["command"][:3] == ["ray", "start", "--head"]
        and "8265:8265" in ray["ray-head"]["ports"]
    )
    assert "--address=ray-head:6379" in ray["ray-worker"]["command"]
    assert ray["cpu-worker"]["environment"]["BRIDGEREC_RUNTIME__RAY__ADDRESS"] == "ray://ray-head:10001"
    assert all(ray[s]["image"] == "bridgerec-cpu:latest" for s in ("ray-head", "ray-worker", "cpu-worker"))
    for worker in ("cpu-worker", "gpu-worker"):
        dockerfile = REPO / "docker" / Path(raw["services"][worker]["build"]["dockerfile"]).name
        assert dockerfile.exists()


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    files = [str(REPO / "docker" / f) for f in ("Dockerfile.cpu", "Dockerfile.gpu")]
    result = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(REPO / "docker" / ".hadolint.yaml"), *files],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    gpu = (REPO / "docker" / "Dockerfile.gpu").read_text()
    assert "requirements/gpu.txt" in gpu and "nvidia/cuda" in gpu


def test_prefect_yaml_points_at_real_flows() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", "ingest", "enrich", "train", "publish"}
    nightly = deployments["nightly"]
    warm, cold = nightly["schedules"]  # six warm nights, and the weekly cold retrain on Sunday
    assert warm == {"cron": "0 2 * * 1-6", "timezone": "UTC", "active": True}
    assert cold["cron"] == "0 2 * * 0" and cold["parameters"] == {"force": ["train"]}
    assert nightly["concurrency_limit"] == 1
    for d in deployments.values():
        path, name = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        fn = getattr(module, name)
        assert hasattr(fn, "deploy"), f"{d['entrypoint']} is not a Prefect flow"
        assert d["work_pool"]["name"] == "bridgerec-process"
        params = set(d["parameters"]).union(*(s.get("parameters", {}) for s in d.get("schedules", [])))
        assert params <= set(fn.parameters.properties), (d["name"], params)


def test_deploy_check_refuses_relative_inputs_the_deployed_runs_cannot_see(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployed runs start in the checkout: a config written beside its data (`items: items.csv`)
    ran by hand from there, and every deployed night failed at 02:00 (a new user's trial). The deploy now
    stops on it with one line; the sample's paths (relative to the checkout) and absolute paths that are
    not there yet (tonight's export) pass."""
    from typer.testing import CliRunner

    from bridgerec.cli import app

    data = tmp_path / "data"
    data.mkdir()
    for name in ("items.csv", "interactions.csv"):
        (data / name).write_text("x\n")
    config = data / "bridgerec.yaml"
    config.write_text("workspace: ws\ningest:\n  items: items.csv\n  interactions: interactions.csv\n")
    monkeypatch.setenv("BRIDGEREC_HOME", str(REPO))
    monkeypatch.setenv("BRIDGEREC_CONFIG", str(config))
    (data / "ws").mkdir()  # the workspace the commands ran there made
    out = CliRunner().invoke(app, ["deploy-check", "config"])
    assert out.exit_code == 2 and out.stdout == ""
    assert out.stderr == (
        f"error: $BRIDGEREC_CONFIG={config}: relative paths the deployed runs would read from their working "
        f"directory, {REPO}, where they are not: ingest items items.csv (the config's folder has it); ingest "
        "interactions interactions.csv (the config's folder has it); workspace ws (the config's folder has "
        "it); make them absolute\n"
    )
    tonight = tmp_path / "exports"  # not arrived yet: absolute paths are only checked when the night runs
    config.write_text(f"ingest:\n  items: {tonight}/items.csv\n  interactions: {tonight}/interactions.csv\n")
    out = CliRunner().invoke(app, ["deploy-check", "config"])
    assert (out.exit_code, out.stdout) == (0, f"{config}\n")
    monkeypatch.setenv("BRIDGEREC_CONFIG", "configs/sample.yaml")  # relative to the checkout: found there
    out = CliRunner().invoke(app, ["deploy-check", "config"])
    assert (out.exit_code, out.stdout) == (0, f"{REPO / 'configs' / 'sample.yaml'}\n")

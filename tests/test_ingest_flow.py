"""The ingest flow and the `bridgerec ingest` command, run for real on a temporary Prefect API."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bridgerec.cli import app
from bridgerec.flows.stage import flow_for
from bridgerec.stages import STAGE
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import IngestSettings
from tests.conftest import SAMPLE

REQUIRED_KEYS = {
    "users",
    "items",
    "items_per_domain",
    "interactions",
    "overlap_users",
    "quarantined",
    "quarantined_by_reason",
    "filtered_by_reason",
}


def test_ingest_flow_runs_and_reports(prefect_harness: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    settings = IngestSettings(items=SAMPLE / "items.csv.gz", interactions=SAMPLE / "interactions.csv.gz")
    state = flow_for(STAGE["ingest"])(StageRun(settings, Workspace(tmp_path / "ws")), return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary.users == 1000 and summary.overlap_users == 300 and summary.quarantined == 0

    async def artifact() -> object:
        async with get_client() as client:
            return await client.read_latest_artifacts()

    import asyncio

    keys = {a.key for a in asyncio.run(artifact())}
    assert "ingest-data-quality" in keys


def test_cli_json_contract_and_skip(prefect_harness: None, tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "ingest",
        "--items",
        str(SAMPLE / "items.csv.gz"),
        "--interactions",
        str(SAMPLE / "interactions.csv.gz"),
        "--workspace",
        str(tmp_path / "ws"),
        "--json",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    out = json.loads(first.stdout.strip().splitlines()[-1])
    assert out.keys() >= REQUIRED_KEYS
    assert out["items_per_domain"] == {"food": 2217, "kitchen": 4230}
    again = json.loads(runner.invoke(app, args).stdout.strip().splitlines()[-1])
    assert again["skipped"] is True and again["users"] == out["users"]


def test_cli_bad_file_exits_nonzero_with_the_file_named(prefect_harness: None, tmp_path: Path) -> None:
    bad = tmp_path / "inter.csv.gz"
    bad.write_bytes(b"not gzip at all")
    result = CliRunner().invoke(
        app,
        [
            "ingest",
            "--items",
            str(SAMPLE / "items.csv.gz"),
            "--interactions",
            str(bad),
            "-w",
            str(tmp_path / "ws"),
        ],
    )
    assert result.exit_code == 2
    assert str(bad) in result.output and "gzip" in result.output
    assert not (tmp_path / "ws" / "ingest").exists()

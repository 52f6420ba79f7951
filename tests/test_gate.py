"""The quality gate in the nightly flow, for real on the bundled sample: a deliberately worse run (an
untrained ID-only SASRec on the next night's data) is not published, the night fails with the gap in its message and the
lists stay; `bridgerec publish --run-id` publishes it by hand; a better run afterwards passes the gate
and is published. Every night is a row of the warehouse's `runs`, joinable to its train and published run."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from bridgerec.cli import app
from bridgerec.flows.nightly import NightFailed, nightly_flow, summary_markdown
from tests.conftest import REPO, SAMPLE
from tests.train_data import EMBEDDING_CACHE

pytestmark = pytest.mark.slow  # minutes: scheduled first (tests/conftest.py)

CONFIG = str(REPO / "configs" / "sample.yaml")
SMALL = {
    "hidden": 32,
    "max_len": 50,
    "batch_size": 64,
    "eval_batch_size": 512,
    "threads": 1,
    "warm_start": False,
}
# The hybrid learns steadily on the sample at lr 1e-3 (tests/test_train_warmstart.py); an ID-only SASRec
# at lr 1e-7 for one epoch stays at its random init: no content signal at all.
STRONG = SMALL | {"model": "llm4cdsr-hybrid", "lr": 1e-3, "epochs": 6, "patience": 6}
WEAK = SMALL | {"model": "sasrec", "lr": 1e-7, "epochs": 1}


def _merged(config: dict, overrides: dict) -> dict:
    """`overrides` over `config`, section by section (as nightly_flow's overrides apply)."""
    out = dict(config)
    for key, value in overrides.items():
        out[key] = (
            _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _latest(warehouse: Path) -> str:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute("SELECT train_run_id FROM latest_run").fetchall()[0][0]


def test_gate_holds_a_worse_run_publishes_a_better_one_and_can_be_overridden(
    prefect_harness: None, tmp_path: Path
) -> None:
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(SAMPLE, raw)
    ws, warehouse = tmp_path / "ws", tmp_path / "ws" / "warehouse.duckdb"
    base = {
        "workspace": str(ws),
        "ingest": {"items": str(raw / "items.csv.gz"), "interactions": str(raw / "interactions.csv.gz")},
        "enrich": {"local_dim": 32, "embedding_cache": str(EMBEDDING_CACHE)},
        "profiles": {"mode": "none"},
        "publish": {"k": 5},
        "runtime": {"stage_retries": 0},
        "gate": {"max_drop": 0.05, "popularity_floor": False},
    }
    first = nightly_flow(CONFIG, base | {"train": STRONG}).model_dump(mode="json")
    assert first["gate"]["decision"] == "first" and first["status"] == "completed"
    strong_1 = first["stages"]["train"]["run_id"]
    assert _latest(warehouse) == strong_1  # the warehouse followed the workspace

    # The next night's data arrives (one more interaction), and tonight's training is deliberately bad.
    with gzip.open(raw / "interactions.csv.gz", "rt") as fh:
        text = fh.read()
    user = text.splitlines()[1].split(",")[0]
    last = max(int(r.split(",")[3]) for r in text.splitlines()[1:] if r.startswith(user + ","))
    kitchen = next(r.split(",")[1] for r in text.splitlines()[1:] if ",kitchen," in r)
    with gzip.open(raw / "interactions.csv.gz", "wt") as fh:
        fh.write(text.rstrip("\n") + f"\n{user},{kitchen},kitchen,{last + 1}\n")
    with pytest.raises(NightFailed) as refused:
        nightly_flow(CONFIG, base | {"train": WEAK})
    night = refused.value.summary.model_dump(mode="json")
    gate = night["gate"]
    weak = gate["new_run_id"]
    assert gate["decision"] == "refused" and weak != strong_1 and gate["published_run_id"] == strong_1
    gap = gate["published_ndcg10"] - gate["new_ndcg10"]
    assert gap > 0.05 * gate["published_ndcg10"], gate
    assert f"{gap:.4f}" in str(refused.value) and "quality gate refused" in str(refused.value)
    assert night["stages"]["publish"] == {"status": "held by the gate"}
    assert _latest(warehouse) == strong_1  # analysts still see last night's lists
    md = summary_markdown(refused.value.summary)
    assert (
        "FAILED" in md
        and "gate: **refused**" in md
        and f"bridgerec publish --config FILE --run-id {weak}" in md
    )
    board = json.loads(
        duckdb.sql(f"SELECT to_json(list(run_id)) FROM '{ws}/train/runs.parquet'").fetchall()[0][0]
    )
    assert weak in board  # left on the leaderboard for inspection
    with duckdb.connect(str(warehouse), read_only=True) as con:
        nights = con.execute(
            "SELECT status, gate, train_run_id, published_run_id, gate_message FROM nights ORDER BY started_at"
        ).fetchall()
    assert [n[:4] for n in nights] == [
        ("completed", "first", strong_1, strong_1),
        ("failed", "refused", weak, strong_1),
    ]
    assert nights[1][4] == gate["message"]

    # The same night from the command line: the gate holds the run again (tonight's inputs, the same
    # weak run), and `bridgerec run` exits 3, apart from a failure (1) and a bad input (2).
    night_yaml = tmp_path / "weak-night.yaml"
    night_yaml.write_text(
        yaml.safe_dump(_merged(yaml.safe_load(Path(CONFIG).read_text()), base | {"train": WEAK}))
    )
    held = CliRunner().invoke(app, ["run", "--config", str(night_yaml), "--json"])
    assert held.exit_code == 3, held.output
    answer = json.loads(held.stdout)
    assert answer["ok"] is False and answer["exit_code"] == 3 and answer["gate"]["decision"] == "refused"
    assert held.stderr.startswith("error: nightly run held: quality gate refused: run " + weak)
    assert held.stderr.rstrip().endswith("the serving lists are unchanged") and _latest(warehouse) == strong_1

    # What an automation keys on (docs/runbook.md, "Notifications"): the flow run `nightly` ends Failed,
    # with the gate's message; the runbook's automation for it is accepted by the server.
    from uuid import UUID

    from prefect import get_client

    from bridgerec.flows.alerts import FAILED_NIGHT_EVENTS, create_slack_alert

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(UUID(night["flow_run_id"]))
        flow = client.read_flow(flow_run.flow_id)
    assert flow_run.state is not None and flow_run.state.type.value == "FAILED"
    assert f"prefect.flow-run.{flow_run.state.name}" in FAILED_NIGHT_EVENTS
    assert "quality gate refused" in (flow_run.state.message or "") and flow.name == "nightly"
    automation = create_slack_alert("https://hooks.slack.com/services/T000/B000/XXXX")
    assert automation.id is not None and automation.trigger.match_related.root == {
        "prefect.resource.role": "flow",
        "prefect.resource.name": "nightly",
    }

    # The override by hand, as an operator types it: publish the refused run anyway.
    from prefect.settings import PREFECT_API_URL

    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("bridgerec")),
            "publish",
            "--config",
            CONFIG,
            "--workspace",
            str(ws),
            "--warehouse",
            str(warehouse),
            "--run-id",
            weak,
            "--json",
        ],
        env=os.environ | {"PREFECT_API_URL": str(PREFECT_API_URL.value())},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["run_id"] == weak
    assert _latest(warehouse) == weak

    # A better run on the same data passes the gate against the (weak) published run and is published.
    night_3 = nightly_flow(CONFIG, base | {"train": STRONG})
    better = night_3.model_dump(mode="json")
    assert better["gate"]["decision"] == "passed", better["gate"]
    assert better["gate"]["new_ndcg10"] > better["gate"]["published_ndcg10"]
    assert _latest(warehouse) == better["stages"]["train"]["run_id"] != weak
    # What was published, per domain: churn against the weak lists, coverage; and the data checks.
    assert {r["domain"] for r in better["list_stability"]} == {"food", "kitchen"}
    assert all(
        r["previous_run_id"] == weak and r["mean_changed"] is not None for r in better["list_stability"]
    )
    assert better["data_checks"]["passed"] and "lists: food:" in summary_markdown(night_3)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        stability = con.execute(
            "SELECT count(*) FROM list_stability WHERE night_id = ?", [better["night_id"]]
        )
        assert stability.fetchall()[0][0] == 2
        checks = con.execute("SELECT count(DISTINCT night_id), bool_and(passed) FROM data_checks").fetchall()
    assert checks == [
        (4, True)
    ]  # the first night, the refused one, its rerun from the command line, the better one

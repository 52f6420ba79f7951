"""The nightly flow in-process on the bundled sample: a full run publishes; an unchanged rerun does no
work; a stage that fails fails the run and leaves the warehouse as it was; the rerun after the fix
resumes from the finished stages."""

from __future__ import annotations

import gzip
from pathlib import Path

import duckdb
import pytest

from bridgerec.flows.nightly import nightly_flow
from tests.conftest import REPO, SAMPLE
from tests.train_data import EMBEDDING_CACHE

pytestmark = pytest.mark.slow  # minutes: scheduled first (tests/conftest.py)

CONFIG = str(REPO / "configs" / "sample.yaml")


def _latest_run(warehouse: Path) -> tuple[str, int]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        run_id = con.execute("SELECT run_id FROM latest_recommendations LIMIT 1").fetchall()[0][0]
        rows = con.execute("SELECT count(*) FROM latest_recommendations").fetchall()[0][0]
    return run_id, rows


def _slice_sample(out: Path, n_users: int) -> int:
    """The first `n_users` users of the bundled sample (both domains present) and the items they had."""
    with gzip.open(SAMPLE / "interactions.csv.gz", "rt") as fh:
        header, *rows = fh.read().splitlines()
    users = sorted({r.split(",")[0] for r in rows})
    chosen = set(users[: n_users // 2] + users[-(n_users - n_users // 2) :])
    kept = [r for r in rows if r.split(",")[0] in chosen]
    items = {r.split(",")[1] for r in kept}
    with gzip.open(out / "interactions.csv.gz", "wt") as fh:
        fh.write("\n".join([header, *kept]) + "\n")
    with gzip.open(SAMPLE / "items.csv.gz", "rt") as fh:
        item_header, *item_rows = fh.read().splitlines()
    with gzip.open(out / "items.csv.gz", "wt") as fh:
        fh.write("\n".join([item_header, *[r for r in item_rows if r.split(",")[0] in items]]) + "\n")
    return len(chosen)


def test_nightly_runs_skips_fails_safely_and_resumes(prefect_harness: None, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    users = _slice_sample(raw, n_users=150)  # a slice of the sample keeps the four runs short
    ws, warehouse = tmp_path / "ws", tmp_path / "warehouse.duckdb"
    overrides = {
        "workspace": str(ws),
        "warehouse": str(warehouse),
        "ingest": {"items": str(raw / "items.csv.gz"), "interactions": str(raw / "interactions.csv.gz")},
        "enrich": {"embedding_cache": str(EMBEDDING_CACHE)},
        "profiles": {"max_users": 4},
        "train": {"epochs": 1},
        "publish": {"k": 5},
        "runtime": {"stage_retries": 0},
        "gate": {"popularity_floor": False},  # one epoch may sit under popularity: the floor is test_gate's
    }
    first = nightly_flow(CONFIG, overrides).model_dump(mode="json")
    stages = first["stages"]
    assert stages["ingest"]["users"] == users
    assert stages["enrich"]["profiles_generated"] == 4
    assert stages["publish"]["rows"] > 0
    run_1, rows_1 = _latest_run(warehouse)
    assert rows_1 == stages["publish"]["rows"]

    again = nightly_flow(CONFIG, overrides).model_dump(mode="json")["stages"]
    assert again["ingest"]["skipped"] and again["train"]["skipped"] and again["publish"]["skipped"]
    assert again["enrich"]["items_embedded"] == 0 and again["enrich"]["profiles_generated"] == 0

    # New data arrives, and the profile model is misconfigured: enrich fails after ingest finished.
    with gzip.open(raw / "interactions.csv.gz", "rt") as fh:
        text = fh.read()
    first_user = text.splitlines()[1].split(",")[0]
    last_pos = max(
        int(line.split(",")[3]) for line in text.splitlines()[1:] if line.startswith(first_user + ",")
    )
    kitchen_item = next(line.split(",")[1] for line in text.splitlines()[1:] if ",kitchen," in line)
    with gzip.open(raw / "interactions.csv.gz", "wt") as fh:
        fh.write(text.rstrip("\n") + f"\n{first_user},{kitchen_item},kitchen,{last_pos + 1}\n")
    broken = overrides | {
        "profiles": {"max_users": 4, "model": str(tmp_path / "no-such-model"), "auto_prepare": False}
    }
    with pytest.raises(Exception):  # noqa: B017  (the stage's own error, re-raised by the flow)
        nightly_flow(CONFIG, broken)
    assert _latest_run(warehouse) == (run_1, rows_1)  # published tables untouched
    with duckdb.connect(str(warehouse), read_only=True) as con:
        failed = con.execute("SELECT message FROM runs WHERE status = 'failed'").fetchall()
    assert len(failed) == 1 and failed[0][0].startswith("stage enrich")

    resumed = nightly_flow(CONFIG, overrides).model_dump(mode="json")["stages"]
    assert resumed["ingest"]["skipped"]  # finished before the crash: not redone
    assert not resumed["publish"]["skipped"]
    run_2, _ = _latest_run(warehouse)
    assert run_2 != run_1

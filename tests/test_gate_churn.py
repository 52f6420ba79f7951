"""The gate's churn bound, for real on the bundled sample (real FAISS lists, a real warehouse): a retrain
on unchanged inputs whose lists would change more than `gate.max_churn` is refused with the figures, one
within the bound passes, and on changed inputs the bound does not apply."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import duckdb
import pytest

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import IngestSettings, run_ingest
from bridgerec.tasks.publish import PublishSettings, candidate_lists, run_publish
from bridgerec.tasks.quality import GateSettings, PublishedLists, list_stability, run_gate
from bridgerec.tasks.train import TrainSettings, run_train
from tests.train_data import FAST, SAMPLE

PUBLISH = PublishSettings(k=10)
# Scores do not decide here: any drop is allowed and the floor is off, so only the churn bound refuses.
SCORES_OFF = {"max_drop": 1.0, "popularity_floor": False}


def _published(warehouse: Path) -> tuple[str, str]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute("SELECT run_id, train_run_id FROM latest_run").fetchall()[0]


def test_churn_bound_on_unchanged_inputs(sample_workspace: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(sample_workspace / "ingest", ws.root / "ingest")
    warehouse = tmp_path / "wh.duckdb"
    train = TrainSettings(model="pop", **FAST)
    pop = run_train(StageRun(train, ws)).run_id
    run_publish(StageRun(PUBLISH, ws, warehouse=warehouse))
    lists_run, published_train = _published(warehouse)
    assert published_train == pop
    published = PublishedLists(warehouse, lists_run, PUBLISH)

    # The candidate's lists are what a publish would write: the same rows as the published ones for pop.
    rows = candidate_lists(PUBLISH, ws, pop)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        stored = con.execute(
            "SELECT user_id, domain, rank, item_id FROM recommendations WHERE run_id = ? ORDER BY ALL",
            [lists_run],
        ).fetchall()
    assert (
        sorted(zip(*(rows[c].to_pylist() for c in ("user_id", "domain", "rank", "item_id")), strict=True))
        == stored
    )
    same = list_stability(warehouse, None, lists_run, rows)
    assert {r["domain"]: r["mean_changed"] for r in same} == {"food": 0.0, "kitchen": 0.0}

    # A retrain on the same inputs with another model: its lists differ from popularity's.
    sasrec = run_train(StageRun(TrainSettings(model="sasrec", epochs=1, **FAST), ws)).run_id
    refused = run_gate(GateSettings(max_churn=0.05, **SCORES_OFF), train, ws, sasrec, pop, None, published)
    assert refused.decision == "refused" and not refused.publish
    assert refused.churn is not None and set(refused.churn) == {"food", "kitchen"}
    worst = max(refused.churn.values())
    assert worst > 0.05 and f"{worst:.1%}" in refused.message and "same inputs" in refused.message
    assert refused.churn_note == "unchanged inputs: churn over the bound"
    passed = run_gate(GateSettings(max_churn=1.0, **SCORES_OFF), train, ws, sasrec, pop, None, published)
    assert passed.decision == "passed" and passed.publish and passed.churn == refused.churn
    off = run_gate(GateSettings(**SCORES_OFF), train, ws, sasrec, pop, None, published)
    assert off.publish and off.churn is None and off.churn_note is None

    # Changed inputs (one more interaction): churn is expected, so the bound does not apply.
    raw = tmp_path / "raw"
    shutil.copytree(SAMPLE, raw)
    with gzip.open(raw / "interactions.csv.gz", "rt") as fh:
        text = fh.read()
    first = text.splitlines()[1].split(",")
    with gzip.open(raw / "interactions.csv.gz", "wt") as fh:
        fh.write(text.rstrip("\n") + f"\n{first[0]},{first[1]},{first[2]},{int(first[3]) + 10**6}\n")
    run_ingest(
        StageRun(IngestSettings(items=raw / "items.csv.gz", interactions=raw / "interactions.csv.gz"), ws)
    )
    retrained = run_train(StageRun(TrainSettings(model="sasrec", epochs=1, **FAST), ws)).run_id
    changed = run_gate(GateSettings(max_churn=0.05, **SCORES_OFF), train, ws, retrained, pop, None, published)
    assert changed.publish and changed.churn is None
    assert changed.churn_note == "inputs changed since the published run: churn not bounded"


@pytest.mark.parametrize("bound", [-0.1, 1.5])
def test_churn_bound_is_a_share(bound: float) -> None:
    with pytest.raises(ValueError):
        GateSettings(max_churn=bound)

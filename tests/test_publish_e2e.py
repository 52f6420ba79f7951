"""End to end on the bundled sample: ingest -> train (1 epoch, tiny) -> publish through the real Prefect flow
and the CLI, then the warehouse's tables, metrics and the analysts' SQL of docs/publish.md.

Enrich (vLLM) is not run here: the model is SASRec (item-ID embeddings), which needs only the ingest
output; the publishing path is the same for every model (the train stage's export -> DomainVectors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from publish_data import doc_queries
from typer.testing import CliRunner

from bridgerec.cli import app
from bridgerec.storage.index_store import IndexStore
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.publish import PublishSettings
from bridgerec.tasks.train import TrainSettings, run_train


@pytest.fixture(scope="module")
def trained_workspace(sample_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("e2e_ws")
    shutil.copytree(sample_workspace / "ingest", root / "ingest")
    settings = TrainSettings(model="sasrec", epochs=1, hidden=16, layers=1, max_len=20, threads=1)
    summary = run_train(StageRun(settings, Workspace(root), threads=1))
    return root, summary.run_id


def test_publish_flow_and_cli_on_a_trained_run(
    prefect_harness: None, trained_workspace: tuple[Path, str], tmp_path: Path
) -> None:
    from bridgerec.flows.stage import flow_for
    from bridgerec.stages import STAGE

    root, train_run = trained_workspace
    warehouse = tmp_path / "warehouse.duckdb"
    summary = flow_for(STAGE["publish"])(
        StageRun(PublishSettings(k=10), Workspace(root), warehouse=warehouse)
    )
    assert (summary.run_id, summary.train_run_id, summary.model) == (train_run, train_run, "sasrec")
    assert summary.users == 1000 and summary.rows == 1000 * 2 * 10 and not summary.skipped
    with duckdb.connect(str(warehouse), read_only=True) as con:

        def one(sql: str, params: list | None = None) -> tuple:
            return con.execute(sql, params or []).fetchall()[0]

        # k unseen items per user and domain, ranked by non-increasing score, all from the catalogue.
        assert one(
            "SELECT count(*), count(DISTINCT user_id), min(rank), max(rank) FROM latest_recommendations"
        ) == (20_000, 1000, 1, 10)
        assert one(
            "SELECT count(*) FROM (SELECT score, lag(score) OVER (PARTITION BY user_id, domain ORDER BY rank) p "
            "FROM latest_recommendations) WHERE score > p"
        ) == (0,)
        interactions = str(root / "ingest" / "interactions.parquet")
        assert one(
            "SELECT count(*) FROM latest_recommendations JOIN read_parquet(?) USING (user_id, item_id)",
            [interactions],
        ) == (0,)
        assert one("SELECT count(*) FROM latest_recommendations WHERE title IS NULL") == (0,)
        # The run's final evaluation, sampled and full ranking, per domain and user group.
        assert one(
            "SELECT count(DISTINCT split), count(DISTINCT protocol), count(DISTINCT domain), "
            "count(DISTINCT user_group) FROM latest_metrics WHERE model = 'sasrec'"
        ) == (2, 2, 3, 5)
        assert one(
            "SELECT users FROM latest_metrics WHERE split = 'test' AND protocol = 'full' AND domain = 'all' "
            "AND user_group = 'all' AND metric = 'ndcg@10'"
        ) == (1000,)
        run = one("SELECT status, train_run_id, n_users, k FROM latest_run")
        assert run == ("completed", train_run, 1000, 10)
        # The analysts' queries of docs/publish.md, with real metrics this time.
        con.execute("SET VARIABLE user_id = ?", [one("SELECT min(user_id) FROM latest_recommendations")[0]])
        queries = doc_queries()
        results = [con.execute(q).fetchall() for q in queries]
        empty = [q.splitlines()[0] for q, rows in zip(queries, results, strict=True) if not rows]
        assert not empty, f"docs/publish.md queries without rows on the sample: {empty}"
        assert len(results[0]) == 20
        quality = {(r[1], r[2], r[3], r[4]) for r in results[5]}
        assert quality >= {("full", "all", "all", "ndcg@10"), ("sampled", "kitchen", "all", "hr@10")}
        assert [r[1] for r in results[6]] == [train_run, train_run]  # ndcg@10 history: full and sampled
    # The saved index reloads and answers with catalogue ids.
    loaded = IndexStore(tmp_path / "indexes").load(train_run, "kitchen")
    assert loaded.index.ntotal == 4230 and len(loaded.item_ids) == 4230

    # The CLI contract: JSON with run_id, users, rows, seconds; an unchanged rerun is skipped.
    out = CliRunner().invoke(
        app, ["publish", "--workspace", str(root), "--warehouse", str(warehouse), "--k", "10", "--json"]
    )
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["run_id"] == train_run and result["skipped"] is True
    assert result["users"] == 1000 and result["rows"] == 20_000 and result["seconds"] >= 0
    out = CliRunner().invoke(
        app, ["publish", "--workspace", str(tmp_path / "empty"), "--warehouse", str(warehouse)]
    )
    assert out.exit_code == 2 and "run `bridgerec train` first" in out.output

    # --run-id chooses the trained run to publish (a run the gate refused, an earlier one): it must be
    # there, complete and of today's catalogue; a typo is refused, not published under its name.
    def publish(run_id: str) -> tuple[int, dict]:
        argv = ["publish", "-w", str(root), "--warehouse", str(warehouse), "--k", "10", "--run-id", run_id]
        out = CliRunner().invoke(app, [*argv, "--json"])
        return out.exit_code, json.loads(out.stdout.strip().splitlines()[-1])

    code, answer = publish(train_run)
    assert code == 0 and (answer["run_id"], answer["train_run_id"], answer["skipped"]) == (train_run,) * 2 + (
        True,
    )
    code, answer = publish("bogus")
    assert code == 2 and answer["error"].startswith("no trained run 'bogus'")
    assert f"(the trained runs, newest first: {train_run})" in answer["error"]  # not a Parquet file's path
    code, answer = publish(train_run[:-2])
    assert code == 2 and answer["error"].endswith(f"did you mean {train_run}?")
    other = root / "runs" / "sasrec-othercatalogue"
    shutil.copytree(root / "runs" / train_run, other)
    config = json.loads((other / "config.json").read_text())
    config["catalog"]["sizes"] = [n + 1 for n in config["catalog"]["sizes"]]
    (other / "config.json").write_text(json.dumps(config))
    code, answer = publish(other.name)
    assert code == 2 and "trained on another catalogue" in answer["error"]
    moved = root / "runs" / "sasrec-moveditems"  # the same counts, two items in each other's rows
    shutil.copytree(root / "runs" / train_run, moved)
    items = pq.read_table(moved / "items.parquet").sort_by("global_id").to_pydict()
    items["item_id"][0], items["item_id"][1] = items["item_id"][1], items["item_id"][0]
    pq.write_table(pa.table(items, schema=pq.read_schema(moved / "items.parquet")), moved / "items.parquet")
    code, answer = publish(moved.name)
    assert code == 2 and "other items in its rows" in answer["error"]
    with duckdb.connect(str(warehouse), read_only=True) as con:
        assert con.execute("SELECT run_id FROM latest_run").fetchall() == [(train_run,)]

"""The night's parts on S3-compatible storage: a real S3 server (moto's server mode, an HTTP server on
127.0.0.1 started here), written by pyarrow's filesystem layer, read by DuckDB through that filesystem
registered on the connection; credentials and endpoint from the usual AWS environment variables."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow.fs as pafs
import pytest
from publish_data import workspace_vectors
from typer.testing import CliRunner

from bridgerec.cli import app
from bridgerec.storage import warehouse as wh
from bridgerec.storage.warehouse import parts as wh_parts
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.publish import PublishSettings, run_publish

BUCKET = "bridgerec-test"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "bridgerec-test",
        "AWS_SECRET_ACCESS_KEY": "bridgerec-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    wh_parts.filesystem.cache_clear()
    wh_parts._fsspec_for.cache_clear()
    pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")[0].create_dir(BUCKET)
    try:
        yield f"s3://{BUCKET}/nightly"
    finally:
        wh_parts.filesystem.cache_clear()
        wh_parts._fsspec_for.cache_clear()
        server.stop()


def objects(root: str) -> list[str]:
    fs, base = pafs.FileSystem.from_uri(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(i.path[len(base) + 1 :] for i in infos if i.type == pafs.FileType.File)


DEAD_WRITER = """
import sys, time
import pyarrow as pa
from bridgerec.storage import warehouse as wh
with wh.publish_attempt(sys.argv[1], "dead", sys.argv[2]) as attempt:
    rows = pa.table({"run_id": ["dead"], "user_id": ["u"], "domain": ["food"], "rank": pa.array([1], pa.int16()),
                     "item_id": ["i"], "score": pa.array([1.0], pa.float32())})
    attempt.target().write(rows, "recommendations", 0, "food")
    print("written", flush=True)
    time.sleep(120)
"""


def test_parts_on_s3_written_by_pyarrow_read_by_duckdb(
    s3: str, sample_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse = tmp_path / "w.duckdb"
    ws = Workspace(sample_workspace)
    settings = PublishSettings(
        k=5, data_dir=s3, retention_runs=1, retention_grace_hours=0, users_per_shard=400
    )
    first = run_publish(
        StageRun(settings, ws, warehouse=warehouse),
        run_id="r1",
        vectors=workspace_vectors(sample_workspace, seed=1),
    )
    assert first.data_root == s3 and first.shards == 3 and first.data_bytes > 0
    assert not (tmp_path / "w.parts").exists()  # nothing local but the small warehouse file
    stored = objects(s3)
    # Per shard and domain a recommendations and a serving part, per shard its users' histories, and the
    # night's catalogue (the sample workspace has no profiles).
    assert len(stored) == 3 * 2 * 2 + 3 + 1 and {o.split("/")[0] for o in stored} == {
        "recommendations",
        "serving",
        "interactions",
        "items",
    }
    # bridgerec's readers (and analysts' `connect`) read the parts through pyarrow's S3 filesystem.
    with wh.connect(warehouse) as con:
        assert con.execute(
            "SELECT count(*), count(DISTINCT user_id) FROM latest_recommendations"
        ).fetchall() == [(1000 * 2 * 5, 1000)]
        assert con.execute("SELECT count(*) FROM items WHERE title IS NOT NULL").fetchall() == [(6447,)]
    user = workspace_vectors(sample_workspace)["food"].user_ids[0]
    read = wh.user_recommendations(warehouse, user, run_id="r1")
    assert len(read["recommendations"]["kitchen"]) == 5 and read["history"]  # the history read from S3 too
    # A plain DuckDB without the httpfs extension (it is downloaded at first use) cannot read s3:// itself.
    with duckdb.connect(str(warehouse), read_only=True) as con, pytest.raises(duckdb.Error, match="httpfs"):
        con.execute("SELECT count(*) FROM latest_recommendations").fetchall()

    # A publish killed while writing to S3 leaves its objects unseen; the next publish removes them, and
    # retention (grace 0) deletes r1's objects after the swap that took them out of the views.
    dead = subprocess.Popen(
        [sys.executable, "-c", DEAD_WRITER, str(warehouse), s3], stdout=subprocess.PIPE, text=True
    )
    assert dead.stdout.readline().strip() == "written"
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert any("run_id=dead" in o for o in objects(s3))
    second = run_publish(
        StageRun(settings, ws, warehouse=warehouse),
        run_id="r2",
        vectors=workspace_vectors(sample_workspace, seed=2),
    )
    assert second.purged_runs == ["r1"]
    left = objects(s3)
    assert not any("run_id=dead" in o or "run_id=r1" in o for o in left)
    assert {o.split("/")[1] for o in left} == {"run_id=r2"}
    with wh.connect(warehouse) as con:
        assert con.execute("SELECT DISTINCT run_id FROM recommendations").fetchall() == [("r2",)]

    # An analyst without the endpoint (here: one where no server listens) gets one `error:` line saying
    # what to set, exit 2, from `sql -q` and `recs` alike (a new user's trial: a 57-line traceback, exit 1).
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    wh_parts.filesystem.cache_clear()
    wh_parts._fsspec_for.cache_clear()
    for argv in (
        ["sql", "--warehouse", str(warehouse), "-q", "SELECT count(*) FROM latest_recommendations"],
        ["recs", "--warehouse", str(warehouse), "--user", user],
    ):
        out = CliRunner().invoke(app, argv)
        assert out.exit_code == 2, out.output
        assert out.stderr.startswith("error: a part on the object store cannot be read (When ")
        assert "AWS_ENDPOINT_URL" in out.stderr and len(out.stderr.strip().splitlines()) == 1

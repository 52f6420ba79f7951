"""The real-world cases of issue #14 (tests/cases/<folder>, copied from the reports' inputs), each
asserting its folder's expected result, plus a variant per kind of fault that the folders do not hold.

Kinds: a traceback instead of an error; implausible input accepted silently; catalogue text cleaned
only for the model; the warehouse swap against another tool's read-write session; retries of errors
that cannot go away.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from case_files import copy_case
from typer.testing import CliRunner

from bridgerec.cli import app
from bridgerec.config import load_settings
from bridgerec.runtime.errors import InputError, is_transient
from bridgerec.storage import warehouse as wh
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import IngestError, IngestSettings, run_ingest
from bridgerec.tasks.publish import run_publish
from bridgerec.tasks.train import run_train


def _reconciles(summary: dict) -> None:
    for acc in summary["accounting"].values():
        assert acc["read"] == acc["kept"] + acc["quarantined"] + acc["filtered"]


# ---- 03: Amazon 2018 meta as Python dict literals ------------------------------------------------------


def test_03_amazon2018_python_literal_meta_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_case("03-amazon2018-python-literal-meta", tmp_path, monkeypatch)
    summary = run_ingest(StageRun(load_settings("config.yaml").ingest, Workspace(Path("ws")))).model_dump()
    assert summary["items_per_domain"] == {"food": 5, "kitchen": 5}
    assert (summary["users"], summary["interactions"], summary["quarantined"]) == (6, 21, 0)
    _reconciles(summary)
    items = pq.read_table("ws/ingest/items.parquet").to_pylist()
    f1 = next(i for i in items if i["item_id"] == "F1")
    assert f1["title"] == "Green tea bags, 20 count" and f1["price"] == "3.5"


def test_file_that_is_not_json_lines_stops_the_run_with_the_file_named(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variant of 03: a meta file in which no line parses (here CSV text) is not '100 % bad rows' of a
    domain that then vanishes: the run stops at ingest, naming the file, exit code 2, nothing written."""
    here = copy_case("03-amazon2018-python-literal-meta", tmp_path, monkeypatch)
    (here / "meta_food.json").write_text("asin,title\nF1,Green tea\nF2,Coffee\nF3,Crackers\n")
    result = CliRunner().invoke(app, ["ingest", "--config", "config.yaml", "-w", "ws", "--json"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: meta_food.json: 4 of 4 items rows quarantined (malformed_json: 4)")
    assert "not JSON lines" in line  # (Prefect still logs the task failure above it)
    assert not (here / "ws" / "ingest").exists()


def test_python_literals_are_never_evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ast.literal_eval reads literals only: a line with a call is a malformed row, not code run."""
    here = copy_case("03-amazon2018-python-literal-meta", tmp_path, monkeypatch)
    marker = tmp_path / "pwned"
    with open(here / "meta_food.json", "a") as fh:
        fh.write(f"{{'asin': 'F9', 'title': __import__('os').system('touch {marker}')}}\n")
    summary = run_ingest(StageRun(load_settings("config.yaml").ingest, Workspace(Path("ws")))).model_dump()
    assert not marker.exists()
    assert summary["accounting"]["items"]["quarantined_by_reason"] == {"malformed_json": 1}
    _reconciles(summary)


def test_lone_surrogates_cost_the_row_only_in_used_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valid JSON with half a surrogate pair: kept when the bad text is in a field the pipeline does
    not read (reviewText), its own reason when it is (title)."""
    here = copy_case("03-amazon2018-python-literal-meta", tmp_path, monkeypatch)
    with open(here / "kitchen.json", "a") as fh:
        fh.write(
            '{"reviewerID": "u05", "asin": "K5", "unixReviewTime": 1600500000, "reviewText": "ok \\ud800"}\n'
        )
    with open(here / "meta_kitchen.json", "a") as fh:
        fh.write('{"asin": "K6", "title": "Broken \\udc00 title", "category": ["Home"]}\n')
    summary = run_ingest(StageRun(load_settings("config.yaml").ingest, Workspace(Path("ws")))).model_dump()
    assert summary["accounting"]["interactions"]["read"] == 22
    assert summary["accounting"]["interactions"]["kept"] == 22  # the surrogate was in reviewText
    assert summary["accounting"]["items"]["quarantined_by_reason"] == {"invalid_unicode": 1}
    _reconciles(summary)
    q = pq.read_table("ws/ingest/quarantine.parquet").to_pylist()
    assert [(r["record"], r["reason"]) for r in q] == [(6, "invalid_unicode")]
    assert q[0]["file"].endswith("meta_kitchen.json")


# ---- 04: epoch timestamps in other units -----------------------------------------------------------------


def test_04_epoch_microseconds_are_read_as_the_instants_they_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_case("04-epoch-microseconds", tmp_path, monkeypatch)
    settings = IngestSettings(
        source="generic", items=Path("items.csv"), interactions=Path("interactions.csv")
    )
    summary = run_ingest(StageRun(settings, Workspace(Path("ws")))).model_dump()
    assert (summary["interactions"], summary["quarantined"]) == (21, 0)
    _reconciles(summary)
    rows = pq.read_table("ws/ingest/interactions.parquet").to_pylist()  # raised OverflowError before
    years = {r["timestamp"].year for r in rows}
    assert years == {2020}
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user_id"], []).append(r["timestamp"].timestamp())
    # u01 (seconds), u02 (milliseconds) and u03 (microseconds) start at the same instant
    assert by_user["u01"][0] == by_user["u02"][0] == by_user["u03"][0] == 1600000000.0
    assert by_user["u04"][0] == 1600000000.0  # 2020-09-13T17:26:40+05:00


def test_out_of_range_instants_are_quarantined_never_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variant of 04: nanoseconds are read; a year-52671 ISO date, an epoch beyond any unit, a date
    before the plausible range and infinity are quarantined as bad_timestamp, with no traceback."""
    here = copy_case("04-epoch-microseconds", tmp_path, monkeypatch)
    with open(here / "interactions.csv", "a") as fh:
        fh.write(
            "u07,F1,food,1600000000000000000\nu07,F2,food,1600086400000000000\nu07,K1,kitchen,1600172800000000000\n"
        )
        fh.write("u08,F1,food,52671-01-01T00:00:00Z\nu08,F2,food,99999999999999999999999999\n")
        fh.write("u08,F3,food,1969-12-31\nu08,F4,food,inf\n")
    settings = IngestSettings(
        source="generic", items=Path("items.csv"), interactions=Path("interactions.csv")
    )
    summary = run_ingest(StageRun(settings, Workspace(Path("ws")))).model_dump()
    assert summary["accounting"]["interactions"]["quarantined_by_reason"] == {"bad_timestamp": 4}
    assert summary["interactions"] == 24
    _reconciles(summary)
    rows = pq.read_table("ws/ingest/interactions.parquet").to_pylist()
    assert {r["timestamp"].year for r in rows} == {2020}
    assert sorted(r["timestamp"].timestamp() for r in rows if r["user_id"] == "u07")[0] == 1600000000.0


# ---- 06: Parquet with list columns -----------------------------------------------------------------------


def test_06_parquet_list_columns_are_read_and_joined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_case("06-parquet-list-columns", tmp_path, monkeypatch)
    summary = run_ingest(StageRun(load_settings("config.yaml").ingest, Workspace(Path("ws")))).model_dump()
    assert summary["items_per_domain"] == {"food": 5, "kitchen": 5}
    assert (summary["users"], summary["interactions"], summary["quarantined"]) == (6, 21, 0)
    _reconciles(summary)
    k1 = next(i for i in pq.read_table("ws/ingest/items.parquet").to_pylist() if i["item_id"] == "K1")
    assert k1["categories"] == "Home > Sub"  # joined as the JSON-lines reader joins lists
    assert k1["description"] is None  # an empty list
    assert json.loads(k1["attributes"]) == {"features": ["feature one", "feature two"]}
    assert (k1["brand"], k1["price"]) == ("Acme", "9.99")
    first = pq.read_table("ws/ingest/interactions.parquet").to_pylist()[0]
    assert first["timestamp"].timestamp() == 1600000000.0  # int64 milliseconds


def test_parquet_reads_only_mapped_columns_of_any_type(tmp_path: Path) -> None:
    """Variant of 06: a generic Parquet catalogue with a list `categories` and an unused map column in
    the interactions, whose timestamps are a Parquet TIMESTAMP type and a DATE type."""
    items = pa.table(
        {
            "item_id": ["a", "b", "c"],
            "domain": ["food", "food", "kitchen"],
            "title": ["Tea &amp; honey", "Oats", "Pan"],
            "categories": [["Grocery", "Tea"], ["Grocery"], []],
        }
    )
    ts = pa.array(
        [1_600_000_000_000_000 + i * 86_400_000_000 for i in range(6)], pa.timestamp("us", tz="UTC")
    )
    inter = pa.table(
        {
            "user_id": ["u1"] * 3 + ["u2"] * 3,
            "item_id": ["a", "b", "c", "c", "b", "a"],
            "domain": ["food", "food", "kitchen", "kitchen", "food", "food"],
            "timestamp": ts,
            "blob": pa.array([{"k": 1}] * 6, pa.map_(pa.string(), pa.int64())),
        }
    )
    pq.write_table(items, tmp_path / "items.parquet")
    pq.write_table(inter, tmp_path / "inter.parquet")
    settings = IngestSettings(items=tmp_path / "items.parquet", interactions=tmp_path / "inter.parquet")
    summary = run_ingest(StageRun(settings, Workspace(tmp_path / "ws"))).model_dump()
    assert (summary["interactions"], summary["quarantined"]) == (6, 0)
    _reconciles(summary)
    out = {r["item_id"]: r for r in pq.read_table(tmp_path / "ws/ingest/items.parquet").to_pylist()}
    assert out["a"]["categories"] == "Grocery > Tea" and out["a"]["title"] == "Tea & honey"
    got = [
        r["timestamp"].timestamp()
        for r in pq.read_table(tmp_path / "ws/ingest/interactions.parquet").to_pylist()
    ]
    assert got[0] == 1_600_000_000.0
    # a DATE column is read as midnight UTC
    dated = inter.set_column(3, "timestamp", pa.array([18518 + i for i in range(6)], pa.date32()))
    pq.write_table(dated, tmp_path / "inter.parquet")
    run_ingest(StageRun(settings, Workspace(tmp_path / "ws2")))
    first = pq.read_table(tmp_path / "ws2/ingest/interactions.parquet").to_pylist()[0]["timestamp"]
    assert first.isoformat() == "2020-09-13T00:00:00+00:00"


# ---- 11 and 12: a published warehouse ------------------------------------------------------------------


def _ingest_train_publish(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The case's three commands (ingest, train, publish) on its config; returns the warehouse path."""
    copy_case(name, tmp_path, monkeypatch)
    settings = load_settings("config.yaml")
    ws = Workspace(settings.workspace)
    run_ingest(StageRun(settings.ingest, ws))
    run_train(StageRun(settings.train.model_copy(update={"threads": 1}), ws, threads=1))
    run_publish(StageRun(settings.publish, ws, warehouse=settings.warehouse, threads=1))
    return settings.warehouse.resolve()


def _recs(warehouse: Path) -> CliRunner:
    return CliRunner().invoke(
        app, ["recs", "--warehouse", str(warehouse), "--user", "u001", "--domain", "kitchen", "--json"]
    )


def test_11_html_entities_are_decoded_everywhere_analysts_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse = _ingest_train_publish("11-html-entities-in-published-titles", tmp_path, monkeypatch)
    decoded = {"K03": "Pots & pans set, 10 pieces", "K07": "M&M's candy jar, 12\""}
    items = {r["item_id"]: r["title"] for r in pq.read_table("ws/ingest/items.parquet").to_pylist()}
    assert {k: items[k] for k in decoded} == decoded
    with duckdb.connect(str(warehouse), read_only=True) as con:
        assert (
            dict(con.execute("SELECT item_id, title FROM items WHERE item_id IN ('K03', 'K07')").fetchall())
            == decoded
        )
        shown = dict(con.execute("SELECT DISTINCT item_id, title FROM latest_recommendations").fetchall())
        assert not [t for t in shown.values() if "&amp;" in t or "&#39;" in t or "&quot;" in t]
    result = _recs(warehouse)
    assert result.exit_code == 0, result.output
    titles = {r["item_id"]: r["title"] for r in json.loads(result.stdout)["recommendations"]["kitchen"]}
    assert {k: titles[k] for k in decoded if k in titles} == {k: v for k, v in decoded.items() if k in titles}
    assert "&amp;" not in result.stdout


def test_markup_in_catalogue_text_is_removed_by_an_html_parser(tmp_path: Path) -> None:
    """Variant of 11: tags (and double-encoded entities) in title, brand and categories; a title that is
    only markup is an empty title."""
    (tmp_path / "items.csv").write_text(
        "item_id,domain,title,brand,categories\n"
        'a,food,"<b>Green</b> tea<br/>bags &amp;amp; honey",<i>Acme</i>,"Grocery &gt; Tea"\n'
        "b,food,Oats,,\n"
        'c,food,"<p></p>",,\n'
    )
    (tmp_path / "inter.csv").write_text(
        "user_id,item_id,domain,timestamp\n"
        + "".join(f"u{u},{i},food,{1600000000 + k}\n" for u in (1, 2) for k, i in enumerate("aba"))
    )
    summary = run_ingest(
        StageRun(
            IngestSettings(items=tmp_path / "items.csv", interactions=tmp_path / "inter.csv"),
            Workspace(tmp_path / "ws"),
        )
    ).model_dump()
    assert summary["accounting"]["items"]["quarantined_by_reason"] == {"empty_title": 1}
    _reconciles(summary)
    a = pq.read_table(tmp_path / "ws/ingest/items.parquet").to_pylist()[0]
    assert (a["title"], a["brand"], a["categories"]) == ("Green tea bags & honey", "Acme", "Grocery > Tea")
    raw = pq.read_table(tmp_path / "ws/ingest/quarantine.parquet").to_pylist()[0]["row"]
    assert "<p></p>" in raw  # quarantined rows keep the text as read


@pytest.fixture
def holder() -> Iterator[callable]:
    """Start a process that holds a database read-write (as the DuckDB CLI, DBeaver or `duckdb --ui` do
    by default; the case's hold_rw.py); stopped at the end."""
    procs: list[subprocess.Popen] = []

    def start(path: Path, write: bool = False) -> subprocess.Popen:
        code = (
            "import duckdb, sys\n"
            f"con = duckdb.connect({str(path)!r})\n"
            + ("con.execute('CREATE TABLE analyst_notes AS SELECT 42 AS x')\n" if write else "")
            + "print('open', flush=True)\nsys.stdin.readline()\ncon.close()\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "open"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_12_readwrite_session_during_publish(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holder: callable
) -> None:
    warehouse = _ingest_train_publish("12-readwrite-session-during-publish", tmp_path, monkeypatch)
    before = warehouse.read_bytes()
    proc = holder(warehouse)
    for args in (
        ["recs", "--warehouse", str(warehouse), "--user", "u001", "--domain", "kitchen", "--json"],
        ["runs", "list", "--warehouse", str(warehouse)],
        ["publish", "--config", "config.yaml", "--force", "--json"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(
            f"error: warehouse {warehouse} is open read-write in another process (PID {proc.pid}"
        )
        assert "read-only" in line
        if args[0] != "publish":  # (the publish flow's Prefect logs show the task failure above it)
            assert "Traceback" not in result.output
    assert "it was left as it was (nothing published, no swap)" in line
    assert warehouse.read_bytes() == before  # publish refused before the swap
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait()
    assert _recs(warehouse).exit_code == 0
    again = CliRunner().invoke(app, ["publish", "--config", "config.yaml", "--force", "--json"])
    assert again.exit_code == 0, again.output
    assert _recs(warehouse).exit_code == 0


def test_stale_write_ahead_log_is_set_aside_and_the_warehouse_stays_readable(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holder: callable
) -> None:
    """Variant of 12: a read-write session that wrote and was killed leaves `<warehouse>.wal`; the next
    publish moves it aside (kept, logged) and the new warehouse opens, in the 1.x storage format."""
    warehouse = _ingest_train_publish("12-readwrite-session-during-publish", tmp_path, monkeypatch)
    proc = holder(warehouse, write=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wal = warehouse.with_name(warehouse.name + ".wal")
    assert wal.exists()
    again = CliRunner().invoke(app, ["publish", "--config", "config.yaml", "--force", "--json"])
    assert again.exit_code == 0, again.output
    assert not wal.exists()
    assert len(list(warehouse.parent.glob(warehouse.name + ".wal.stale-*"))) == 1
    with duckdb.connect(str(warehouse), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM latest_recommendations").fetchall()[0][0] > 0
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "analyst_notes" not in tables  # hand edits in the live file are not published
    assert wh.storage_header_version(warehouse) == 64  # v1.0.0: every DuckDB 1.x client reads it
    assert _recs(warehouse).exit_code == 0


# ---- 16: retries of errors that cannot go away ---------------------------------------------------------


def test_16_nightly_does_not_retry_a_bad_input_file_and_exits_2(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_case("16-nightly-retries-deterministic-error", tmp_path, monkeypatch)
    monkeypatch.setenv("BRIDGEREC_RUNTIME__STAGE_RETRIES", "1")
    monkeypatch.setenv("BRIDGEREC_RUNTIME__RETRY_DELAY_SECONDS", "600")  # a retry would show in the time
    started = time.monotonic()
    result = CliRunner().invoke(app, ["run", "--config", "run.yaml", "--json"])
    elapsed = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: ratings_food.csv: missing required column(s) ['user_id', 'item_id', 'domain']")
    )
    assert elapsed < 300


def test_only_transient_failures_are_retried() -> None:
    """Variant of 16: the nightly flow's retry condition, over plain callables."""
    from bridgerec.flows.nightly import call_with_retries

    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("engine failed to start")
        return "done"

    assert call_with_retries("enrich", flaky, retries=2, delay_s=0) == "done" and len(calls) == 2

    def bad_input() -> None:
        calls.append(1)
        raise IngestError("x.csv: 9 of 10 interactions rows quarantined")

    calls.clear()
    with pytest.raises(IngestError):
        call_with_retries("ingest", bad_input, retries=3, delay_s=0)
    assert len(calls) == 1
    # the condition sees through wrapping: an input error raised from another is still an input error
    try:
        try:
            raise InputError("config: bad value")
        except InputError as inner:
            raise RuntimeError("stage failed") from inner
    except RuntimeError as wrapped:
        assert not is_transient(wrapped)
    assert is_transient(OSError("disk full"))


# ---- the warehouse file format: DuckDB 1.x clients -----------------------------------------------------

DUCKDB1 = Path(__file__).resolve().parents[1] / ".venv" / "duckdb1-client"  # 1.5.6, the newest 1.x
DUCKDB11 = DUCKDB1.with_name("duckdb11-client")  # 1.1.0, the oldest that reads the warehouse


def _open_with_duckdb1(path: Path, client: Path = DUCKDB1) -> subprocess.CompletedProcess:
    """Open `path` read-only with a DuckDB 1.x client that scripts/setup.sh installs apart
    (requirements/duckdb1-client.txt, duckdb11-client.txt), in a Python without the project's
    site-packages."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import duckdb\n"
        "con = duckdb.connect(sys.argv[2], read_only=True)\n"
        "print(duckdb.__version__, con.execute('SELECT count(*) FROM latest_recommendations').fetchall()[0][0],"
        " con.execute('SELECT max(version) FROM schema_migrations').fetchall()[0][0])\n"
    )
    return subprocess.run(
        [sys.executable, "-S", "-c", code, str(client), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_duckdb1_clients_open_a_published_warehouse(tmp_path: Path) -> None:
    """A warehouse written in DuckDB 2's own format (what publish wrote before the setting) shuts out
    1.x clients; the next publish converts it to the default v1.0.0 format, which real DuckDB 1.5.6 and
    1.1.0 clients open, views and all (1.0.0 cannot: requirements/duckdb11-client.txt)."""
    from tests.test_publish_warehouse import make_batch

    for client in (DUCKDB1, DUCKDB11):
        assert (client / "duckdb").is_dir(), f"{client} is missing: run scripts/setup.sh"
    path = tmp_path / "warehouse.duckdb"
    wh.publish(path, make_batch("r1"), retention_runs=3, storage_compatibility="latest")
    old = _open_with_duckdb1(path)
    assert old.returncode != 0 and "version number" in old.stderr
    wh.publish(path, make_batch("r2"), retention_runs=3)  # the default setting
    assert wh.storage_header_version(path) == 64
    for client, want in ((DUCKDB1, "1.5."), (DUCKDB11, "1.1.")):
        new = _open_with_duckdb1(path, client)
        assert new.returncode == 0, new.stderr
        version, rows, schema = new.stdout.split()
        assert version.startswith(want) and int(rows) == 5 * 2 * 3 and int(schema) == wh.SCHEMA_VERSION
    with duckdb.connect(str(path), read_only=True) as con:  # both runs survived the conversion
        assert [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY seq").fetchall()] == ["r1", "r2"]


def test_cli_logs_show_no_traceback_for_an_input_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Prefect's engine logs a failed run with its traceback; for a fault the user caused, the command line
    keeps the message (which names the file) and drops the frames. Other failures keep their traceback."""
    import logging

    from bridgerec.runtime.logs import hide_input_error_tracebacks
    from bridgerec.tasks.ingest import SourceError

    hide_input_error_tracebacks()
    prefect_handlers = logging.getLogger().handlers + logging.getLogger("prefect.flow_runs").handlers
    assert len(prefect_handlers) >= 2 and all(
        any(type(f).__name__ == "_HideInputErrorTracebacks" for f in h.filters) for h in prefect_handlers
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    hide_input_error_tracebacks()  # idempotent, and reaches handlers added since
    logger = logging.getLogger("bridgerec.test.tracebacks")
    logger.addHandler(handler)
    hide_input_error_tracebacks()
    try:
        for exc in (SourceError("ratings_food.csv: missing required column(s)"), RuntimeError("engine died")):
            try:
                try:
                    raise exc
                except Exception as inner:
                    raise RuntimeError("Flow run encountered an exception") from inner
            except RuntimeError:
                logger.error("run failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    first, second = err.split("ERROR run failed")[1:]
    assert "Traceback" not in first  # the input error: message only
    assert "Traceback" in second and "engine died" in second  # a crash keeps its frames

"""The runtime faults of issue #23 (tests/cases/<folder>, copied from the reports' inputs), each asserting
its folder's expected result, plus variants of each kind the folders do not hold.

Kinds: a Prefect API that is not there (26-prefect-api-unreachable); a damaged warehouse file
(27-damaged-warehouse).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from bridgerec.cli import app
from bridgerec.runtime.prefect_api import PrefectUnreachable, check_api, unreachable_in

CASES = Path(__file__).resolve().parent / "cases"


def _case(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writable copy of tests/cases/<name>, made the working directory (configs use relative paths)."""
    here = tmp_path / name
    shutil.copytree(CASES / name, here)
    monkeypatch.chdir(here)
    return here


def closed_local_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound by us, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- 26: PREFECT_API_URL pointing at a server that is not there ----------------------------------------

_COMMANDS = {
    "ingest": ["ingest", "--source", "generic", "--items", "items.csv", "--interactions", "interactions.csv"],
    "enrich": ["enrich", "--profiles", "none"],
    "train": ["train", "--model", "pop"],
    "publish": ["publish"],
    "run": ["run"],
}


def test_26_prefect_api_unreachable_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The case's command in a fresh process (Prefect reads PREFECT_API_URL at start-up), the URL at a
    closed port of this machine: one `error:` line naming the URL and what to do, exit 2, no traceback,
    nothing written, no hang."""
    here = _case("26-prefect-api-unreachable", tmp_path, monkeypatch)
    url = f"http://127.0.0.1:{closed_local_port()}/api"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "bridgerec.cli", *_COMMANDS["ingest"], "-w", "ws", "--json"],
        env={**os.environ, "PREFECT_API_URL": url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert time.monotonic() - started < 120  # mostly the imports; the probe itself waits 5 s at most
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()  # nothing else: no traceback, no Prefect log
    assert line == (
        f"error: the Prefect API at {url} (PREFECT_API_URL, from the environment) is unreachable (ConnectError: "
        "[Errno 111] Connection refused): start that server (`prefect server start`) or unset PREFECT_API_URL "
        "to run on a temporary local API"
    )
    assert not (here / "ws").exists()


@pytest.mark.parametrize("command", [c for c in _COMMANDS if c != "ingest"])
def test_every_flow_command_checks_the_api_first(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variant of 26: the other commands that run flows (in this process, the URL set as Prefect's
    settings and in the environment, as a shell export gives both)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    here = _case("26-prefect-api-unreachable", tmp_path, monkeypatch)
    url = f"http://127.0.0.1:{closed_local_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    with temporary_settings({PREFECT_API_URL: url}):
        result = CliRunner().invoke(app, [*_COMMANDS[command], "-w", "ws", "--json"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"error: the Prefect API at {url} (PREFECT_API_URL, from the environment) is unreachable"
    )
    assert result.stdout == "" and not (here / "ws").exists()


def test_an_api_url_from_the_profile_says_how_to_remove_it(tmp_path: Path) -> None:
    """Variant of 26: the URL set in the active Prefect profile (not the environment), and an API that
    answers (the probe lets it through)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{closed_local_port()}/api"
    with temporary_settings({PREFECT_API_URL: url}), pytest.raises(PrefectUnreachable) as info:
        check_api(timeout_s=2)
    assert "from the profile" in str(info.value) and "prefect config unset PREFECT_API_URL" in str(info.value)


def test_an_answering_api_passes_the_check(prefect_harness: None) -> None:
    check_api()  # the test harness's real server: no error


def test_a_server_that_goes_away_during_a_run_is_the_same_line() -> None:
    """Variant of 26: Prefect's own error when the server stops answering mid-run (its client raises
    RuntimeError('Failed to reach API at URL') from the httpx error) maps to the same message."""
    try:
        try:
            httpx.get(f"http://127.0.0.1:{closed_local_port()}/api/health", timeout=2)
        except httpx.ConnectError as exc:
            raise RuntimeError("Failed to reach API at http://127.0.0.1:4200/api/") from exc
    except RuntimeError as exc:
        found = unreachable_in(exc)
    assert found is not None and str(found).startswith("the Prefect API at http://127.0.0.1:4200/api/")
    assert unreachable_in(RuntimeError("engine died")) is None


# ---- 27: a damaged warehouse file ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def published_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Case 27's three commands (ingest, train, publish) run once; tests copy the folder."""
    from bridgerec.config import load_settings
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks import StageRun
    from bridgerec.tasks.ingest.stage import run_ingest
    from bridgerec.tasks.publish.stage import run_publish
    from bridgerec.tasks.train.stage import run_train

    here = tmp_path_factory.mktemp("published") / "27-damaged-warehouse"
    shutil.copytree(CASES / "27-damaged-warehouse", here)
    cwd = os.getcwd()
    os.chdir(here)
    try:
        settings = load_settings("config.yaml")
        ws = Workspace(settings.workspace)
        run_ingest(StageRun(settings.ingest, ws))
        run_train(StageRun(settings.train.model_copy(update={"threads": 1}), ws, threads=1))
        run_publish(StageRun(settings.publish, ws, warehouse=settings.warehouse, threads=1))
    finally:
        os.chdir(cwd)
    return here


def _tracebacks(output: str) -> list[str]:
    """The tracebacks in a command's output, but for logging's own reports of a Prefect console handler
    left writing to the stream of an earlier CliRunner invocation in this process (`--- Logging error
    ---` ... `Arguments: ...`: a test-harness artefact, not the command's)."""
    own = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", output, flags=re.DOTALL)
    return [line for line in own.splitlines() if line.startswith("Traceback")]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["truncate", "scribble"])
def test_27_damaged_warehouse_is_named_with_the_way_back(
    how: str, prefect_harness: None, published_case: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncated file (metadata gone) and one with damaged data blocks (it opens, then a read fails):
    `recs`, `runs list` and `publish --force` exit 2 with one error: line naming the file, saying it is
    damaged and what to do; publish changes nothing (the file, the indexes, no temporary left). The
    way the line gives then works."""
    here = tmp_path / "case"
    shutil.copytree(published_case, here)
    monkeypatch.chdir(here)
    warehouse = (here / "ws" / "warehouse.duckdb").resolve()
    damage = subprocess.run(
        [sys.executable, "corrupt.py", str(warehouse), how], capture_output=True, text=True
    )
    assert damage.returncode == 0, damage.stderr
    before = _tree(here / "ws")
    for args in (
        ["recs", "--warehouse", str(warehouse), "--user", "u001"],
        ["runs", "list", "--warehouse", str(warehouse)],
        ["publish", "--config", "config.yaml", "--force", "--json"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: warehouse {warehouse} is damaged ("), line
        assert f"`mv {warehouse} {warehouse}.damaged`" in line and "`bridgerec publish --force`" in line
        assert "bridgerec keeps no earlier copy" in line
        assert not _tracebacks(result.output)
    assert _tree(here / "ws") == before  # publish refused before it built or wrote anything
    # The way back, as the line says: move the file aside, publish again.
    warehouse.rename(warehouse.with_name(warehouse.name + ".damaged"))
    again = CliRunner().invoke(app, ["publish", "--config", "config.yaml", "--force", "--json"])
    assert again.exit_code == 0, again.output
    recs = CliRunner().invoke(app, ["recs", "--warehouse", str(warehouse), "--user", "u001", "--json"])
    assert recs.exit_code == 0 and '"recommendations"' in recs.stdout


def test_a_damaged_block_in_a_table_a_reader_does_not_touch_still_stops_publish(
    published_case: Path, tmp_path: Path
) -> None:
    """Variant of 27: damage in the blocks of one table only (the metrics, which `runs list` never
    reads; the recommendations are Parquet parts now): `runs list` works, but publish reads every block
    of the file first and refuses."""
    import duckdb

    from bridgerec.storage import warehouse as wh

    path = tmp_path / "warehouse.duckdb"
    shutil.copyfile(published_case / "ws" / "warehouse.duckdb", path)
    with duckdb.connect(str(path), read_only=True) as con:
        blocks = sorted(
            {
                int(r[0])
                for r in con.execute(
                    "SELECT block_id FROM pragma_storage_info('metrics') WHERE block_id >= 0"
                ).fetchall()
            }
        )
    assert blocks
    with open(
        path, "r+b"
    ) as fh:  # DuckDB files: 3 headers of 4 KiB, then 256 KiB blocks (8-byte checksum first)
        fh.seek(3 * 4096 + blocks[-1] * 262144 + 8)
        fh.write(b"\xff" * 512)
    assert wh.list_runs(path)  # the runs table's blocks are intact
    with pytest.raises(wh.WarehouseDamaged, match=r"is damaged .*Corrupt database file"):
        wh.verify_readable(path)

"""The runtime faults of issue #23 (tests/cases/<folder>, copied from the reports' inputs), each asserting
its folder's expected result, plus variants of each kind the folders do not hold.

Kinds: a Prefect API that is not there (26-prefect-api-unreachable).
"""

from __future__ import annotations

import os
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

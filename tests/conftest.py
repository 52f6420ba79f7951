"""Shared fixtures: one Prefect test harness per session, the bundled sample ingested once."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Under pytest-xdist each worker gets a Prefect home of its own (profiles, the ephemeral database), so
# two workers never share a SQLite file. Set before bridgerec.runtime.prefect_env imports prefect.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PREFECT_HOME"):
    os.environ["PREFECT_HOME"] = str(Path(os.environ["PREFECT_HOME"]) / os.environ["PYTEST_XDIST_WORKER"])

import bridgerec.runtime.prefect_env  # noqa: F401  (Prefect env defaults before prefect is imported)
from bridgerec.tasks import StageRun

# Prefect configures its console log handler when its main module is first imported (`from prefect
# import flow`), bound to the sys.stderr of that moment. Imported here (after prefect_env), that is the
# session's; first imported inside a CliRunner invocation, it would be that invocation's stream, closed
# when it returns ("--- Logging error ---" in every later test of the worker).
importlib.import_module("prefect.main")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SHARED_DATA = REPO.parent / "shared" / "data" / "food-kitchen"

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads were slower than 1 on 2 shared cores


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `slow` (minutes each) first, in file order otherwise: under pytest-xdist
    (scripts/test.sh: --dist loadfile --no-loadscope-reorder) the long files start at once on every
    worker instead of trailing at the end on one of them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A real temporary Prefect API (SQLite + server subprocess) for flow-run tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def sample_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample ingested into a session-wide workspace (read-only for tests)."""
    from bridgerec.storage.workspace import Workspace
    from bridgerec.tasks.ingest import IngestSettings, run_ingest

    root = tmp_path_factory.mktemp("sample_ws")
    settings = IngestSettings(items=SAMPLE / "items.csv.gz", interactions=SAMPLE / "interactions.csv.gz")
    run_ingest(StageRun(settings, Workspace(root)))
    return root


@pytest.fixture(scope="session")
def enriched_workspace(
    sample_workspace: Path, tmp_path_factory: pytest.TempPathFactory, worker_id: str
) -> Path:
    """The sample's ingest + the real enrich stage as the train tests run it (tests/train_data.py): vLLM
    MiniLM item embeddings and PCA tables, SmolLM2 profiles for the first 12 users only (so most users
    train without the profile term). Built once per test run: under pytest-xdist the first worker that
    needs it builds it in the run's shared temporary folder while the others wait on a file lock
    (pytest-xdist's documented way to run a session fixture once), and every worker reads that folder.
    Read-only: copy its stage folders to train in it."""
    import shutil

    from filelock import FileLock

    from bridgerec.storage.workspace import Workspace
    from tests.train_data import run_enrich_like_tests

    # A worker's base temp is <run>/popen-gwN: their parent is this run's alone. Without workers the base
    # temp itself (its parent holds every earlier run's).
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent
    root, done = shared / "enriched_sample", shared / "enriched_sample.done"
    with FileLock(shared / "enriched_sample.lock"):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a worker that died half-way through building it
            shutil.copytree(sample_workspace / "ingest", root / "ingest")
            run_enrich_like_tests(Workspace(root))
            done.touch()
    return root

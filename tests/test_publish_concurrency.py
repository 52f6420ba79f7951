"""Analysts read while the nightly publishes: a real reader process loops over read-only connections during
several publishes and must see zero errors and zero inconsistent reads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from publish_data import workspace_vectors

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.publish import PublishSettings, run_publish

READER = Path(__file__).with_name("publish_reader.py")


def test_reader_process_never_blocked_or_misled_during_publishes(
    sample_workspace: Path, tmp_path: Path
) -> None:
    warehouse = tmp_path / "warehouse.duckdb"
    settings = PublishSettings(k=20, retention_runs=3)
    ws = Workspace(sample_workspace)
    run_publish(
        StageRun(settings, ws, warehouse=warehouse),
        run_id="run-0",
        vectors=workspace_vectors(sample_workspace, seed=0),
    )
    stop = tmp_path / "stop"
    readers = {}
    for mode in ("fresh", "held"):
        ready, out = tmp_path / f"{mode}.ready", tmp_path / f"{mode}.json"
        proc = subprocess.Popen(
            [sys.executable, str(READER), mode, str(warehouse), str(stop), str(ready), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        readers[mode] = (proc, ready, out)
    try:
        deadline = time.monotonic() + 60
        for proc, ready, _ in readers.values():
            while not ready.exists():
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "reader did not start"
                time.sleep(0.05)
        published = []
        for i in range(1, 7):
            summary = run_publish(
                StageRun(settings, ws, warehouse=warehouse),
                run_id=f"run-{i}",
                vectors=workspace_vectors(sample_workspace, seed=i),
            )
            published.append(summary)
            time.sleep(0.1)  # let the reader see each run
    finally:
        stop.touch()
        outputs = {mode: proc.communicate(timeout=60)[0] for mode, (proc, _, _) in readers.items()}
    results = {}
    for mode, (proc, _, out) in readers.items():
        assert proc.returncode == 0, outputs[mode]
        results[mode] = result = json.loads(out.read_text())
        assert result["n_errors"] == 0, result["errors"]
        assert result["n_inconsistent"] == 0, result["inconsistent"]
        assert result["reads"] >= 30, result  # the readers really ran across the publishes
    # Fresh connections saw the runs change under them, never going back to an older one.
    seen = results["fresh"]["runs_seen"]
    assert len(seen) >= 4 and seen == sorted(seen) and seen[-1] == "run-6", seen
    # The connection opened before the publishes kept its snapshot, whole, throughout.
    assert results["held"]["runs_seen"] == ["run-0"]
    assert [s.rows for s in published] == [1000 * 2 * 20] * 6
    assert published[-1].purged_runs == ["run-3"]

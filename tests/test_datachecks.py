"""Data checks before training, on real Parquet files laid out as ingest writes them: counts, new and gone
shares per domain against the last checked night; a large drop stops the night and is not remembered as
the new normal."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.quality import DataCheckSettings, check_data, keep_data_snapshot


def _night(root: Path, users: dict[str, int], extra_kitchen: int = 0) -> Workspace:
    """ingest/items.parquet and interactions.parquet: per domain, `users[domain]` users with 3 items each."""
    ingest = root / "ingest"
    ingest.mkdir(parents=True, exist_ok=True)
    items = [(f"{d}-{i}", d, k) for k, d in enumerate(sorted(users)) for i in range(10)]
    pq.write_table(
        pa.table(
            {
                "item_id": [i[0] for i in items],
                "domain": [i[1] for i in items],
                "domain_idx": pa.array([i[2] for i in items], pa.int8()),
            }
        ),
        ingest / "items.parquet",
    )
    rows = []
    for k, d in enumerate(sorted(users)):
        for u in range(users[d]):
            rows += [(f"u{u}", f"{d}-{p}", k, p) for p in range(3)]
    rows += [("u0", "kitchen-9", sorted(users).index("kitchen"), 100 + n) for n in range(extra_kitchen)]
    pq.write_table(
        pa.table(
            {
                "user_id": [r[0] for r in rows],
                "item_id": [r[1] for r in rows],
                "domain_idx": pa.array([r[2] for r in rows], pa.int8()),
                "seq_pos": pa.array([r[3] for r in rows], pa.int32()),
            }
        ),
        ingest / "interactions.parquet",
    )
    return Workspace(root)


def test_data_checks_compare_with_the_last_good_night_and_stop_a_large_drop(tmp_path: Path) -> None:
    settings = DataCheckSettings(max_drop=0.2)
    first = check_data(settings, _night(tmp_path, {"food": 100, "kitchen": 100}))
    assert first.passed and "first night" in first.message
    assert keep_data_snapshot(Workspace(tmp_path))  # the night completed: its data is the reference
    assert {(r["entity"], r["domain"]): r["count"] for r in first.rows}[("interactions", "kitchen")] == 300

    second = check_data(settings, _night(tmp_path, {"food": 100, "kitchen": 100}, extra_kitchen=30))
    rows = {(r["entity"], r["domain"]): r for r in second.rows}
    kitchen = rows[("interactions", "kitchen")]
    assert second.passed and (kitchen["count"], kitchen["previous"], kitchen["new"], kitchen["gone"]) == (
        330,
        300,
        30,
        0,
    )
    assert abs(kitchen["share_new"] - 30 / 330) < 1e-6 and abs(kitchen["change"] - 0.1) < 1e-6
    assert rows[("users", "food")]["change"] == 0.0 and rows[("items", "food")]["share_gone"] == 0.0
    assert keep_data_snapshot(Workspace(tmp_path))

    # A truncated export: half of the food users are missing.
    dropped = check_data(settings, _night(tmp_path, {"food": 50, "kitchen": 100}, extra_kitchen=30))
    assert not dropped.passed
    assert (
        "food interactions 300 -> 150 (-50.0%)" in dropped.message
        and "food users 100 -> 50" in dropped.message
    )
    assert "checks.max_drop" in dropped.message

    # The refused night did not become the reference: the full export compares with the second night.
    again = check_data(settings, _night(tmp_path, {"food": 100, "kitchen": 100}, extra_kitchen=30))
    assert again.passed and all(r["change"] == 0.0 for r in again.rows)
    assert keep_data_snapshot(Workspace(tmp_path))

    # A night that passes its checks and then fails (a stage, or the gate) keeps nothing: its rerun, with
    # more data still, is compared with the last completed night and shows everything new since then.
    passed = check_data(settings, _night(tmp_path, {"food": 100, "kitchen": 100}, extra_kitchen=40))
    assert passed.passed  # ... and the night fails after its checks: keep_data_snapshot is not called
    rerun = check_data(settings, _night(tmp_path, {"food": 100, "kitchen": 100}, extra_kitchen=50))
    kitchen = {(r["entity"], r["domain"]): r for r in rerun.rows}[("interactions", "kitchen")]
    assert (kitchen["count"], kitchen["previous"], kitchen["new"]) == (350, 330, 20)

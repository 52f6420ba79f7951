"""Ingest on small raw fixtures in every format, messy rows included: every row is accounted for."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import IngestError, IngestSettings, SourceError, run_ingest

ITEMS_CSV = """item_id,domain,title,brand
i1,food,Apple,Orchard
i2,food,Banana,
i3,kitchen,Pan,Tefal
i4,kitchen,Pot,
i5,kitchen,Knife,
,food,No id,
i6,garden,Rake,
i7,food
i1,food,Apple,Orchard
i2,food,Banana bread,
i8,kitchen,,
i9,food,Cherry,
"""
# u1: 4 clean rows; u2: 3 clean; u3: 2 clean (short); u4: 3 clean, plus one bad row of each kind.
INTERACTIONS_CSV = """user_id,item_id,domain,position
u1,i1,food,0
u1,i3,kitchen,1
u1,i2,food,2
u1,i4,kitchen,3
u2,i3,kitchen,0
u2,i4,kitchen,1
u2,i5,kitchen,2
u3,i1,food,0
u3,i2,food,1
u4,i2,food,2
u4,i9,food,0
u4,i5,kitchen,1
u1,i4,kitchen,3
,i1,food,4
u2,i1,garden,3
u2,i1,food,x
u2,i1,kitchen,4
u2,i99,food,5
u2,i6,garden,6
u2,i1
u2,i1,food,7,extra
"""
EXPECT_INTER_QUARANTINE = {
    "empty_id": 1,
    "unknown_domain": 2,
    "bad_position": 1,
    "domain_mismatch": 1,
    "unknown_item": 1,
    "too_few_fields": 1,
    "too_many_fields": 1,
}
EXPECT_ITEM_QUARANTINE = {
    "empty_id": 1,
    "unknown_domain": 1,
    "too_few_fields": 1,
    "conflicting_item": 1,
    "empty_title": 1,
}


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _generic(tmp_path: Path, **kw) -> IngestSettings:
    items = _write(tmp_path / "items.csv", ITEMS_CSV)
    inter = _write(tmp_path / "interactions.csv.gz", INTERACTIONS_CSV)
    kw.setdefault("domains", ["food", "kitchen"])  # 'garden' rows are then unknown
    return IngestSettings(items=items, interactions=inter, **kw)


def _check_accounting(summary) -> None:
    for table, acc in summary.accounting.items():
        total = acc["kept"] + acc["quarantined"] + acc["filtered"]
        assert acc["read"] == total, (table, acc)
        assert acc["quarantined"] == sum(acc["quarantined_by_reason"].values())


def test_generic_csv_messy_rows_are_quarantined_with_reasons(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    s = run_ingest(StageRun(_generic(tmp_path), ws))
    _check_accounting(s)
    inter, items = s.accounting["interactions"], s.accounting["items"]
    assert inter["read"] == 21
    assert inter["quarantined_by_reason"] == EXPECT_INTER_QUARANTINE
    assert inter["filtered_by_reason"] == {"duplicate": 1, "short_sequence": 2}
    assert inter["kept"] == 10 and s.users == 3
    assert items["read"] == 12
    assert items["quarantined_by_reason"] == EXPECT_ITEM_QUARANTINE
    # i1's second identical row is a duplicate; i9 has no kept interaction? (u4 keeps it)
    assert items["filtered_by_reason"] == {"duplicate": 1}
    assert s.items == 6 and s.items_per_domain == {"food": 3, "kitchen": 3}
    assert s.overlap_users == 2  # u1 and u4

    q = pq.read_table(ws.stage_dir("ingest") / "quarantine.parquet").to_pylist()
    assert (
        len(q)
        == s.quarantined
        == sum(EXPECT_INTER_QUARANTINE.values()) + sum(EXPECT_ITEM_QUARANTINE.values())
    )
    bad_pos = next(r for r in q if r["reason"] == "bad_position")
    assert (
        bad_pos["table"] == "interactions"
        and '"x"' in bad_pos["row"]
        and bad_pos["file"].endswith("interactions.csv.gz")
    )
    assert any(r["reason"] == "too_many_fields" and "extra" in r["row"] for r in q)


def test_ids_sequences_and_leave_one_out_split(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    run_ingest(StageRun(_generic(tmp_path), ws))
    items = ws.read_table("ingest", "items").to_pylist()
    domains = ws.read_table("ingest", "domains").to_pylist()
    assert [d["domain"] for d in domains] == ["food", "kitchen"]
    assert [(d["n_items"], d["global_offset"]) for d in domains] == [(3, 0), (3, 3)]
    by_id = {r["item_id"]: r for r in items}
    assert sorted(r["global_id"] for r in items) == [1, 2, 3, 4, 5, 6]  # 0 is padding
    assert by_id["i3"]["global_id"] == 3 + by_id["i3"]["local_id"]
    assert by_id["i1"]["brand"] == "Orchard" and by_id["i2"]["brand"] is None

    seqs = {r["user_id"]: r for r in ws.read_table("ingest", "sequences").to_pylist()}
    g = {k: v["global_id"] for k, v in by_id.items()}
    assert seqs["u1"]["global_ids"] == [g["i1"], g["i3"], g["i2"], g["i4"]]  # ordered by position
    assert seqs["u4"]["global_ids"] == [g["i9"], g["i5"], g["i2"]]  # file order != position order
    assert seqs["u4"]["domain_idx"] == [0, 1, 0]
    inter = ws.read_table("ingest", "interactions").to_pylist()
    u1 = [r["split"] for r in inter if r["user_id"] == "u1"]
    assert u1 == ["train", "train", "valid", "test"]


def test_interactions_ordered_by_file_order_alone_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two of a user's interactions at the same position (a faulty export): the files' order decides which
    is the test target, and ingest counts them (`order_ties`) with a warning, instead of deciding silently."""
    clean = "\n".join(r for r in INTERACTIONS_CSV.splitlines()[:13])  # header + the 12 clean rows
    tied = clean + "\nu2,i1,food,2\n"  # u2 had i5 at position 2: now i1 is there too
    (tmp_path / "tied").mkdir()
    settings = IngestSettings(
        items=_write(tmp_path / "items.csv", ITEMS_CSV),
        interactions=_write(tmp_path / "tied" / "interactions.csv", tied),
        domains=["food", "kitchen"],
    )
    with caplog.at_level("INFO"):
        s = run_ingest(StageRun(settings, Workspace(tmp_path / "ws")))
    assert s.order_ties == 2  # both rows at u2's position 2
    assert any(
        r.levelname == "WARNING" and "2 interactions share their position" in r.getMessage()
        for r in caplog.records
    )
    clean_run = run_ingest(
        StageRun(settings.model_copy(update={"interactions": _write(tmp_path / "interactions.csv", clean + "\n")}),
                 Workspace(tmp_path / "ws2"))
    )  # fmt: skip
    assert clean_run.order_ties == 0


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet"])
def test_other_formats_give_the_same_dataset(tmp_path: Path, fmt: str) -> None:
    base = Workspace(tmp_path / "csv")
    run_ingest(StageRun(_generic(tmp_path), base))
    clean_items = [
        {"item_id": "i1", "domain": "food", "title": "Apple", "brand": "Orchard"},
        {"item_id": "i2", "domain": "food", "title": "Banana"},
        {"item_id": "i3", "domain": "kitchen", "title": "Pan", "brand": "Tefal"},
        {"item_id": "i4", "domain": "kitchen", "title": "Pot"},
        {"item_id": "i5", "domain": "kitchen", "title": "Knife"},
        {"item_id": "i9", "domain": "food", "title": "Cherry"},
    ]
    rows = [line.split(",") for line in INTERACTIONS_CSV.splitlines()[1:13]]
    clean_inter = [{"user_id": u, "item_id": i, "domain": d, "position": int(p)} for u, i, d, p in rows]
    if fmt == "parquet":
        items_path, inter_path = tmp_path / "items.parquet", tmp_path / "inter.parquet"
        pq.write_table(pa.Table.from_pylist(clean_items), items_path)
        pq.write_table(pa.Table.from_pylist(clean_inter), inter_path)
    else:
        items_path = _write(tmp_path / f"items.{fmt}", "\n".join(json.dumps(r) for r in clean_items) + "\n")
        body = "\n".join(json.dumps(r) for r in clean_inter) + "\n{not json\n"
        inter_path = _write(tmp_path / f"inter.{fmt}", body)
    ws = Workspace(tmp_path / fmt)
    s = run_ingest(StageRun(IngestSettings(items=items_path, interactions=inter_path), ws))
    _check_accounting(s)
    assert s.quarantined_by_reason == ({} if fmt == "parquet" else {"malformed_json": 1})
    assert ws.read_table("ingest", "sequences").equals(base.read_table("ingest", "sequences"))
    assert (
        ws.read_table("ingest", "items")
        .drop(["attributes"])
        .equals(base.read_table("ingest", "items").drop(["attributes"]))
    )


def _amazon2018(tmp_path: Path) -> IngestSettings:
    def reviews(domain: str, rows: list[dict], extra: str = "") -> Path:
        text = "\n".join(json.dumps(r) for r in rows) + "\n" + extra
        return _write(tmp_path / f"{domain}.json.gz", text)

    def meta(domain: str, rows: list[dict]) -> Path:
        return _write(tmp_path / f"meta_{domain}.json.gz", "\n".join(json.dumps(r) for r in rows) + "\n")

    food_items = [
        {
            "asin": f"F{i}",
            "title": f"Food {i}",
            "brand": "B",
            "category": ["Grocery", "Snacks"],
            "price": "$1.99",
            "description": ["Tasty", "snack"],
        }
        for i in range(4)
    ]
    kit_items = [
        {"asin": f"K{i}", "title": f"Kitchen {i}", "category": ["Home", "Kitchen"]} for i in range(4)
    ]
    food, kit = [], []
    t0 = 1_500_000_000
    # 6 users with 3 food + 3 kitchen reviews over items 0..2 of each domain; item 3 of each domain is
    # reviewed once only (so k-core with item_min=2 removes it); user 'x' has 3 reviews, one of them K3.
    for u in range(6):
        for k in range(3):
            food.append(
                {
                    "reviewerID": f"U{u}",
                    "asin": f"F{k}",
                    "unixReviewTime": t0 + 100 * u + 2 * k,
                    "overall": 5.0,
                }
            )
            kit.append(
                {
                    "reviewerID": f"U{u}",
                    "asin": f"K{k}",
                    "unixReviewTime": t0 + 100 * u + 2 * k + 1,
                    "overall": 4.0,
                }
            )
    food.append({"reviewerID": "U0", "asin": "F3", "unixReviewTime": t0 + 99, "overall": 3.0})
    kit.append({"reviewerID": "x", "asin": "K0", "unixReviewTime": t0, "overall": 3.0})
    kit.append({"reviewerID": "x", "asin": "K1", "unixReviewTime": t0, "overall": 3.0})
    kit.append({"reviewerID": "x", "asin": "K3", "unixReviewTime": t0, "overall": 3.0})
    kit.append(
        {"reviewerID": "U1", "asin": "K1", "unixReviewTime": "yesterday", "overall": 3.0}
    )  # bad_timestamp
    kit.append({"reviewerID": "U1", "unixReviewTime": t0, "overall": 3.0})  # no asin: too_few_fields
    return IngestSettings.model_validate(
        {
            "source": "amazon2018",
            "amazon": {
                "food": {
                    "reviews": reviews("food", food, extra="{broken\n"),
                    "meta": meta("food", food_items),
                },
                "kitchen": {"reviews": reviews("kitchen", kit), "meta": meta("kitchen", kit_items)},
            },
            "kcore": {"user_min": 3, "item_min": 2},
        }
    )


def test_amazon2018_with_iterative_kcore(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    s = run_ingest(StageRun(_amazon2018(tmp_path), ws))
    _check_accounting(s)
    inter = s.accounting["interactions"]
    assert inter["quarantined_by_reason"] == {"bad_timestamp": 1, "malformed_json": 1, "too_few_fields": 1}
    # Round 1 removes F3 and K3 (1 review each); x then has 2 reviews left -> removed in round 2.
    assert inter["filtered_by_reason"] == {"k_core": 4}
    assert s.users == 6 and s.items == 6 and s.interactions == 36 and s.overlap_users == 6
    assert s.kcore_rounds >= 2
    items = {r["item_id"]: r for r in ws.read_table("ingest", "items").to_pylist()}
    assert items["F0"]["categories"] == "Grocery > Snacks" and items["F0"]["description"] == "Tasty snack"
    assert items["F0"]["price"] == "$1.99" and items["K0"]["brand"] is None
    inter_rows = ws.read_table("ingest", "interactions").to_pylist()
    u0 = [r["item_id"] for r in inter_rows if r["user_id"] == "U0"]
    assert u0 == ["F0", "K0", "F1", "K1", "F2", "K2"]  # mixed, ordered by time
    assert inter_rows[0]["timestamp"].year == 2017


def test_amazon2023_time_window(tmp_path: Path) -> None:
    t0 = 1_600_000_000_000  # ms
    reviews = [
        {"user_id": f"U{u}", "parent_asin": f"P{k}", "timestamp": t0 + 86_400_000 * (10 * u + k), "rating": 5}
        for u in range(3)
        for k in range(4)
    ]
    meta = [
        {
            "parent_asin": f"P{k}",
            "title": f"Thing {k}",
            "store": "S",
            "categories": ["A", "B"],
            "price": 9.5,
            "features": ["f1"],
            "description": ["d"],
        }
        for k in range(4)
    ]
    settings = IngestSettings.model_validate(
        {
            "source": "amazon2023",
            "amazon": {
                "toys": {
                    "reviews": _write(tmp_path / "Toys.jsonl", "\n".join(json.dumps(r) for r in reviews)),
                    "meta": _write(tmp_path / "meta_Toys.jsonl", "\n".join(json.dumps(r) for r in meta)),
                }
            },
            "kcore": {"enabled": False},
            "time_window": {"start": "2020-09-23T00:00:00Z"},
        }
    )
    ws = Workspace(tmp_path / "ws")
    s = run_ingest(StageRun(settings, ws))
    _check_accounting(s)
    # 2020-09-13 + (10u + k) days: U0 falls wholly before the window start.
    assert s.accounting["interactions"]["filtered_by_reason"] == {"time_window": 4}
    assert s.users == 2
    items = {r["item_id"]: r for r in ws.read_table("ingest", "items").to_pylist()}
    assert items["P0"]["brand"] == "S" and items["P0"]["price"] == "9.5"
    assert json.loads(items["P0"]["attributes"]) == {"features": ["f1"]}


def test_unchanged_rerun_skips_and_changed_input_rebuilds(tmp_path: Path) -> None:
    settings = _generic(tmp_path)
    ws = Workspace(tmp_path / "ws")
    first = run_ingest(StageRun(settings, ws))
    again = run_ingest(StageRun(settings, ws))
    assert again.skipped and again.users == first.users
    _write(settings.interactions, INTERACTIONS_CSV + "u3,i9,food,2\n")
    third = run_ingest(StageRun(settings, ws))
    assert not third.skipped and third.users == 4
    changed_rules = run_ingest(StageRun(settings.model_copy(update={"min_interactions": 4}), ws))
    assert not changed_rules.skipped and changed_rules.users == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip"), "not a valid gzip"),
        (lambda p: _write(p, "user_id,item\nu1,i1\n"), "missing required column"),
        (lambda p: _write(p, "user_id,item_id,domain\nu1,i1,food\n"), "'timestamp' or a 'position'"),
        (
            lambda p: p.write_bytes(
                gzip.compress("user_id,item_id,domain,position\nu1,caf\xe9,food,0\n".encode("latin-1"))
            ),
            "UTF-8",
        ),
    ],
    ids=["bad-gzip", "missing-columns", "no-order-column", "wrong-encoding"],
)
def test_bad_files_stop_with_a_named_error_and_leave_the_workspace_alone(
    tmp_path: Path, make, message: str
) -> None:
    settings = _generic(tmp_path)
    ws = Workspace(tmp_path / "ws")
    before = run_ingest(StageRun(settings, ws))
    manifest = (ws.stage_dir("ingest") / "manifest.json").read_text()
    make(settings.interactions)
    with pytest.raises(SourceError) as err:
        run_ingest(StageRun(settings, ws))
    assert str(settings.interactions) in str(err.value) and message in str(err.value)
    assert (ws.stage_dir("ingest") / "manifest.json").read_text() == manifest  # previous output intact
    assert not (ws.root / ".staging").exists()
    assert ws.read_table("ingest", "users").num_rows == before.users


def test_nothing_left_is_a_clear_error(tmp_path: Path) -> None:
    """The message names the file and accounts for every row read: quarantined and filtered by reason."""
    settings = _generic(tmp_path, min_interactions=50)
    with pytest.raises(IngestError, match="no interactions left") as err:
        run_ingest(StageRun(settings, Workspace(tmp_path / "ws")))
    message = str(err.value)
    assert message.startswith(f"{settings.interactions}: ") and "read: 21;" in message
    for reason, n in EXPECT_INTER_QUARANTINE.items():
        assert f"{reason}: {n}" in message
    # 21 read, 8 quarantined, 1 duplicate: the other 12 rows are users under 50 interactions.
    assert "filtered: short_sequence: 12, duplicate: 1);" in message


def test_header_only_files_are_errors_naming_the_file(tmp_path: Path) -> None:
    """A catalogue or an interactions file with a header and no rows: one error naming that file."""
    settings = _generic(tmp_path)
    empty_items = _write(tmp_path / "empty_items.csv", "item_id,domain,title\n")
    with pytest.raises(IngestError) as err:
        run_ingest(
            StageRun(
                settings.model_copy(update={"items": empty_items, "domains": None}), Workspace(tmp_path / "a")
            )
        )
    assert str(err.value).startswith(f"{empty_items}: no domains: none of its 0 catalogue rows")
    empty_inter = _write(tmp_path / "empty_inter.csv", "user_id,item_id,domain,position\n")
    ws = Workspace(tmp_path / "b")
    with pytest.raises(IngestError) as err:
        run_ingest(StageRun(settings.model_copy(update={"interactions": empty_inter}), ws))
    assert str(err.value).startswith(f"{empty_inter}: no interactions left") and "read: 0;" in str(err.value)
    assert not ws.stage_dir("ingest").exists()


def test_a_memory_limit_spills_and_gives_the_same_dataset(sample_workspace: Path, tmp_path: Path) -> None:
    """`ingest.memory_limit` far below the k-core's and the splits' working set: DuckDB spills to
    `ingest.spill_dir` and the dataset is the one built without a limit (same ids, sequences, split)."""
    from tests.conftest import SAMPLE

    spill = tmp_path / "not-yet" / "spill"  # created by ingest
    settings = IngestSettings(
        items=SAMPLE / "items.csv.gz",
        interactions=SAMPLE / "interactions.csv.gz",
        kcore={"enabled": True, "user_min": 3, "item_min": 2},
        memory_limit="16MB",
        spill_dir=spill,
    )
    limited = Workspace(tmp_path / "limited")
    unlimited = Workspace(tmp_path / "unlimited")
    run_ingest(StageRun(settings, limited))
    run_ingest(StageRun(settings.model_copy(update={"memory_limit": None, "spill_dir": None}), unlimited))
    for name in ("items", "users", "sequences", "interactions"):
        assert limited.read_table("ingest", name).equals(unlimited.read_table("ingest", name)), name
    assert not list(spill.rglob("*"))  # DuckDB's spill files are gone with the session

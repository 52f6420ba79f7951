"""Real data: food-kitchen (or the bundled sample where ../shared is absent), clean and with injected bad
rows of every kind: the clean counts stay exactly the same and every injected row is accounted for."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import IngestSettings, run_ingest
from tests.conftest import SAMPLE, SHARED_DATA

FULL = SHARED_DATA if (SHARED_DATA / "interactions.csv.gz").exists() else None

# Injected interaction rows, one per kind of bad input, with the reason each must get.
BAD_INTERACTIONS = {
    "empty_id": ",{item},{domain},0",
    "unknown_domain": "badU1,{item},garden,0",
    "bad_position": "badU2,{item},{domain},seven",
    "domain_mismatch": "badU3,{item},{other},0",
    "unknown_item": "badU4,NO_SUCH_ITEM,{domain},0",
    "too_few_fields": "badU5,{item}",
    "too_many_fields": "badU6,{item},{domain},0,extra",
}
BAD_ITEMS = {
    "empty_id": ",{domain},A title",
    "unknown_domain": "NEWITEM1,garden,A title",
    "too_few_fields": "NEWITEM2,{domain}",
}


def _inject(src: Path, dst: Path, lines: list[str]) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as fh:
        text = fh.read()
    with gzip.open(dst, "wt", encoding="utf-8") as fh:
        fh.write(text + "\n".join(lines) + "\n")


@pytest.mark.parametrize("dataset", ["sample", "food-kitchen"])
def test_injected_bad_rows_keep_the_clean_counts(tmp_path: Path, dataset: str) -> None:
    if dataset == "food-kitchen" and FULL is None:
        pytest.skip("../shared/data/food-kitchen is not beside this checkout")
    src = SAMPLE if dataset == "sample" else FULL
    domains = ["food", "kitchen"]
    clean = run_ingest(
        StageRun(
            IngestSettings(
                items=src / "items.csv.gz", interactions=src / "interactions.csv.gz", domains=domains
            ),
            Workspace(tmp_path / "clean"),
        )
    )
    if dataset == "food-kitchen":
        assert (clean.users, clean.items, clean.interactions, clean.overlap_users) == (
            53_061,
            36_298,
            436_127,
            9_398,
        )
        assert clean.items_per_domain == {"food": 8_661, "kitchen": 27_637}
    assert clean.quarantined == 0 and clean.filtered_by_reason == {}

    item, domain, other = "B000BIZT3E", "food", "kitchen"  # a real food item of the dataset
    if dataset == "sample":
        ws = Workspace(tmp_path / "clean")
        first = ws.read_table("ingest", "items").to_pylist()[0]
        item, domain = first["item_id"], first["domain"]
        other = "kitchen" if domain == "food" else "food"
    bad_inter = [t.format(item=item, domain=domain, other=other) for t in BAD_INTERACTIONS.values()]
    # plus an exact duplicate of a real row (filtered, not quarantined)
    with gzip.open(src / "interactions.csv.gz", "rt") as fh:
        fh.readline()
        dup = fh.readline().strip()
    bad_items = [t.format(domain=domain) for t in BAD_ITEMS.values()]
    _inject(src / "interactions.csv.gz", tmp_path / "inter.csv.gz", [*bad_inter, dup])
    _inject(src / "items.csv.gz", tmp_path / "items.csv.gz", bad_items)

    dirty = run_ingest(
        StageRun(
            IngestSettings(
                items=tmp_path / "items.csv.gz", interactions=tmp_path / "inter.csv.gz", domains=domains
            ),
            Workspace(tmp_path / "dirty"),
        )
    )
    assert (dirty.users, dirty.items, dirty.interactions, dirty.overlap_users) == (
        clean.users,
        clean.items,
        clean.interactions,
        clean.overlap_users,
    )
    inter = dirty.accounting["interactions"]
    assert inter["read"] == clean.interactions + len(bad_inter) + 1
    assert inter["quarantined_by_reason"] == dict.fromkeys(sorted(BAD_INTERACTIONS), 1)
    assert inter["filtered_by_reason"] == {"duplicate": 1}
    items = dirty.accounting["items"]
    assert items["quarantined_by_reason"] == dict.fromkeys(sorted(BAD_ITEMS), 1)
    for acc in dirty.accounting.values():
        assert acc["read"] == acc["kept"] + acc["quarantined"] + acc["filtered"]
    quarantine = Workspace(tmp_path / "dirty").read_table("ingest", "quarantine")
    assert quarantine.num_rows == len(BAD_INTERACTIONS) + len(BAD_ITEMS)

"""The ingest faults of issue #23 (tests/cases/<folder>, copied from the reports' inputs), each asserting
its folder's expected result, plus variants of each kind the folders do not hold.

Kinds: a stray quote that swallows the rows after it (20-csv-unescaped-quotes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.ingest.settings import IngestSettings
from bridgerec.tasks.ingest.stage import run_ingest

CASES = Path(__file__).resolve().parent / "cases"


def _case(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writable copy of tests/cases/<name>, made the working directory (file names as typed)."""
    here = tmp_path / name
    shutil.copytree(CASES / name, here)
    monkeypatch.chdir(here)
    return here


def _ingest(
    items: str = "items.csv", interactions: str = "interactions.csv", ws: str = "ws", **kw: object
) -> dict:
    settings = IngestSettings(source="generic", items=Path(items), interactions=Path(interactions), **kw)
    summary = run_ingest(settings, Workspace(Path(ws))).model_dump()
    for acc in summary["accounting"].values():
        assert acc["read"] == acc["kept"] + acc["quarantined"] + acc["filtered"]
    return summary


def _quarantine(ws: str = "ws", table: str | None = None) -> list[dict]:
    rows = pq.read_table(f"{ws}/ingest/quarantine.parquet").to_pylist()
    return [r for r in rows if table is None or r["table"] == table]


def _titles(ws: str = "ws") -> dict[str, str]:
    return {r["item_id"]: r["title"] for r in pq.read_table(f"{ws}/ingest/items.parquet").to_pylist()}


# ---- 20: stray quotes in a CSV -----------------------------------------------------------------------


def test_20_csv_unescaped_quotes_swallow_no_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every one of the 16 catalogue rows is read or quarantined with its line; K05's open quote no
    longer swallows K06..K08; the interactions of the two quarantined items say so."""
    _case("20-csv-unescaped-quotes", tmp_path, monkeypatch)
    summary = _ingest()
    items = summary["accounting"]["items"]
    assert (items["read"], items["kept"], items["quarantined"]) == (16, 14, 2)
    assert items["quarantined_by_reason"] == {"too_many_fields": 1, "unterminated_quote": 1}
    rejects = {(r["record"], r["reason"], r["row"]) for r in _quarantine(table="items")}
    assert rejects == {
        (13, "too_many_fields", 'K04,kitchen,"Chef\'s "best" knife, 8 inch"'),
        (14, "unterminated_quote", 'K05,kitchen,"Wok 14'),
    }  # the line numbers a user opens the file at (the header is line 1)
    titles = _titles()
    assert titles["K03"] == 'Cast iron skillet 12" deep'  # an inch mark inside a value is a character
    assert {k: titles[k] for k in ("K06", "K07", "K08")} == {
        f"K0{i}": f"Kitchen product {i}" for i in (6, 7, 8)
    }
    assert not [t for t in titles.values() if "\n" in t or "K0" in t]
    inter = summary["accounting"]["interactions"]
    # The interactions of K04 and K05 point at their catalogue rows' reasons, not at a missing item.
    assert inter["quarantined_by_reason"] == {"item_quarantined": 34}
    assert inter["read"] == 224


def test_a_stray_quote_in_the_interactions_file_costs_its_row_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variant of 20: a quote opened in an interactions row (never closed): that row is quarantined with
    its line, the rows after it are read."""
    here = _case("20-csv-unescaped-quotes", tmp_path, monkeypatch)
    lines = (here / "interactions.csv").read_text().splitlines(keepends=True)
    lines[6] = lines[6].replace(",K", ',"K', 1)  # line 7: u001,"K04,kitchen,1600118000
    (here / "interactions.csv").write_text("".join(lines))
    (here / "items_ok.csv").write_text((CASES / "23-diverged-training" / "items.csv").read_text())
    summary = _ingest(items="items_ok.csv")
    inter = summary["accounting"]["interactions"]
    assert inter["read"] == 224 and inter["quarantined_by_reason"] == {"unterminated_quote": 1}
    (reject,) = _quarantine(table="interactions")
    assert (reject["record"], reject["reason"]) == (7, "unterminated_quote")
    assert reject["row"] == lines[6].rstrip("\n")


def test_a_quote_closed_rows_later_by_another_stray_quote_still_swallows_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variant of 20: the open quote of K05 is closed by the inch mark of K07's title two lines later
    (RFC 4180 would read K05..K07 as one row): the lines between read as rows of their own."""
    here = _case("20-csv-unescaped-quotes", tmp_path, monkeypatch)
    text = (
        (here / "items.csv").read_text().replace("K07,kitchen,Kitchen product 7", 'K07,kitchen,Pan 10" deep')
    )
    (here / "items.csv").write_text(text)
    summary = _ingest()
    assert summary["accounting"]["items"]["read"] == 16
    titles = _titles()
    assert titles["K06"] == "Kitchen product 6" and titles["K07"] == 'Pan 10" deep' and "K05" not in titles


def test_quoted_values_with_line_breaks_are_still_one_record(tmp_path: Path) -> None:
    """Variant of 20: a description over three lines (RFC 4180) stays one value of one record; a blank
    line between rows is no record; every record keeps the line it starts on."""
    (tmp_path / "items.csv").write_text(
        "item_id,domain,title,description\n"
        'a,food,Tea,"Green tea.\nSize: 10, 12, 14 g\nfood, kitchen, other"\n'
        "\n"
        "b,food,Oats,plain\n"
        'c,food,"Honey ""raw"", 1 kg",sweet\n'
    )
    (tmp_path / "inter.csv").write_text(
        "user_id,item_id,domain,timestamp\n"
        + "".join(f"u{u},{i},food,{1600000000 + k}\n" for u in (1, 2) for k, i in enumerate("abcd"))
    )
    summary = run_ingest(
        IngestSettings(items=tmp_path / "items.csv", interactions=tmp_path / "inter.csv"),
        Workspace(tmp_path / "ws"),
    ).model_dump()
    items = summary["accounting"]["items"]
    assert (items["read"], items["kept"], items["quarantined"]) == (3, 3, 0)
    out = {r["item_id"]: r for r in pq.read_table(tmp_path / "ws/ingest/items.parquet").to_pylist()}
    assert (
        out["a"]["description"] == "Green tea. Size: 10, 12, 14 g food, kitchen, other"
    )  # whitespace collapsed
    assert out["c"]["title"] == 'Honey "raw", 1 kg'
    q = pq.read_table(tmp_path / "ws/ingest/quarantine.parquet").to_pylist()
    assert [(r["record"], r["reason"]) for r in q] == [(5, "unknown_item"), (9, "unknown_item")]  # "d"

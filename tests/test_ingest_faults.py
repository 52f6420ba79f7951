"""Fault injection for ingest: one clean two-domain dataset, one fault injected at a time, and what a
user sees for each (a quarantine reason, a filter, or the one `error:` line with exit code 2), with the
counts reconciling exactly (read = kept + quarantined + filtered, for interactions and for items).

The test also renders the table in docs/ingest.md ("Fault injection") and fails when the doc differs;
`BRIDGEREC_WRITE_DOCS=1 pytest tests/test_ingest_faults.py` rewrites it.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bridgerec.runtime.errors import EXIT_INPUT, InputError
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import run_ingest
from bridgerec.tasks.ingest.settings import AmazonDomainFiles, IngestSettings, TimestampSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "ingest.md"
BEGIN, END = "<!-- fault-table:begin -->", "<!-- fault-table:end -->"

ITEMS = [
    ("F1", "food", "Green tea bags, 20 count"),
    ("F2", "food", "Dark roast coffee beans"),
    ("F3", "food", "Sea salt crackers"),
    ("F4", "food", "Organic honey jar"),
    ("F5", "food", "Rolled oats 1kg"),
    ("K1", "kitchen", "Stainless steel saucepan"),
    ("K2", "kitchen", "Silicone spatula set"),
    ("K3", "kitchen", "Chef knife 8 inch"),
    ("K4", "kitchen", "Bamboo cutting board"),
    ("K5", "kitchen", "Glass storage containers"),
]
SEQS = {
    "u01": ["F1", "K1", "F2", "K2"],
    "u02": ["F2", "F3", "F4"],
    "u03": ["K1", "K3", "F1", "K4"],
    "u04": ["F5", "K5", "F3"],
    "u05": ["K2", "K4", "K5"],
    "u06": ["F4", "F5", "K3", "F1"],
}
DOMAIN = {i: d for i, d, _ in ITEMS}
T0 = 1_600_000_000


def _interactions() -> list[tuple[str, str, str, str]]:
    return [(u, i, DOMAIN[i], str(T0 + 86_400 * k)) for u, seq in SEQS.items() for k, i in enumerate(seq)]


def _csv(rows: list[tuple], header: str) -> str:
    def cell(v: str) -> str:
        return f'"{v}"' if "," in v else v

    return header + "\n" + "".join(",".join(cell(v) for v in r) + "\n" for r in rows)


def generic(
    items_extra: str = "", inter_extra: str = "", **settings: object
) -> Callable[[Path], IngestSettings]:
    """The clean dataset as CSV, plus raw lines appended to the items or interactions file."""

    def build(d: Path) -> IngestSettings:
        (d / "items.csv").write_text(_csv(ITEMS, "item_id,domain,title") + items_extra)
        (d / "interactions.csv").write_text(
            _csv(_interactions(), "user_id,item_id,domain,timestamp") + inter_extra
        )
        return IngestSettings(items=Path("items.csv"), interactions=Path("interactions.csv"), **settings)

    return build


def jsonl_interactions(extra: str) -> Callable[[Path], IngestSettings]:
    """The clean dataset with the interactions as JSON lines, plus raw lines appended."""

    def build(d: Path) -> IngestSettings:
        (d / "items.csv").write_text(_csv(ITEMS, "item_id,domain,title"))
        lines = [
            json.dumps({"user_id": u, "item_id": i, "domain": dom, "timestamp": int(t)})
            for u, i, dom, t in _interactions()
        ]
        (d / "interactions.jsonl").write_text("\n".join(lines) + "\n" + extra)
        return IngestSettings(items=Path("items.csv"), interactions=Path("interactions.jsonl"))

    return build


def jsonl_items(text: str) -> Callable[[Path], IngestSettings]:
    def build(d: Path) -> IngestSettings:
        (d / "items.jsonl").write_text(text)
        (d / "interactions.csv").write_text(_csv(_interactions(), "user_id,item_id,domain,timestamp"))
        return IngestSettings(items=Path("items.jsonl"), interactions=Path("interactions.csv"))

    return build


def parquet_lists(d: Path) -> IngestSettings:
    items = pa.table(
        {
            "item_id": [i for i, _, _ in ITEMS],
            "domain": [dom for _, dom, _ in ITEMS],
            "title": [t for _, _, t in ITEMS],
            "categories": [["Grocery" if dom == "food" else "Home", "Sub"] for _, dom, _ in ITEMS],
            "features": [["one", "two"]] * len(ITEMS),
        }
    )
    rows = _interactions()
    inter = pa.table(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "domain": [r[2] for r in rows],
            "timestamp": pa.array([int(r[3]) * 1000 for r in rows], pa.int64()),
            "images": pa.array([[] for _ in rows], pa.list_(pa.string())),
        }
    )
    pq.write_table(items, d / "items.parquet")
    pq.write_table(inter, d / "interactions.parquet")
    return IngestSettings(items=Path("items.parquet"), interactions=Path("interactions.parquet"))


def amazon2018_literal_meta(d: Path) -> IngestSettings:
    amazon = {}
    for dom in ("food", "kitchen"):
        meta = [
            repr({"asin": i, "title": t, "categories": [["Grocery", "Sub"]]})
            for i, dd, t in ITEMS
            if dd == dom
        ]
        reviews = [
            json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": int(t), "overall": 5.0})
            for u, i, dd, t in _interactions()
            if dd == dom
        ]
        (d / f"meta_{dom}.json").write_text("\n".join(meta) + "\n")
        (d / f"{dom}.json").write_text("\n".join(reviews) + "\n")
        amazon[dom] = AmazonDomainFiles(reviews=Path(f"{dom}.json"), meta=Path(f"meta_{dom}.json"))
    return IngestSettings(source="amazon2018", amazon=amazon, kcore={"enabled": False})


def numeric_ids(zeros: bool, id_type: pa.DataType) -> Callable[[Path], IngestSettings]:
    """The clean dataset with numeric-looking item ids (food 0101.., kitchen 201.. with `zeros`, else
    101.., 201..), the interactions in Parquet with the ids in an `id_type` column (as pandas writes)."""
    number = {i: (100 if d == "food" else 200) + int(i[1:]) for i, d, _ in ITEMS}
    text = {i: (f"0{n}" if zeros and DOMAIN[i] == "food" else str(n)) for i, n in number.items()}

    def build(d: Path) -> IngestSettings:
        (d / "items.csv").write_text(_csv([(text[i], dom, t) for i, dom, t in ITEMS], "item_id,domain,title"))
        rows = _interactions()
        inter = pa.table(
            {
                "user_id": [r[0] for r in rows],
                "item_id": pa.array([number[r[1]] for r in rows], pa.int64()).cast(id_type),
                "domain": [r[2] for r in rows],
                "timestamp": pa.array([int(r[3]) for r in rows], pa.int64()),
            }
        )
        pq.write_table(inter, d / "interactions.parquet")
        return IngestSettings(items=Path("items.csv"), interactions=Path("interactions.parquet"))

    return build


def replace_file(name: str, content: bytes) -> Callable[[Path], IngestSettings]:
    """The clean dataset with one file's bytes replaced (and renamed to `name`)."""

    def build(d: Path) -> IngestSettings:
        settings = generic()(d)
        target = "interactions" if name.startswith("interactions") else "items"
        (d / name).write_bytes(content)
        return settings.model_copy(update={target: Path(name)})

    return build


CLEAN_INTERACTIONS = _csv(_interactions(), "user_id,item_id,domain,timestamp")


def _spreadsheet_dates() -> str:
    """The clean interactions with their instants written as a US spreadsheet writes them (to the minute)."""
    rows = [
        (u, i, d, datetime.fromtimestamp(int(t), UTC).strftime("%m/%d/%Y %H:%M"))
        for u, i, d, t in _interactions()
    ]
    return _csv(rows, "user_id,item_id,domain,timestamp")


@dataclass
class Fault:
    kind: str
    build: Callable[[Path], IngestSettings]
    quarantined: dict[str, int] = field(default_factory=dict)  # by reason, items and interactions
    filtered: dict[str, int] = field(default_factory=dict)  # as the summary names them
    error: str | None = None  # the start of the error line (after "error: ")
    check: Callable[[Path], str] | None = None  # an extra check on the output; returns a note


def _title(item_id: str) -> Callable[[Path], str]:
    def check(ws: Path) -> str:
        titles = {
            r["item_id"]: r["title"] for r in pq.read_table(ws / "ingest" / "items.parquet").to_pylist()
        }
        return f"title stored as `{titles[item_id]}`"

    return check


def _new_item(item_id: str) -> Callable[[Path], str]:
    def check(ws: Path) -> str:
        items = pq.read_table(ws / "ingest" / "items.parquet").to_pylist()
        stats = json.loads((ws / "ingest" / "manifest.json").read_text())["stats"]
        assert item_id in {r["item_id"] for r in items}
        n = stats["accounting"]["items"]["kept_without_interactions"]
        return f"kept as a new item (`kept_without_interactions` {n})"

    return check


def _categories(ws: Path) -> str:
    row = pq.read_table(ws / "ingest" / "items.parquet").to_pylist()[0]
    return f"categories stored as `{row['categories']}`"


def _u07_rows(stamp: Callable[[int], str]) -> str:
    """Interaction rows of user u07 buying F1, F2, F3 in that order, the k-th at `stamp(k)`."""
    return "".join(f"u07,{item},food,{stamp(k)}\n" for k, item in enumerate(["F1", "F2", "F3"]))


def _first_instant(user: str) -> Callable[[Path], str]:
    def check(ws: Path) -> str:
        rows = [
            r
            for r in pq.read_table(ws / "ingest" / "interactions.parquet").to_pylist()
            if r["user_id"] == user
        ]
        return "stored as " + ", ".join(sorted({r["timestamp"].strftime("%Y-%m-%d") for r in rows}))

    return check


def _first_time(user: str) -> Callable[[Path], str]:
    def check(ws: Path) -> str:
        rows = pq.read_table(ws / "ingest" / "interactions.parquet").to_pylist()
        first = min(r["timestamp"] for r in rows if r["user_id"] == user)
        return f"first stored as {first.isoformat().replace('+00:00', 'Z')} (on any machine)"

    return check


NEW = f"{T0 + 500_000}"
FAULTS = [
    Fault("clean input (the baseline: 10 items, 6 users, 21 interactions)", generic()),
    Fault("CSV row with a missing field", generic(inter_extra="u01,F3\n"), {"too_few_fields": 1}),
    Fault(
        "CSV row with an extra field", generic(inter_extra=f"u01,F3,food,{NEW},x\n"), {"too_many_fields": 1}
    ),
    Fault("empty user id", generic(inter_extra=f",F3,food,{NEW}\n"), {"empty_id": 1}),
    Fault(
        "domain not in the catalogue", generic(inter_extra=f"u01,F3,garden,{NEW}\n"), {"unknown_domain": 1}
    ),
    Fault("unparseable timestamp", generic(inter_extra="u01,F3,food,yesterday\n"), {"bad_timestamp": 1}),
    Fault(
        "epoch timestamps in microseconds",
        generic(inter_extra=_u07_rows(lambda k: f"{(T0 + k) * 10**6}")),
        check=_first_instant("u07"),
    ),
    Fault(
        "epoch timestamps in nanoseconds",
        generic(inter_extra=_u07_rows(lambda k: f"{(T0 + k) * 10**9}")),
        check=_first_instant("u07"),
    ),
    Fault(
        "ISO 8601 timestamps with an offset",
        generic(inter_extra=_u07_rows(lambda k: f"2020-09-1{k}T17:26:40+05:00")),
        check=_first_instant("u07"),
    ),
    Fault(
        "ISO 8601 timestamps without an offset (naive)",
        generic(inter_extra=_u07_rows(lambda k: f"2020-09-1{k} 17:26:40")),
        check=_first_time("u07"),
    ),
    Fault(
        "naive timestamps with `timestamps.naive_zone: '+05:30'`",
        generic(
            inter_extra=_u07_rows(lambda k: f"2020-09-1{k} 17:26:40"),
            timestamps=TimestampSettings(naive_zone="+05:30"),
        ),
        check=_first_time("u07"),
    ),
    Fault(
        "date far in the future (year 52671)",
        generic(inter_extra="u01,F3,food,52671-01-01\n"),
        {"bad_timestamp": 1},
    ),
    Fault("epoch number beyond every unit", generic(inter_extra="u01,F3,food,1e26\n"), {"bad_timestamp": 1}),
    Fault(
        "date before `timestamps.min` (1990)",
        generic(inter_extra="u01,F3,food,1969-12-31\n"),
        {"bad_timestamp": 1},
    ),
    Fault("item not in the catalogue", generic(inter_extra=f"u01,F9,food,{NEW}\n"), {"unknown_item": 1}),
    Fault(
        "domain contradicting the item's",
        generic(inter_extra=f"u01,F3,kitchen,{NEW}\n"),
        {"domain_mismatch": 1},
    ),
    Fault(
        "exact duplicate interaction",
        generic(inter_extra=f"u01,F1,food,{T0}\n"),
        filtered={"interactions.duplicate": 1},
    ),
    Fault(
        "user with 2 interactions (< `min_interactions`)",
        generic(inter_extra=f"u07,F1,food,{T0}\nu07,F2,food,{T0 + 1}\n"),
        filtered={"interactions.short_sequence": 2},
    ),
    Fault(
        "second, different catalogue row for an item id",
        generic(items_extra="F1,food,Green tea\n"),
        {"conflicting_item": 1},
    ),
    Fault(
        "exact duplicate catalogue row",
        generic(items_extra="F2,food,Dark roast coffee beans\n"),
        filtered={"items.duplicate": 1},
    ),
    Fault(
        "catalogue item no interaction uses (a new item)",
        generic(items_extra="F6,food,Rye bread\n"),
        check=_new_item("F6"),
    ),
    Fault(
        "new item with `items_without_interactions: drop`",
        generic(items_extra="F6,food,Rye bread\n", items_without_interactions="drop"),
        filtered={"items.no_interactions": 1},
    ),
    Fault(
        "catalogue item whose only interactions are filtered",
        generic(items_extra="F6,food,Rye bread\n", inter_extra=f"u07,F6,food,{T0}\nu07,F2,food,{T0 + 1}\n"),
        filtered={"interactions.short_sequence": 2, "items.no_kept_interactions": 1},
    ),
    Fault(
        "HTML entities and tags in a title",
        generic(
            items_extra='F6,food,"<b>M&amp;M&#39;s</b> jar, 12&quot;"\n', inter_extra=f"u01,F6,food,{NEW}\n"
        ),
        check=_title("F6"),
    ),
    Fault(
        "terminal escapes and control characters in a title (colour, window title, NUL, backspace)",
        generic(
            items_extra='F6,food,"\x1b]0;owned\x07\x1b[31mRye\x1b[0m bread\x00\x08\x08 1 kg"\n',
            inter_extra=f"u01,F6,food,{NEW}\n",
        ),
        check=_title("F6"),
    ),
    Fault("title that is only markup", generic(items_extra='F6,food,"<p><br></p>"\n'), {"empty_title": 1}),
    Fault(
        "interactions of a quarantined catalogue row",
        generic(items_extra='F6,food,"<p></p>"\n', inter_extra=f"u01,F6,food,{NEW}\n"),
        {"empty_title": 1, "item_quarantined": 1},
    ),
    Fault(
        "CSV title with a quote never closed (rows after it follow)",
        generic(items_extra='F6,food,"Rye bread\nF7,food,Oat milk\n'),
        {"unterminated_quote": 1},
        check=_new_item("F7"),
    ),
    Fault(
        "CSV interactions row with a quote never closed",
        generic(inter_extra=f'u01,"F3,food,{NEW}\nu02,F5,food,{NEW}\n'),
        {"unterminated_quote": 1},
    ),
    Fault(
        "CSV title with a line break inside quotes",
        generic(items_extra='F6,food,"Rye\nbread"\n', inter_extra=f"u01,F6,food,{NEW}\n"),
        check=_title("F6"),
    ),
    Fault("JSON lines: a line that is not JSON", jsonl_interactions("{oops\n"), {"malformed_json": 1}),
    Fault(
        "JSON lines: a Python dict literal line",
        jsonl_interactions(f"{{'user_id': 'u01', 'item_id': 'F3', 'domain': 'food', 'timestamp': {NEW}}}\n"),
    ),
    Fault(
        "JSON lines: lone surrogate escape in an unused field",
        jsonl_interactions(
            f'{{"user_id": "u01", "item_id": "F3", "domain": "food", "timestamp": {NEW}, "note": "\\ud800"}}\n'
        ),
    ),
    Fault(
        "JSON lines: lone surrogate escape in a used field",
        jsonl_interactions(
            f'{{"user_id": "u\\ud800", "item_id": "F3", "domain": "food", "timestamp": {NEW}}}\n'
        ),
        {"invalid_unicode": 1},
    ),
    Fault("Parquet with list columns (and an unused one)", parquet_lists, check=_categories),
    Fault("item ids in a Parquet float column (105.0 for '105')", numeric_ids(False, pa.float64())),
    Fault("Amazon 2018 meta as Python dict literals", amazon2018_literal_meta, check=_categories),
    Fault(
        "CSV without a header row",
        replace_file("interactions.csv", CLEAN_INTERACTIONS.split("\n", 1)[1].encode()),
        error="interactions.csv: missing required column(s) ['user_id', 'item_id', 'domain']",
    ),
    Fault(
        "catalogue in which no line is JSON",
        jsonl_items("item_id,domain,title\nF1,food,Tea\nF2,food,Coffee\n"),
        error="items.jsonl: no JSON objects found",
    ),
    Fault(
        "catalogue whose lines are mostly not JSON",
        jsonl_items(
            '{"item_id": "F1", "domain": "food", "title": "Tea"}\nF2,food,Coffee\nF3,food,Crackers\n'
        ),
        error="items.jsonl: 2 of 3 items rows quarantined (malformed_json: 2): the file is not JSON lines",
    ),
    Fault(
        "interactions of another catalogue (most items unknown)",
        replace_file("interactions.csv", CLEAN_INTERACTIONS.replace(",F", ",G").encode()),
        error="interactions.csv: 11 of 21 interactions rows quarantined (unknown_item: 11)",
    ),
    Fault(
        "item ids that lost their leading zeros (a Parquet int64 column; catalogue '0101')",
        numeric_ids(True, pa.int64()),
        error="interactions.parquet: 11 of 21 interactions rows name 5 item ids that are catalogue ids without "
        "their leading zeros or with a '.0' ('101' for the catalogue's '0101'",
    ),
    Fault(
        "epoch seconds read with `timestamps.unit: ms`",
        lambda d: generic()(d).model_copy(update={"timestamps": TimestampSettings(unit="ms")}),
        error="interactions.csv: 21 of 21 interactions rows quarantined (bad_timestamp: 21)",
    ),
    Fault(
        "spreadsheet dates ('05/11/2024 16:08': month first) in the whole file",
        replace_file("interactions.csv", _spreadsheet_dates().encode()),
        error="interactions.csv: 21 of 21 interactions rows quarantined (bad_timestamp: 21): timestamps not "
        "understood, e.g. '09/13/2020 12:26': read are epoch numbers (ingest.timestamps.unit) and ISO 8601 "
        "text; give another text form as ingest.timestamps.format (e.g. '%m/%d/%Y %H:%M')",
    ),
    Fault(
        "the same with `timestamps.format: '%m/%d/%Y %H:%M'`",
        lambda d: replace_file("interactions.csv", _spreadsheet_dates().encode())(d).model_copy(
            update={"timestamps": TimestampSettings(format="%m/%d/%Y %H:%M")}
        ),
        check=_first_time("u01"),
    ),
    Fault(
        "a domain left without items (`ingest.domains` names one the data lacks)",
        lambda d: generic()(d).model_copy(update={"domains": ["food", "garden", "kitchen"]}),
        error="domain 'garden' has no items or users left (no row names it",
    ),
    Fault(
        "corrupt gzip",
        replace_file("interactions.csv.gz", b"not gzip at all"),
        error="interactions.csv.gz: not a valid gzip file",
    ),
    Fault(
        "not UTF-8 (Latin-1 text)",
        replace_file(
            "items.csv", _csv(ITEMS, "item_id,domain,title").replace("Rolled", "Röhr").encode("latin-1")
        ),
        error="items.csv: cannot parse as CSV (not UTF-8: wrong encoding?)",
    ),
    Fault(
        "a header not in UTF-8",
        replace_file("items.csv", "item_id,domain,t\u00eftle\nF1,food,Tea\n".encode("latin-1")),
        error="items.csv: cannot read the CSV header (not UTF-8: wrong encoding?)",
    ),
    Fault(
        "not a text file (an image saved under the CSV's name)",
        replace_file("interactions.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4),
        error="interactions.csv: not a text file (60% of its first 1,040 bytes are control bytes or not UTF-8: "
        "binary data?)",
    ),
    Fault(
        "UTF-16 text (a spreadsheet's 'Unicode text' export)",
        replace_file("items.jsonl", '{"item_id": "F1", "domain": "food", "title": "Tea"}\n'.encode("utf-16")),
        error="items.jsonl: not a text file (51% of its first 106 bytes are control bytes or not UTF-8: "
        "UTF-16 text? save it as UTF-8)",
    ),
    Fault(
        "a file that claims to be Parquet but is not",
        replace_file("interactions.parquet", b"PAR1 nope"),
        error="interactions.parquet: not a readable Parquet file",
    ),
    Fault(
        "unknown file extension",
        replace_file("interactions.xlsx", b"PK"),
        error="interactions.xlsx: unknown format",
    ),
]


def _counts(acc: dict) -> str:
    return f"{acc['read']} = {acc['kept']} + {acc['quarantined']} + {acc['filtered']}"


def _run(fault: Fault, d: Path) -> tuple[str, int, str, str]:
    """Inject the fault in `d`, ingest, check the expectation; the table row's cells."""
    d.mkdir()
    cwd = os.getcwd()
    os.chdir(d)  # file names in messages as a user types them
    try:
        settings = fault.build(d)
        try:
            summary = run_ingest(StageRun(settings, Workspace(Path("ws")))).model_dump()
        except InputError as exc:
            assert fault.error is not None, f"{fault.kind}: unexpected error {exc}"
            assert str(exc).startswith(fault.error), f"{fault.kind}: {exc}"
            assert not (d / "ws" / "ingest").exists()  # nothing written
            shown = str(exc).split("; nothing written")[0]
            return f"`error: {shown}`", EXIT_INPUT, "nothing written", "nothing written"
        assert fault.error is None, f"{fault.kind}: expected an error, got {summary}"
        assert summary["quarantined_by_reason"] == fault.quarantined, fault.kind
        assert summary["filtered_by_reason"] == fault.filtered, fault.kind
        for acc in summary["accounting"].values():
            assert acc["read"] == acc["kept"] + acc["quarantined"] + acc["filtered"], fault.kind
        seen = [f"quarantined `{r}` x{n}" for r, n in fault.quarantined.items()]
        seen += [f"filtered `{r}` x{n}" for r, n in fault.filtered.items()]
        if fault.check is not None:
            seen.append(fault.check(d / "ws"))
        acc = summary["accounting"]
        return "; ".join(seen) or "read as is", 0, _counts(acc["interactions"]), _counts(acc["items"])
    finally:
        os.chdir(cwd)


def render(rows: list[tuple[str, str, int, str, str]]) -> str:
    lines = [
        "| input | what the user sees | exit | interactions: read = kept + quarantined + filtered | items: read = kept + quarantined + filtered |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {seen.replace('|', '&#124;')} | {code} | {i} | {t} |" for k, seen, code, i, t in rows]
    return "\n".join(lines)


def test_fault_injection_table(tmp_path: Path) -> None:
    rows = []
    for n, fault in enumerate(FAULTS):
        seen, code, inter, items = _run(fault, tmp_path / f"f{n:02d}")
        rows.append((fault.kind, seen, code, inter, items))
    table = render(rows)
    doc = DOC.read_text()
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    if os.environ.get("BRIDGEREC_WRITE_DOCS") == "1":
        DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    else:
        assert f"{BEGIN}\n{table}\n{END}" in doc, (
            "docs/ingest.md's fault table is out of date: BRIDGEREC_WRITE_DOCS=1 pytest tests/test_ingest_faults.py"
        )


def test_errors_exit_2_through_the_cli(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table's exit code: an InputError from the stage is one `error:` line and exit code 2."""
    from typer.testing import CliRunner

    from bridgerec.cli import app

    monkeypatch.chdir(tmp_path)
    generic()(tmp_path)
    with gzip.open(tmp_path / "interactions.csv.gz", "wt") as fh:
        fh.write(CLEAN_INTERACTIONS.replace(",F", ",G"))
    result = CliRunner().invoke(
        app, ["ingest", "--items", "items.csv", "--interactions", "interactions.csv.gz", "-w", "ws", "--json"]
    )
    assert result.exit_code == EXIT_INPUT
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: interactions.csv.gz: 11 of 21 interactions rows quarantined (unknown_item: 11)")
    )


def test_a_missing_input_file_is_one_error_line_through_the_cli(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path that does not exist fails the flow's first task with an InputError, the type whose
    tracebacks runtime/logs.py keeps out of the console (that filter is tested on its own): the CLI
    prints one `error:` line naming the file and exits 2, and nothing is written."""
    from typer.testing import CliRunner

    from bridgerec.cli import app
    from bridgerec.tasks.ingest import IngestSettings, SourceError, check_input_files

    monkeypatch.chdir(tmp_path)
    generic()(tmp_path)
    settings = IngestSettings(source="generic", items="items.csv", interactions="missing.csv.gz")
    said = f"missing.csv.gz: file not found (ingest interactions; relative paths are read from the working directory, {tmp_path})"
    with pytest.raises(SourceError) as missing:
        check_input_files(settings)
    assert str(missing.value) == said
    absolute = settings.model_copy(update={"interactions": tmp_path / "missing.csv.gz"})
    with pytest.raises(SourceError) as missing:
        check_input_files(absolute)
    assert str(missing.value) == f"{tmp_path / 'missing.csv.gz'}: file not found (ingest interactions)"
    result = CliRunner().invoke(
        app, ["ingest", "--items", "items.csv", "--interactions", "missing.csv.gz", "-w", "ws", "--json"]
    )
    assert result.exit_code == EXIT_INPUT
    assert result.stderr.strip().splitlines()[-1] == f"error: {said}"
    assert not (tmp_path / "ws" / "ingest").exists()

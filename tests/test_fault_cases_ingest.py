"""The ingest faults of issue #23 (tests/cases/<folder>, copied from the reports' inputs), each asserting
its folder's expected result, plus variants of each kind the folders do not hold.

Kinds: a stray quote that swallows the rows after it (20-csv-unescaped-quotes); naive timestamps read
in the machine's time zone (21-naive-timestamps-machine-tz); ids that lost their leading zeros on the
way (28-leading-zero-ids).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from case_files import CASES, copy_case

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import IngestError, IngestSettings, run_ingest


def _ingest(
    items: str = "items.csv", interactions: str = "interactions.csv", ws: str = "ws", **kw: object
) -> dict:
    settings = IngestSettings(source="generic", items=Path(items), interactions=Path(interactions), **kw)
    summary = run_ingest(StageRun(settings, Workspace(Path(ws)))).model_dump()
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
    copy_case("20-csv-unescaped-quotes", tmp_path, monkeypatch)
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
    here = copy_case("20-csv-unescaped-quotes", tmp_path, monkeypatch)
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
    here = copy_case("20-csv-unescaped-quotes", tmp_path, monkeypatch)
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
    settings = IngestSettings(items=tmp_path / "items.csv", interactions=tmp_path / "inter.csv")
    summary = run_ingest(StageRun(settings, Workspace(tmp_path / "ws"))).model_dump()
    items = summary["accounting"]["items"]
    assert (items["read"], items["kept"], items["quarantined"]) == (3, 3, 0)
    out = {r["item_id"]: r for r in pq.read_table(tmp_path / "ws/ingest/items.parquet").to_pylist()}
    assert out["a"]["description"] == "Green tea. Size: 10, 12, 14 g food, kitchen, other"  # spaces collapsed
    assert out["c"]["title"] == 'Honey "raw", 1 kg'
    q = pq.read_table(tmp_path / "ws/ingest/quarantine.parquet").to_pylist()
    assert [(r["record"], r["reason"]) for r in q] == [(5, "unknown_item"), (9, "unknown_item")]  # "d"


# ---- 21: naive timestamps and the machine's time zone -------------------------------------------------

_INGEST_IN_A_PROCESS = """
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
from bridgerec.config import load_settings
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import run_ingest
out = {}
for name, job in json.loads(sys.argv[1]).items():
    settings = load_settings(None, job).ingest
    ws = Path("ws_" + name)
    run_ingest(StageRun(settings, Workspace(ws)))
    rows = pq.read_table(ws / "ingest" / "interactions.parquet").to_pylist()
    out[name] = {
        "instants": sorted([r["user_id"], r["item_id"], r["timestamp"].timestamp()] for r in rows),
        "u001": [r["item_id"] for r in rows if r["user_id"] == "u001"],
        "config_hash": json.loads((ws / "ingest" / "manifest.json").read_text())["config_hash"],
    }
print(json.dumps(out))
"""


def _ingest_under(tz: str, jobs: dict[str, dict]) -> dict[str, dict]:
    """Ingest each job (settings overrides) in one fresh Python process whose machine time zone is `tz`
    (TZ is read at start-up), in the working directory; their interactions' instants, u001's sequence
    and the config hash, by job name."""
    result = subprocess.run(
        [sys.executable, "-c", _INGEST_IN_A_PROCESS, json.dumps(jobs)],
        env={**os.environ, "TZ": tz},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _files(interactions: str = "interactions.csv", **more: str) -> dict:
    return {"ingest.items": "items.csv", "ingest.interactions": interactions} | more


@pytest.fixture(scope="module")
def tz_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Case 21's files ingested on a UTC machine and on a Los Angeles one (default naive zone, then
    `ingest.timestamps.naive_zone` as an offset and as an IANA name), a naive Parquet variant, and the
    case's epoch-second baseline."""
    here = tmp_path_factory.mktemp("tz") / "21-naive-timestamps-machine-tz"
    shutil.copytree(CASES / "21-naive-timestamps-machine-tz", here)
    ts = pa.array([1_600_000_000_000_000 + i * 3_600_000_000 for i in range(6)], pa.timestamp("us"))
    users, items = ["u1"] * 3 + ["u2"] * 3, ["F01", "F02", "F03", "F02", "F03", "F04"]
    pq.write_table(
        pa.table({"user_id": users, "item_id": items, "domain": ["food"] * 6, "timestamp": ts}),
        here / "naive.parquet",  # pandas' default: TIMESTAMP without a zone
    )
    cwd = os.getcwd()
    os.chdir(here)
    try:
        runs = {f"utc_{k}": v for k, v in _ingest_under("UTC", {"case": _files()}).items()}
        zone = "ingest.timestamps.naive_zone"
        la_jobs = {
            "case": _files(),
            "baseline": _files("baseline-interactions.csv"),
            "india": _files(**{zone: "+05:30"}),
            "new_york": _files(**{zone: "America/New_York"}),
            "parquet": _files("naive.parquet"),
        }
        runs |= {f"la_{k}": v for k, v in _ingest_under("America/Los_Angeles", la_jobs).items()}
    finally:
        os.chdir(cwd)
    runs["rows"] = [line.split(",") for line in (here / "interactions.csv").read_text().splitlines()[1:]]
    return runs


def test_21_naive_timestamps_mean_the_same_instants_on_every_machine(tz_runs: dict) -> None:
    """The same files under TZ=UTC and TZ=America/Los_Angeles: the same instants (those of the
    epoch-second baseline, naive = UTC), the same order and targets, the same config hash."""
    utc, la, baseline = tz_runs["utc_case"], tz_runs["la_case"], tz_runs["la_baseline"]
    assert la["instants"] == utc["instants"] == baseline["instants"]
    assert la["u001"] == utc["u001"] == baseline["u001"]
    assert la["u001"][-2:] == ["F04", "K04"]  # u001's validation and test targets, as in the README
    assert la["config_hash"] == utc["config_hash"]


def test_a_configured_naive_zone_is_applied_and_hashed(tz_runs: dict) -> None:
    """Variant of 21: `ingest.timestamps.naive_zone` as a fixed offset (+05:30) and as an IANA name, on
    a Los Angeles machine: naive values are read in the configured zone, values with `Z` keep theirs;
    each zone has its own config hash."""
    rows = tz_runs["rows"]
    assert sum(ts.endswith("Z") for *_, ts in rows) == 27  # the app log's values; the rest are naive
    zones = {
        "la_india": timezone(timedelta(hours=5, minutes=30)),
        "la_new_york": ZoneInfo("America/New_York"),
    }
    for run, zone in zones.items():
        expected = sorted(
            [
                u,
                i,
                datetime.fromisoformat(ts.replace("Z", "+00:00"))
                .replace(**({} if ts.endswith("Z") else {"tzinfo": zone}))
                .timestamp(),
            ]
            for u, i, _, ts in rows
        )
        assert tz_runs[run]["instants"] == expected
    hashes = {tz_runs[r]["config_hash"] for r in ("utc_case", "la_india", "la_new_york")}
    assert len(hashes) == 3


def test_naive_parquet_timestamps_are_read_in_the_naive_zone(tz_runs: dict) -> None:
    """Variant of 21: a Parquet TIMESTAMP column without a zone, read on a Los Angeles machine: UTC
    instants, as written."""
    got = sorted(t for *_, t in tz_runs["la_parquet"]["instants"])
    assert got == [1_600_000_000.0 + 3600 * i for i in range(6)]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("z", "UTC"),
        ("+00:00", "UTC"),
        ("UTC+0530", "+05:30"),
        ("-8", "-08:00"),
        ("Europe/Berlin", "Europe/Berlin"),
    ],
)
def test_naive_zone_spellings(given: str, stored: str) -> None:
    from bridgerec.config import load_settings

    assert load_settings(None, {"ingest.timestamps.naive_zone": given}).ingest.timestamps.naive_zone == stored


def test_an_unknown_naive_zone_is_a_config_error_naming_the_key() -> None:
    from bridgerec.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"naive_zone.*'Mars/Olympus' is not a time zone"):
        load_settings(None, {"ingest.timestamps.naive_zone": "Mars/Olympus"})


# ---- 28: ids that lost their leading zeros -------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "interactions", "rows", "example"),
    [
        ("items.csv", "interactions_int_ids.parquet", "119 of 224", "'101' for the catalogue's '0101'"),
        ("items.csv", "interactions_float_ids.csv", "224 of 224", "'101.0' for the catalogue's '0101'"),
        (
            "items_mixed.csv",
            "interactions_mixed_int_ids.parquet",
            "46 of 224",
            "'1' for the catalogue's '000001'",
        ),
    ],
)
def test_28_leading_zero_ids_stop_the_run_naming_the_mismatch(
    items: str, interactions: str, rows: str, example: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All three variants, the mixed one (3 of 16 ids lost their zeros, 20 % of the rows) included: exit
    2's error names the file, the rows, examples of the pairs and what to do; nothing is written."""
    here = copy_case("28-leading-zero-ids", tmp_path, monkeypatch)
    with pytest.raises(IngestError) as info:
        _ingest(items=items, interactions=interactions)
    message = str(info.value)
    assert message.startswith(f"{interactions}: {rows} interactions rows name ")
    assert "catalogue ids without their leading zeros or with a '.0'" in message and example in message
    assert "write item ids as text" in message and message.endswith("nothing written")
    if interactions.endswith(".parquet"):
        assert f"{interactions} stores item_id as BIGINT" in message
    assert not (here / "ws" / "ingest").exists()


def test_28_leading_zero_ids_through_the_cli(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mixed variant, which passed with a warning before: one error: line and exit code 2."""
    from typer.testing import CliRunner

    from bridgerec.cli import app

    copy_case("28-leading-zero-ids", tmp_path, monkeypatch)
    args = ["--items", "items_mixed.csv", "--interactions", "interactions_mixed_int_ids.parquet"]
    result = CliRunner().invoke(app, ["ingest", "--source", "generic", *args, "-w", "ws3", "--json"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "error: interactions_mixed_int_ids.parquet: 46 of 224 interactions rows name 3 item ids"
    )
    assert "Traceback" not in result.stderr
    answer = json.loads(result.stdout)  # --json: the failure as one object
    assert (answer["ok"], answer["exit_code"]) == (False, 2)
    assert answer["error"] == line.removeprefix("error: ")


def test_float_id_columns_are_read_as_the_integers_they_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variant of 28: a float64 item_id column (pandas turns an int column with a gap into floats)
    beside a catalogue of plain integer ids: 105.0 is item '105', nothing is lost; JSON lines numbers
    likewise; and a catalogue whose ids lost their zeros (an int column) beside text ids with zeros
    stops like the other direction."""
    monkeypatch.chdir(tmp_path)
    items = [
        (str(i), "food" if i < 200 else "kitchen", f"Product {i}") for i in (101, 102, 103, 201, 202, 203)
    ]
    (tmp_path / "items.csv").write_text("item_id,domain,title\n" + "".join(",".join(r) + "\n" for r in items))
    seqs = {"u1": [101, 201, 102, 202], "u2": [103, 203, 101], "u3": [202, 102, 103]}
    flat = [(u, i, k) for u, seq in seqs.items() for k, i in enumerate(seq)]
    pq.write_table(
        pa.table(
            {
                "user_id": [u for u, _, _ in flat],
                "item_id": pa.array([float(i) for _, i, _ in flat], pa.float64()),
                "domain": ["food" if i < 200 else "kitchen" for _, i, _ in flat],
                "timestamp": [1_600_000_000 + 3600 * k for *_, k in flat],
            }
        ),
        tmp_path / "inter.parquet",
    )
    summary = _ingest(interactions="inter.parquet")
    assert (summary["interactions"], summary["quarantined"]) == (len(flat), 0)
    assert {r["item_id"] for r in pq.read_table("ws/ingest/interactions.parquet").to_pylist()} == {
        str(i) for _, i, _ in flat
    }
    (tmp_path / "inter.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "user_id": u,
                    "item_id": float(i),
                    "domain": "food" if i < 200 else "kitchen",
                    "timestamp": 1_600_000_000 + 3600 * k,
                }
            )
            + "\n"
            for u, i, k in flat
        )
    )
    assert _ingest(interactions="inter.jsonl", ws="ws2")["quarantined"] == 0
    # The other direction: the catalogue lost the zeros (an int column), the interactions kept them.
    pq.write_table(
        pa.table(
            {
                "item_id": [i for i, _, _ in items],
                "domain": [d for _, d, _ in items],
                "title": [t for *_, t in items],
            }
        ).set_column(0, "item_id", pa.array([int(i) for i, _, _ in items], pa.int64())),
        tmp_path / "items.parquet",
    )
    zeros = "user_id,item_id,domain,timestamp\n" + "".join(
        f"{u},0{i},{'food' if i < 200 else 'kitchen'},{1_600_000_000 + 3600 * k}\n" for u, i, k in flat
    )
    (tmp_path / "zeros.csv").write_text(zeros)
    with pytest.raises(
        IngestError,
        match=r"^zeros.csv: 10 of 10 interactions rows name 6 item ids .*'0101' for the catalogue's '101'",
    ):
        _ingest(items="items.parquet", interactions="zeros.csv", ws="ws3")

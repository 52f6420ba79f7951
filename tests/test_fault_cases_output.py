"""The faults of issue #23 that reach people reading the output (tests/cases/<folder>, copied from the
reports' inputs), each asserting its folder's expected result, plus variants the folders do not hold.

Kinds: control characters in catalogue text reaching the warehouse and the terminal
(25-control-chars-in-titles).
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from case_files import copy_case
from typer.testing import CliRunner

from bridgerec.cli import app
from bridgerec.config import load_settings
from bridgerec.runtime.terminal import printable, shown
from bridgerec.storage import warehouse as wh
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import run_ingest
from bridgerec.tasks.ingest.text import clean_text
from bridgerec.tasks.publish import run_publish
from bridgerec.tasks.train import run_train

# What a terminal obeys: C0 controls but tab and newline, DEL, C1 controls, bidirectional overrides and isolates.
TERMINAL_COMMANDS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _ingest_train_publish() -> Path:
    settings = load_settings("config.yaml")
    ws = Workspace(settings.workspace)
    run_ingest(StageRun(settings.ingest, ws))
    run_train(StageRun(settings.train.model_copy(update={"threads": 1}), ws, threads=1))
    run_publish(StageRun(settings.publish, ws, warehouse=settings.warehouse, threads=1))
    return settings.warehouse_path.resolve()


# ---- 25: control characters in titles -----------------------------------------------------------------

CLEAN = {
    "K01": "Electric kettle 1.7 L",  # NUL
    "K02": "RED enamel kettle",  # CSI colour sequences, removed whole
    "K03": "Ceramic mug",  # OSC "set the window title" ... BEL, removed whole
    "K04": "Frying pan REPLACED TEXT",  # CR
    "K05": "Spatula Ladle!!",  # 7 backspaces
}


def test_25_control_chars_in_titles_are_removed_at_ingest_and_escaped_on_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_case("25-control-chars-in-titles", tmp_path, monkeypatch)
    warehouse = _ingest_train_publish()
    items = {r["item_id"]: r["title"] for r in pq.read_table("ws/ingest/items.parquet").to_pylist()}
    assert {k: items[k] for k in CLEAN} == CLEAN
    with duckdb.connect(str(warehouse), read_only=True) as con:
        stored = dict(con.execute("SELECT item_id, title FROM items").fetchall())
        shown_titles = [r[0] for r in con.execute("SELECT title FROM latest_recommendations").fetchall()]
    assert {k: stored[k] for k in CLEAN} == CLEAN
    assert not [t for t in [*stored.values(), *shown_titles] if TERMINAL_COMMANDS.search(t)]
    result = CliRunner().invoke(
        app, ["recs", "--warehouse", str(warehouse), "--user", "u002", "--domain", "kitchen"]
    )
    assert result.exit_code == 0, result.output
    assert not TERMINAL_COMMANDS.search(result.stdout)
    for title in ("RED enamel kettle", "Ceramic mug", "Spatula Ladle!!", "Electric kettle 1.7 L"):
        assert title in result.stdout  # u002's kitchen top 5 (the case's recs-u002.txt): K02 K08 K03 K05 K01
    # The table's rows are aligned again: every line of it is as wide as its border.
    lines = [line for line in result.stdout.splitlines() if line.startswith(("┃", "│", "┏", "└"))]
    assert len({len(line) for line in lines}) == 1


def test_a_warehouse_published_before_the_cleaning_prints_escapes_not_commands(
    tmp_path: Path,
) -> None:
    """Variant of 25: titles, ids and a profile holding control characters in a warehouse (published
    before ingest cleaned them, or written by another tool): `recs` and `runs list` show `\\x1b`, never
    the command, and the JSON output keeps the stored text (JSON escapes it)."""
    from tests.test_publish_warehouse import make_batch

    path = tmp_path / "warehouse.duckdb"
    batch = make_batch("r\x1b[2J1")
    titles = batch.items.column("title").to_pylist()
    titles[1] = "\x1b]0;owned\x07Mug \x1b[31mred\x1b[0m\x00\u202eexe.txt"
    batch.items = batch.items.set_column(2, "title", pa.array(titles, pa.string()))
    wh.publish(path, batch, retention_runs=3)
    args = ["recs", "--warehouse", str(path), "--user", "u0", "--domain", "a"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})  # a wide terminal: no wrapped cells
    assert result.exit_code == 0, result.output
    assert not TERMINAL_COMMANDS.search(result.stdout)
    assert "│ \\x1b]0;owned\\x07Mug \\x1b[31mred\\x1b[0m\\x00\\u202eexe.txt " in result.stdout
    runs = CliRunner().invoke(app, ["runs", "list", "--warehouse", str(path)], env={"COLUMNS": "200"})
    assert runs.exit_code == 0 and "r\\x1b[2J1" in runs.stdout and not TERMINAL_COMMANDS.search(runs.stdout)
    as_json = CliRunner().invoke(app, ["recs", "--warehouse", str(path), "--user", "u0", "--json"])
    assert "\\u001b]0;owned" in as_json.stdout  # the data as stored, escaped by JSON


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a\x9b31mb", "ab"),  # 8-bit CSI
        ("x\x1b]8;;http://e.example\x1b\\link\x1b]8;;\x1b\\ y", "xlink y"),  # OSC 8 hyperlink, ST-terminated
        ("\x1bPq#0;2;0;0;0\x1b\\Sixel", "Sixel"),  # DCS string, removed whole
        ("\x1b(Bcharset", "charset"),  # a two-character ESC sequence with an intermediate byte
        ("tab\there\x0bvt\x0cff", "tab here vt ff"),
        ("bidi \u202egnp.exe\u2066x\u2069", "bidi gnp.exe x"),
        ("caf\u00e9 \u2764\ufe0f \u4e2d\u6587", "caf\u00e9 \u2764\ufe0f \u4e2d\u6587"),  # text is kept
        ("<b>\x1b[1mbold</b> &amp;\x7f", "bold &"),
        ("\x00\x1b[0m\x07", ""),  # only controls: an empty title (quarantined empty_title)
    ],
)
def test_text_cleaning_removes_every_kind_of_control(raw: str, clean: str) -> None:
    """Variants of 25, one per kind of control: 7- and 8-bit introducers, string commands, DEL, vertical
    whitespace, bidirectional overrides, next to text that must stay."""
    assert clean_text(raw) == clean


def test_printable_escapes_what_a_terminal_would_obey() -> None:
    assert printable("a\x1b[31mb\x00c\u202e") == "a\\x1b[31mb\\x00c\\u202e"
    assert shown("[red]x[/red]\x07") == "\\[red]x\\[/red]\\x07"  # rich markup escaped too
    assert shown(None, "(none)") == "(none)" and printable("plain é ✓") == "plain é ✓"

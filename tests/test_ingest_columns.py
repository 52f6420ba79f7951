"""`ingest.columns`: a company's export with its own column names is read as it is (CSV, JSON lines and
Parquet), gives what the same data under the source's names gives, and a wrong mapping is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.ingest import IngestSettings, SourceError, run_ingest
from tests.conftest import SAMPLE

ITEMS = {"item_id": "product_id", "domain": "department", "title": "Product Name"}
INTERACTIONS = {"user_id": "customer_id", "item_id": "sku", "domain": "department", "position": "seq"}
OUTPUTS = ("items", "interactions")


def write(table: pa.Table, path: Path) -> Path:
    """`table` as a file of the format `path` names."""
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    else:
        pacsv.write_csv(table, path)
    return path


def renamed(table: pa.Table, mapping: dict[str, str]) -> pa.Table:
    return table.rename_columns([mapping.get(c, c) for c in table.column_names])


@pytest.fixture(scope="module")
def sample() -> tuple[pa.Table, pa.Table]:
    """The bundled sample's items and interactions, every value as text."""

    def read(name: str) -> pa.Table:
        opts = pacsv.ConvertOptions(strings_can_be_null=False)
        table = pacsv.read_csv(SAMPLE / f"{name}.csv.gz", convert_options=opts)
        return table.cast(pa.schema([pa.field(c, pa.string()) for c in table.column_names]))

    return read("items"), read("interactions")


def ingest(tmp: Path, items: Path, interactions: Path, **settings: object) -> Workspace:
    ws = Workspace(tmp / "ws")
    run_ingest(StageRun(IngestSettings(items=items, interactions=interactions, **settings), ws))
    return ws


@pytest.fixture(scope="module")
def standard(sample: tuple[pa.Table, pa.Table], tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """The sample ingested under the source's own names: what a mapped export must give."""
    tmp = tmp_path_factory.mktemp("standard")
    items, inter = sample
    return ingest(tmp, write(items, tmp / "items.csv"), write(inter, tmp / "interactions.csv"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_an_export_under_its_own_names_ingests_as_the_standard_one(
    fmt: str, sample: tuple[pa.Table, pa.Table], standard: Workspace, tmp_path: Path
) -> None:
    items, inter = sample
    ws = ingest(
        tmp_path,
        write(renamed(items, ITEMS), tmp_path / f"items.{fmt}"),
        write(renamed(inter, INTERACTIONS), tmp_path / f"interactions.{fmt}"),
        columns={"items": ITEMS, "interactions": INTERACTIONS},
    )
    for name in OUTPUTS:
        assert ws.read_table("ingest", name).equals(standard.read_table("ingest", name)), name


def test_a_mapped_column_replaces_a_file_column_of_the_same_name(
    sample: tuple[pa.Table, pa.Table], standard: Workspace, tmp_path: Path
) -> None:
    """An export with its own `user_id` (say, an internal number) and the id to use under another name:
    the mapped one is read, the other set aside (not an extra attribute, not an error)."""
    items, inter = sample
    export = renamed(inter, {"user_id": "customer_id"})
    export = export.append_column("user_id", pa.array(["internal-7"] * export.num_rows))
    ws = ingest(
        tmp_path,
        write(items, tmp_path / "items.csv"),
        write(export, tmp_path / "interactions.csv"),
        columns={"interactions": {"user_id": "customer_id"}},
    )
    for name in OUTPUTS:
        assert ws.read_table("ingest", name).equals(standard.read_table("ingest", name)), name


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_mapping_to_a_column_the_file_lacks_is_one_line(
    fmt: str, sample: tuple[pa.Table, pa.Table], tmp_path: Path
) -> None:
    items, inter = sample
    with pytest.raises(SourceError) as err:
        ingest(
            tmp_path,
            write(items, tmp_path / f"items.{fmt}"),
            write(renamed(inter, {"user_id": "customer_id"}), tmp_path / f"interactions.{fmt}"),
            columns={"interactions": {"user_id": "client_id"}},
        )
    message = str(err.value)
    assert "\n" not in message
    assert "ingest.columns.interactions maps user_id -> 'client_id', which the file does not have" in message
    assert "customer_id" in message  # what the file has


def test_a_misspelt_optional_column_is_an_error_not_an_empty_column(
    sample: tuple[pa.Table, pa.Table], tmp_path: Path
) -> None:
    items, inter = sample
    with pytest.raises(SourceError, match=r"ingest.columns.items maps brand -> 'Brnad', which the file does"):
        ingest(
            tmp_path,
            write(items, tmp_path / "items.parquet"),
            write(inter, tmp_path / "interactions.csv"),
            columns={"items": {"brand": "Brnad"}},
        )


def test_an_unmapped_export_is_told_where_to_name_its_columns(
    sample: tuple[pa.Table, pa.Table], tmp_path: Path
) -> None:
    items, inter = sample
    with pytest.raises(SourceError, match=r"name the file's own columns in ingest.columns.interactions"):
        ingest(
            tmp_path,
            write(items, tmp_path / "items.csv"),
            write(renamed(inter, INTERACTIONS), tmp_path / "interactions.csv"),
        )


def test_the_mapping_is_checked_when_the_config_loads() -> None:
    with pytest.raises(ValidationError, match=r"unknown column\(s\) \['customer'\]"):
        IngestSettings(columns={"interactions": {"customer": "customer_id"}})
    with pytest.raises(ValidationError, match="two columns map to the same file column"):
        IngestSettings(columns={"interactions": {"user_id": "id", "item_id": "id"}})
    with pytest.raises(ValidationError, match="has its own"):
        IngestSettings(source="amazon2023", columns={"items": {"title": "name"}})


def test_no_mapping_keeps_the_config_hash_of_earlier_workspaces() -> None:
    """Workspaces ingested before the setting existed are not ingested again; a mapping is hashed."""
    assert "columns" not in IngestSettings().hashed_values()
    assert "columns" in IngestSettings(columns={"items": {"title": "name"}}).hashed_values()

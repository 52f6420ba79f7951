"""The reader of WORKSPACE/ingest/: what later stages (enrich, train, publish) read of the ingest stage.

Tables (schemas in storage/schemas.py): `domains`, `items`, `users`, `interactions`, `sequences`,
`quarantine`. Only this module and the ingest stage know the folder's layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bridgerec.storage.workspace import Manifest, Workspace

STAGE = "ingest"


class IngestMissing(FileNotFoundError):
    """The workspace holds no finished ingest output; the message says what to run."""


class IngestOutputs:
    """Read-only view of a finished ingest stage in `workspace`."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    @property
    def folder(self) -> Path:
        return self.workspace.stage_dir(STAGE)

    def manifest(self) -> Manifest:
        """The stage's manifest (counts and accounting in `stats`). Raises IngestMissing."""
        manifest = self.workspace.read_manifest(STAGE)
        if manifest is None:
            raise IngestMissing(f"no finished ingest in {self.folder}: run `bridgerec ingest` first")
        return manifest

    def exists(self) -> bool:
        return self.workspace.read_manifest(STAGE) is not None

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """One of the stage's tables (e.g. "items", "sequences"), optionally only some columns."""
        return self.workspace.read_table(STAGE, name, columns=columns)

    def items_without_interactions(self) -> list[str]:
        """Item ids of the catalogue that no kept interaction names (new items), in items-table order."""
        items = self.table("items", columns=["item_id"])["item_id"]
        used = self.table("interactions", columns=["item_id"])["item_id"]
        return pc.filter(items, pc.invert(pc.is_in(items, value_set=pc.unique(used)))).to_pylist()

    def file(self, name: str) -> Path:
        """The Parquet file behind table `name`, for content hashes of later stages' inputs."""
        return self.folder / f"{name}.parquet"

    def key(self) -> dict[str, Any] | None:
        """What identifies this output (config hash, input hashes, row counts); None when absent."""
        m = self.workspace.read_manifest(STAGE)
        return (
            None if m is None else {"config": m.config_hash, "inputs": m.input_hashes, "rows": m.row_counts}
        )

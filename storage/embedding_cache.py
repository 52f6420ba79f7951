"""A folder of item-text vectors shared across workspaces: (text_hash, model_id, vector) rows, so a
second workspace over the same catalogue (an experiment, a backfill, a rebuilt workspace, a test
session) embeds nothing its model already embedded.

Layout: `<root>/<model_id with unsafe characters replaced>/<uuid>.parquet`. Each writer adds files of
its own through a temporary name and a rename, never rewriting one, so concurrent runs (several
workers, several workspaces) can share the folder; a reader sees whole files only. A vector is keyed by
the text's hash and the model's id (which carries the model folder's content fingerprint), exactly as
the workspace's own item_embeddings.parquet is, so a cached vector is the one the model would compute.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from bridgerec.storage.files import write_parquet_atomic

COLUMNS = ["text_hash", "model_id", "vector"]


class EmbeddingCache:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def folder(self, model_id: str) -> Path:
        return self.root / re.sub(r"[^A-Za-z0-9._-]", "_", model_id)

    def read(self, model_id: str, columns: list[str] = COLUMNS) -> pa.Table | None:
        """Every cached row of `model_id` (`columns`, by default text_hash, model_id, vector), or None
        when there is none. Files of another vector width than the first are skipped (a model id reused
        for another model would have another fingerprint, so this only guards against a damaged folder);
        the width comes from each file's schema, so reading only the hashes reads no vector."""
        folder = self.folder(model_id)
        files = sorted(p for p in folder.glob("*.parquet")) if folder.is_dir() else []
        tables: list[pa.Table] = []
        width: pa.DataType | None = None
        for f in files:
            try:
                dataset = ds.dataset(f, format="parquet")
                vector = dataset.schema.field("vector").type
                if width is not None and vector != width:
                    continue
                tables.append(dataset.to_table(columns=columns, filter=ds.field("model_id") == model_id))
                width = vector
            except (OSError, KeyError, pa.ArrowInvalid):
                continue  # unreadable: recomputed, not trusted
        return pa.concat_tables(tables) if tables else None

    def write(self, table: pa.Table) -> Path | None:
        """Add rows (text_hash, model_id, vector; one model) as a new file; nothing for no rows."""
        if table.num_rows == 0:
            return None
        model_id = table["model_id"][0].as_py()
        return write_parquet_atomic(
            table.select(COLUMNS), self.folder(model_id) / f"{uuid.uuid4().hex}.parquet"
        )

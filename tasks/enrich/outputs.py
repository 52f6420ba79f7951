"""WORKSPACE/enrich as the other stages read it: `EnrichOutputs`. Nobody outside this package builds a path
into the folder; inside it, a rebuild reads the previous output (its caches) through the same reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bridgerec.runtime.logs import get_logger
from bridgerec.storage import schemas
from bridgerec.storage.workspace import Manifest, Workspace
from bridgerec.tasks.enrich.pca import PCATables
from bridgerec.tasks.ingest import IngestOutputs

STAGE = "enrich"


def fixed_list(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """[n, D] float32 -> Arrow fixed_size_list<float32>[D] (no per-row Python objects)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def to_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """Arrow fixed_size_list<float32>[D] -> [n, D] float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], schemas.vector_type(dim))
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


class EnrichOutputs:
    """The enrich stage's output folder of one workspace (tables listed in docs/enrich.md).

    The train stage reads the item tables and profile vectors as arrays keyed by the ingest's dense ids,
    and hashes the files behind them as its inputs (`file`); the publish stage reads the profile texts
    and the output's `key`. Everything is matched through the source ids (`item_id`, `user_id`), so it
    always follows the current ingest ids.
    """

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.ingest = IngestOutputs(workspace)

    @property
    def folder(self) -> Path:
        return self.workspace.stage_dir(STAGE)

    def manifest(self) -> Manifest | None:
        """The finished stage's manifest, None when the stage has not been built."""
        return self.workspace.read_manifest(STAGE)

    def file(self, name: str) -> Path:
        """The Parquet file behind table `name` (e.g. "item_vectors", "profiles"), for content hashes of
        later stages' inputs; it may not exist (profiles before the first build with profiles on)."""
        return self.folder / f"{name}.parquet"

    def key(self) -> dict[str, Any] | None:
        """What identifies this output (config hash, input hashes, row counts); None when absent."""
        m = self.manifest()
        return (
            None if m is None else {"config": m.config_hash, "inputs": m.input_hashes, "rows": m.row_counts}
        )

    def item_tables(self) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """(global_table [n_items+1, Dg] float32 by global_id, {domain_idx: local_table [n_d+1, Dl] float32
        by local_id}).

        Row 0 of every table is zeros (padding). An ingest item missing from the enrich output is an error
        (ValueError: the enrich stage is older than the ingest stage, rerun enrich).
        """
        vec = self.workspace.read_table(STAGE, "item_vectors")
        items = self.ingest.table("items", columns=["item_id", "global_id", "local_id", "domain_idx"])
        domains = self.ingest.table("domains", columns=["domain_idx", "n_items"])
        idx = pc.index_in(items["item_id"], value_set=vec["item_id"])
        if idx.null_count:
            raise ValueError(
                f"enrich item_vectors.parquet lacks {idx.null_count} of {items.num_rows} ingest items: "
                "the enrich stage is older than the ingest stage, run `bridgerec enrich`"
            )
        rows = idx.to_numpy(zero_copy_only=False).astype(np.int64)
        dg = vec.schema.field("global_vector").type.list_size
        dl = vec.schema.field("local_vector").type.list_size
        g = to_matrix(vec["global_vector"], dg)[rows]  # [n_items, Dg] in ingest row order
        loc = to_matrix(vec["local_vector"], dl)[rows]  # [n_items, Dl]
        gid, lid, dom = (items[c].to_numpy() for c in ("global_id", "local_id", "domain_idx"))
        global_table = np.zeros((items.num_rows + 1, dg), np.float32)
        global_table[gid] = g
        local: dict[int, np.ndarray] = {}
        for d, n in zip(domains["domain_idx"].to_pylist(), domains["n_items"].to_pylist(), strict=True):
            table = np.zeros((n + 1, dl), np.float32)
            mask = dom == d
            table[lid[mask]] = loc[mask]
            local[int(d)] = table
        return global_table, local

    def profile_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(user_idx [n] int64, vectors [n, D] float32) of the users that have a profile, keyed through
        ingest users.parquet by user_id (profiles of users no longer in the ingest are left out).

        Raises FileNotFoundError when the enrich stage has not run; empty arrays when profiles are off.
        """
        prof = self.workspace.read_table(STAGE, "profiles", columns=["user_id", "vector"])
        users = self.ingest.table("users", columns=["user_id", "user_idx"])
        dim = prof.schema.field("vector").type.list_size
        idx = pc.index_in(prof["user_id"], value_set=users["user_id"])
        keep = pc.is_valid(idx).to_numpy(zero_copy_only=False)
        rows = idx.drop_null().to_numpy(zero_copy_only=False).astype(np.int64)
        user_idx = users["user_idx"].to_numpy().astype(np.int64)[rows]
        vectors = to_matrix(prof["vector"], dim)[keep]
        return user_idx, np.ascontiguousarray(vectors, np.float32)

    def profile_texts(self) -> pa.Table | None:
        """user_id, profile_text and, when written, cluster_summaries and llm_model_id of every profile;
        None when the stage has not been built or wrote no profiles. ValueError when the file lacks
        user_id or profile_text."""
        path = self.file("profiles")
        if self.manifest() is None or not path.exists():
            return None
        names = pq.read_schema(path).names
        if not {"user_id", "profile_text"} <= set(names):
            raise ValueError(f"{path} lacks user_id/profile_text columns (has {names})")
        wanted = ["user_id", "profile_text", "cluster_summaries", "llm_model_id"]
        return pq.read_table(path, columns=[c for c in wanted if c in names])

    def previous(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        """A table of the finished output (or only its `columns`), for a rebuild to reuse; None on the
        first build or when it is unreadable (then nothing of it is reused)."""
        path = self.file(name)
        if self.manifest() is None or not path.exists():
            return None
        try:
            return pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            get_logger().warning("enrich: previous %s unreadable (%s): recomputing", name, exc)
            return None

    def pca_tables(self) -> PCATables | None:
        """The finished output's PCA fits, for a rebuild to keep (`refit_reason`); None on the first build,
        for tables from before their model and domains were recorded, or unreadable ones (then refit)."""
        if self.manifest() is None:
            return None
        try:
            return PCATables.load(self.folder / "pca.npz")
        except (OSError, KeyError, ValueError) as exc:
            get_logger().warning("enrich: previous pca.npz unusable (%s): refitting", exc)
            return None

    def kmeans(self) -> dict | None:
        """The finished output's K-means: {"centroids": [K, D] float32, "meta": dict}, or None."""
        path = self.folder / "kmeans.npz"
        if self.manifest() is None or not path.exists():
            return None
        try:
            with np.load(path) as npz:
                return {
                    "centroids": npz["centroids"].astype(np.float32),
                    "meta": json.loads(str(npz["meta"])),
                }
        except (OSError, KeyError, ValueError) as exc:
            get_logger().warning("enrich: previous kmeans.npz unusable (%s): refitting", exc)
            return None

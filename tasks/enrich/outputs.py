"""What the train stage reads from the enrich stage, as numpy arrays indexed by the ingest's dense ids."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from bridgerec.storage import schemas
from bridgerec.storage.workspace import Workspace


def fixed_list(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """[n, D] float32 -> Arrow fixed_size_list<float32>[D] (no per-row Python objects)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def to_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """Arrow fixed_size_list<float32>[D] -> [n, D] float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], schemas.vector_type(dim))
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def load_item_tables(workspace: Workspace) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(global_table [n_items+1, Dg] by global_id, {domain_idx: local_table [n_d+1, Dl] by local_id}).

    Row 0 of every table is zeros (padding). Items are matched by item_id, so the tables always follow the
    current ingest ids; an ingest item missing from the enrich output is an error (rerun enrich).
    """
    vec = workspace.read_table("enrich", "item_vectors")
    items = workspace.read_table(
        "ingest", "items", columns=["item_id", "global_id", "local_id", "domain_idx"]
    )
    domains = workspace.read_table("ingest", "domains", columns=["domain_idx", "n_items"])
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
    loc = to_matrix(vec["local_vector"], dl)[rows]
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


def load_profile_vectors(workspace: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """(user_idx [n] int64, vectors [n, D] float32) of the users that have a profile, keyed through ingest
    users.parquet by user_id (profiles of users no longer in the ingest are left out).

    Raises FileNotFoundError when the enrich stage has not run; returns empty arrays when profiles are off.
    """
    prof = workspace.read_table("enrich", "profiles", columns=["user_id", "vector"])
    users = workspace.read_table("ingest", "users", columns=["user_id", "user_idx"])
    dim = prof.schema.field("vector").type.list_size
    idx = pc.index_in(prof["user_id"], value_set=users["user_id"])
    keep = pc.is_valid(idx).to_numpy(zero_copy_only=False)
    rows = idx.drop_null().to_numpy(zero_copy_only=False).astype(np.int64)
    user_idx = users["user_idx"].to_numpy().astype(np.int64)[rows]
    vectors = to_matrix(prof["vector"], dim)[keep]
    return user_idx, np.ascontiguousarray(vectors, np.float32)

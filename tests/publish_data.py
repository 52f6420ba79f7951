"""Vectors for publish tests, built on a real ingested workspace.

The component under test is FAISS + DuckDB + publishing, not the model, so the vectors are made
here: random item vectors, and each user's vector in a domain is the sum of the items they had there
(plus noise), so that their seen items score high and excluding them visibly matters.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bridgerec.storage.vectors import DomainVectors, seen_from_pairs
from bridgerec.storage.workspace import Workspace


def workspace_vectors(root: Path | str, dim: int = 16, seed: int = 0) -> dict[str, DomainVectors]:
    ws = Workspace(root)
    rng = np.random.default_rng(seed)
    user_ids = ws.read_table("ingest", "users", ["user_id"])["user_id"].to_pylist()
    items = ws.read_table("ingest", "items", ["item_id", "domain"])
    inter = ws.read_table("ingest", "interactions", ["user_id", "item_id"])
    out = {}
    for domain in sorted(set(items["domain"].to_pylist())):
        item_ids = [
            i
            for i, d in zip(items["item_id"].to_pylist(), items["domain"].to_pylist(), strict=True)
            if d == domain
        ]
        indptr, seen = seen_from_pairs(user_ids, item_ids, inter["user_id"], inter["item_id"])
        item_vecs = rng.normal(size=(len(item_ids), dim)).astype(np.float32)
        owner = np.repeat(np.arange(len(user_ids)), np.diff(indptr))
        user_vecs = rng.normal(scale=0.3, size=(len(user_ids), dim)).astype(np.float32)
        np.add.at(user_vecs, owner, item_vecs[seen])
        out[domain] = DomainVectors(domain, user_ids, user_vecs, item_ids, item_vecs, indptr, seen)
    return out


def random_vectors(
    n_users: int, n_items: int, dim: int, seed: int, domain: str = "d", max_seen: int = 40
) -> DomainVectors:
    """Synthetic users and items with a random number (0..max_seen) of seen items each."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_seen + 1, size=n_users)
    seen = np.concatenate([np.sort(rng.choice(n_items, size=c, replace=False)) for c in counts]).astype(
        np.int64
    )
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return DomainVectors(
        domain,
        [f"u{i:05d}" for i in range(n_users)],
        rng.normal(size=(n_users, dim)).astype(np.float32),
        [f"{domain}-item{i:05d}" for i in range(n_items)],
        rng.normal(size=(n_items, dim)).astype(np.float32),
        indptr,
        seen,
    )


def doc_queries() -> list[str]:
    """The ```sql blocks of docs/publish.md, without their SET VARIABLE lines (the tests set them)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "publish.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    return [re.sub(r"^SET VARIABLE .*$", "", b, flags=re.M).strip() for b in blocks]

"""The hand-over between the model and publishing: per target domain, one vector per user and one per
item, such that the model's fused score is a single inner product `user_vectors @ item_vectors.T`.

LLM4CDSR scores an item of domain D as <h_AB, adapter(E_all[i])> + <h_D, e_D(i)>; concatenating
[h_AB, h_D] for the user and [adapter(E_all[i]), e_D(i)] for the item turns that sum into one inner
product, which is what a FAISS inner-product index serves.

The train stage's export (tasks/train/export.py) produces these; the publish stage consumes them. Nothing here knows
about torch or the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class DomainVectors:
    """Vectors of one target domain. Ids are the source's strings; rows line up with the arrays.

    Items each user already had (to exclude from recommendations) are in CSR form:
    the item rows of user row u are `seen_items[seen_indptr[u]:seen_indptr[u + 1]]`.
    """

    domain: str
    user_ids: list[str]  # [U], every user (also those who never touched this domain)
    user_vectors: np.ndarray  # float32 [U, d]
    item_ids: list[str]  # [n_d], the domain's items
    item_vectors: np.ndarray  # float32 [n_d, d]
    seen_indptr: np.ndarray  # int64 [U + 1]
    seen_items: np.ndarray  # int64 [nnz], row indices into item_ids

    def __post_init__(self) -> None:
        self.user_vectors = np.ascontiguousarray(self.user_vectors, dtype=np.float32)
        self.item_vectors = np.ascontiguousarray(self.item_vectors, dtype=np.float32)
        self.seen_indptr = np.asarray(self.seen_indptr, dtype=np.int64)
        self.seen_items = np.asarray(self.seen_items, dtype=np.int64)
        self.validate()

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    def validate(self) -> None:
        """Raise ValueError naming the domain and the broken field, before anything is published."""
        u, n = len(self.user_ids), len(self.item_ids)
        where = f"vectors of domain {self.domain!r}"
        if self.user_vectors.ndim != 2 or self.user_vectors.shape[0] != u:
            raise ValueError(f"{where}: user_vectors shape {self.user_vectors.shape} != [{u}, d]")
        if self.item_vectors.ndim != 2 or self.item_vectors.shape[0] != n:
            raise ValueError(f"{where}: item_vectors shape {self.item_vectors.shape} != [{n}, d]")
        if self.user_vectors.shape[1] != self.item_vectors.shape[1]:
            raise ValueError(
                f"{where}: user dim {self.user_vectors.shape[1]} != item dim {self.item_vectors.shape[1]}"
            )
        if n == 0:
            raise ValueError(f"{where}: no items")
        if not (np.isfinite(self.user_vectors).all() and np.isfinite(self.item_vectors).all()):
            raise ValueError(f"{where}: vectors hold NaN or inf")
        if len(set(self.user_ids)) != u or len(set(self.item_ids)) != n:
            raise ValueError(f"{where}: user_ids or item_ids are not unique")
        if self.seen_indptr.shape != (u + 1,) or self.seen_indptr[0] != 0:
            raise ValueError(f"{where}: seen_indptr must have {u + 1} entries starting at 0")
        if np.any(np.diff(self.seen_indptr) < 0) or self.seen_indptr[-1] != len(self.seen_items):
            raise ValueError(f"{where}: seen_indptr is not a valid CSR offset array")
        if len(self.seen_items) and (self.seen_items.min() < 0 or self.seen_items.max() >= n):
            raise ValueError(f"{where}: seen_items hold item rows outside 0..{n - 1}")

    def seen_counts(self) -> np.ndarray:
        """int64 [U]: how many of this domain's items each user already had."""
        return np.diff(self.seen_indptr)


def seen_from_pairs(
    user_ids: Sequence[str], item_ids: Sequence[str], pair_users: pa.Array, pair_items: pa.Array
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, items) of the (user, item) pairs whose item is in `item_ids`, rows in `user_ids` order.

    Pairs of items outside `item_ids` (other domains) are dropped; duplicates are kept once.
    """
    users = pa.array(list(user_ids), pa.string())
    items = pa.array(list(item_ids), pa.string())
    urow = pc.index_in(pair_users.cast(pa.string()), value_set=users)
    irow = pc.index_in(pair_items.cast(pa.string()), value_set=items)
    if urow.null_count:
        raise ValueError(f"{urow.null_count} interaction rows name users outside user_ids")
    keep = pc.is_valid(irow)
    u = pc.filter(urow, keep).to_numpy().astype(np.int64)
    i = pc.filter(irow, keep).to_numpy().astype(np.int64)
    return csr_from_pairs(u, i, len(users), len(items))


def csr_from_pairs(
    user_rows: np.ndarray, item_rows: np.ndarray, n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr int64 [n_users + 1], items int64 [nnz]) of (user row, item row) pairs: each user's
    items sorted, duplicates kept once."""
    u = np.asarray(user_rows, np.int64)
    keys = np.unique(u * n_items + np.asarray(item_rows, np.int64))  # by user row, then item row
    u, i = keys // n_items, keys % n_items
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=n_users), out=indptr[1:])
    return indptr, i


@dataclass
class TextSpace:
    """The text space a model scores items in (LLM4CDSR's frozen LLM item table `E_all`), with every
    user's history, for the explanations beside published items: the history item closest to each
    recommended one by cosine similarity.

    Rows of `vectors` are items by global row (global id - 1), L2-normalised; an item whose embedding
    failed (a zero row) stays zero and `has_text` is False for it. The history of user row u is
    `history_items[history_indptr[u]:history_indptr[u + 1]]` (global rows, every domain, deduplicated).
    """

    item_ids: list[str]  # [N] by global row
    vectors: np.ndarray  # float32 [N, d], unit rows (zero where has_text is False)
    has_text: np.ndarray  # bool [N]
    user_ids: list[str]  # [U]
    history_indptr: np.ndarray  # int64 [U + 1]
    history_items: np.ndarray  # int64 [nnz], global rows

    @classmethod
    def from_table(
        cls,
        item_ids: list[str],
        table: np.ndarray,
        user_ids: list[str],
        history_indptr: np.ndarray,
        history_items: np.ndarray,
    ) -> TextSpace:
        """From a raw item table [N, d] (any norms): rows normalised here."""
        table = np.asarray(table, np.float32)
        norms = np.linalg.norm(table, axis=1)
        has_text = norms > 0
        vectors = np.zeros_like(table)
        vectors[has_text] = table[has_text] / norms[has_text, None]
        return cls(item_ids, vectors, has_text, user_ids, history_indptr, history_items)

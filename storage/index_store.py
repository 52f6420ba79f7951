"""FAISS indexes, one per target domain and run: build, top-k search with seen-item exclusion, save, load.

Layout (the only code that knows it):

    <root>/<run_id>/manifest.json           what was built: kind, dim, domains, item counts
    <root>/<run_id>/<domain>.faiss          the index (always the CPU form; moved to a GPU to search)
    <root>/<run_id>/<domain>.ids.parquet    id map: faiss_id (int64, = row) -> item_id (source id)

A run's folder is written under a temporary name and renamed into place whole, so a reader never sees
a half-written run. FAISS ids are item rows 0..n-1; the id map turns them back into source ids.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lazy_loader
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from bridgerec.storage.files import swap_dir

if TYPE_CHECKING:
    import faiss
else:  # imported on first use: the settings below are read by every command, `--help` included
    faiss = lazy_loader.load("faiss")

INDEX_FORMAT_VERSION = 1
IVF_TRAIN_POINTS_PER_CELL = 64  # k-means training sample per IVF cell (FAISS's default 256: 4x the time)
AUTO_THRESHOLD_ITEMS = 100_000  # bench/publish.py --index-table: see docs/publish.md, "Choosing the index"
_GPU_MAX_K = 2048  # faiss GPU indexes answer at most this many neighbours per query
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class IndexSettings(BaseModel):
    """Which FAISS index serves each domain. `auto` (the default) searches exactly up to
    `auto_threshold_items` items in a domain and with `auto_kind`, sized by the number of items, above;
    `flat` is always exact; `ivf` and `hnsw` are approximate. Every publish with an approximate index
    measures its recall@k against exact search on `recall_sample_users` users and warns below
    `recall_floor` (docs/publish.md, "Choosing the index")."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        default="auto", description="auto = flat up to auto_threshold_items items, auto_kind above."
    )
    auto_threshold_items: int = Field(
        default=AUTO_THRESHOLD_ITEMS,
        ge=1,
        description="auto: the largest domain (in items) searched exactly (bench/publish.py --index-table).",
    )
    auto_kind: Literal["ivf", "hnsw"] = Field(
        default="ivf", description="auto: the index above the threshold."
    )
    ivf_nlist: int | None = Field(
        default=None,
        ge=1,
        description="IVF cells; unset = sqrt(items) (a power of two); capped at items/39, set or not.",
    )
    ivf_nprobe: int | None = Field(
        default=None,
        ge=1,
        description="IVF cells visited per query; unset = nlist/16 (at least 16); capped at nlist.",
    )
    hnsw_m: int = Field(default=32, ge=4, description="HNSW neighbours per node.")
    hnsw_ef_construction: int = Field(
        default=80, ge=8, description="HNSW candidate list size while building."
    )
    hnsw_ef_search: int = Field(default=128, ge=8, description="Raised to k + seen items when smaller.")
    recall_sample_users: int = Field(
        default=1000,
        ge=0,
        description="Users whose approximate top-k is checked against exact search (0 = off).",
    )
    recall_floor: float = Field(
        default=0.95, ge=0, le=1, description="Warn when an approximate index's recall@k falls below this."
    )
    gpu: Literal["auto", "off"] = Field(
        default="auto", description="auto = search on the GPU when faiss finds one (faiss-gpu)."
    )

    def resolve(self, n_items: int) -> IndexSettings:
        """The concrete index for a domain of `n_items` items: `auto` decided, IVF sizes filled in."""
        kind = self.kind
        if kind == "auto":
            kind = "flat" if n_items <= self.auto_threshold_items else self.auto_kind
        update: dict[str, Any] = {"kind": kind}
        if kind == "ivf":
            nlist = self.ivf_nlist or 2 ** round(math.log2(max(1.0, math.sqrt(n_items))))
            nlist = max(1, min(nlist, n_items // 39))  # k-means wants ~39 training points per centroid
            update |= {"ivf_nlist": nlist, "ivf_nprobe": min(nlist, self.ivf_nprobe or max(16, nlist // 16))}
        return self.model_copy(update=update)

    @property
    def approximate(self) -> bool:
        return self.kind in ("ivf", "hnsw")

    def label(self) -> str:
        """How the runs table and the summary name a resolved index."""
        if self.kind == "ivf":
            return f"ivf(nlist={self.ivf_nlist}, nprobe={self.ivf_nprobe})"
        if self.kind == "hnsw":
            return f"hnsw(M={self.hnsw_m}, efSearch={self.hnsw_ef_search})"
        return self.kind


def check_run_id(run_id: str) -> str:
    """Run ids become folder names: letters, digits, '.', '_', '-' only."""
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} must match {_RUN_ID.pattern}")
    return run_id


def set_threads(threads: int) -> None:
    faiss.omp_set_num_threads(max(1, threads))


def gpu_count() -> int:
    """GPUs faiss can use; 0 with faiss-cpu."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def build_index(item_vectors: np.ndarray, settings: IndexSettings) -> faiss.Index:
    """An inner-product index over `item_vectors` (float32 [n, d]); FAISS id = row. `settings` is resolved
    for the number of items first (`auto`, IVF sizes)."""
    x = np.ascontiguousarray(item_vectors, dtype=np.float32)
    n, d = x.shape
    settings = settings.resolve(n)
    index: faiss.Index
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif settings.kind == "ivf":
        nlist = settings.ivf_nlist or 1
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_CELL  # k-means on a sample, not all items
        ivf.train(x)
        ivf.nprobe = settings.ivf_nprobe or 1
        index = ivf
    elif settings.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = settings.hnsw_ef_construction
        hnsw.hnsw.efSearch = settings.hnsw_ef_search
        index = hnsw
    else:  # pragma: no cover - pydantic restricts the values
        raise ValueError(f"unknown index kind {settings.kind!r}")
    index.add(x)
    return index


@dataclass
class Searcher:
    """An index ready to search: on the GPU when there is one and the kind supports it."""

    cpu: faiss.Index
    device: faiss.Index
    on_gpu: bool
    settings: IndexSettings = field(default_factory=IndexSettings)

    @classmethod
    def for_index(cls, index: faiss.Index, settings: IndexSettings) -> Searcher:
        if settings.gpu == "auto" and gpu_count() > 0 and not isinstance(index, faiss.IndexHNSW):
            # HNSW has no GPU form in faiss; flat and IVF do.
            return cls(index, faiss.index_cpu_to_all_gpus(index), True, settings)
        return cls(index, index, False, settings)

    @property
    def ntotal(self) -> int:
        return int(self.cpu.ntotal)

    def search(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [b, kk], item rows int64 [b, kk]); -1 rows when fewer than kk items exist."""
        index = self.device if self.on_gpu and kk <= _GPU_MAX_K else self.cpu
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = max(self.settings.hnsw_ef_search, kk)
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), kk)


@dataclass
class ExactSearcher:
    """Exact inner-product search straight over the item vectors (faiss.knn, no index built, no copy):
    the reference an approximate index's recall is measured against."""

    item_vectors: np.ndarray  # float32 [n, d]

    @property
    def ntotal(self) -> int:
        return int(self.item_vectors.shape[0])

    def search(self, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return faiss.knn(q, self.item_vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)


@dataclass
class TopK:
    """Per user row: the top-k item rows (-1 where fewer than k items qualify) and their scores."""

    items: np.ndarray  # int64 [U, k]
    scores: np.ndarray  # float32 [U, k], NaN where items == -1


def search_topk(
    searcher: Searcher | ExactSearcher,
    user_vectors: np.ndarray,
    k: int,
    seen_indptr: np.ndarray | None = None,
    seen_items: np.ndarray | None = None,
    batch_users: int = 8192,
    on_batch: Callable[[int], None] | None = None,
) -> TopK:
    """Top-k items per user by inner product, skipping each user's seen items when given (CSR).

    Users are searched in batches sorted by how many items they have seen, each batch asking FAISS for
    k + (the batch's largest seen count) neighbours, so that k unseen ones survive the filter while a
    few heavy users do not inflate every query. Filtering is vectorised over the batch.
    """
    n_users = user_vectors.shape[0]
    n_items = searcher.ntotal
    out_items = np.full((n_users, k), -1, dtype=np.int64)
    out_scores = np.full((n_users, k), np.nan, dtype=np.float32)
    if seen_indptr is None or seen_items is None:
        seen_counts = np.zeros(n_users, dtype=np.int64)
        seen_keys = np.zeros(0, dtype=np.int64)
    else:
        seen_counts = np.diff(seen_indptr)
        owner = np.repeat(np.arange(n_users, dtype=np.int64), seen_counts)
        seen_keys = np.sort(owner * n_items + seen_items)  # one int64 key per (user row, item row)
    order = np.argsort(seen_counts, kind="stable")
    for start in range(0, n_users, batch_users):
        rows = order[start : start + batch_users]  # [b]
        kk = min(n_items, k + int(seen_counts[rows].max(initial=0)))
        scores, items = searcher.search(user_vectors[rows], kk)  # [b, kk] each
        drop = items < 0
        if len(seen_keys):
            keys = rows[:, None] * n_items + items  # [b, kk]
            pos = np.minimum(np.searchsorted(seen_keys, keys), len(seen_keys) - 1)
            drop |= seen_keys[pos] == keys
        # Stable sort of the drop flags keeps the score order of the survivors: their first k win.
        pick = np.argsort(drop, axis=1, kind="stable")[:, :k]  # [b, min(k, kk)]
        chosen = np.take_along_axis(items, pick, axis=1)
        chosen_scores = np.take_along_axis(scores, pick, axis=1)
        chosen_drop = np.take_along_axis(drop, pick, axis=1)
        chosen[chosen_drop] = -1
        chosen_scores[chosen_drop] = np.nan
        width = chosen.shape[1]
        out_items[rows, :width] = chosen
        out_scores[rows, :width] = chosen_scores
        if on_batch is not None:
            on_batch(len(rows))
    return TopK(out_items, out_scores)


@dataclass
class LoadedIndex:
    """One domain's index of a saved run, with its id map."""

    run_id: str
    domain: str
    index: faiss.Index
    item_ids: list[str]
    meta: dict[str, Any]

    def search(self, user_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-k source item ids and scores for each query vector (no seen-item exclusion)."""
        scores, rows = Searcher.for_index(self.index, IndexSettings(gpu="off")).search(user_vectors, k)
        ids = [[self.item_ids[r] for r in row if r >= 0] for row in rows]
        return ids, scores


class IndexStore:
    """Saved indexes, one folder per run under `root`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

    def run_dir(self, run_id: str) -> Path:
        return self.root / check_run_id(run_id)

    def save_run(
        self,
        run_id: str,
        indexes: Mapping[str, tuple[faiss.Index, Sequence[str]]],
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write every domain's index and id map, then rename the run's folder into place whole."""
        target = self.run_dir(run_id)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{run_id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            domains = {}
            for domain, (index, item_ids) in indexes.items():
                if index.ntotal != len(item_ids):
                    raise ValueError(f"index of {domain!r} holds {index.ntotal} vectors, {len(item_ids)} ids")
                faiss.write_index(index, str(tmp / f"{domain}.faiss"))
                ids = pa.table(
                    {
                        "faiss_id": pa.array(np.arange(len(item_ids), dtype=np.int64)),
                        "item_id": pa.array(list(item_ids), pa.string()),
                    }
                )
                pq.write_table(ids, tmp / f"{domain}.ids.parquet")
                domains[domain] = {
                    "items": int(index.ntotal),
                    "dim": int(index.d),
                    "type": type(index).__name__,
                }
            manifest = {
                "format_version": INDEX_FORMAT_VERSION,
                "run_id": run_id,
                "created_at": datetime.now(UTC).isoformat(),
                "metric": "inner_product",
                "domains": domains,
                **dict(meta or {}),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            self._swap_in(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _swap_in(self, tmp: Path, target: Path) -> None:
        swap_dir(tmp, target, self.root / f".old-{target.name}-{uuid.uuid4().hex[:8]}")

    def manifest(self, run_id: str) -> dict[str, Any]:
        path = self.run_dir(run_id) / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"no saved index for run {run_id!r} under {self.root}")
        manifest: dict[str, Any] = json.loads(path.read_text())
        return manifest

    def load(self, run_id: str, domain: str, mmap: bool = False) -> LoadedIndex:
        meta = self.manifest(run_id)
        if domain not in meta["domains"]:
            raise KeyError(
                f"run {run_id!r} has no index for domain {domain!r}; it has {sorted(meta['domains'])}"
            )
        folder = self.run_dir(run_id)
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        index = faiss.read_index(str(folder / f"{domain}.faiss"), flags)
        ids = pq.read_table(folder / f"{domain}.ids.parquet")
        if ids["faiss_id"].to_numpy().tolist() != list(range(ids.num_rows)):
            raise ValueError(f"id map of {run_id}/{domain} is not in faiss id order")
        return LoadedIndex(run_id, domain, index, ids["item_id"].to_pylist(), meta)

    def runs(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "manifest.json").exists())

    def remove(self, run_id: str) -> None:
        target = self.run_dir(run_id)
        if target.exists():
            trash = self.root / f".old-{run_id}-{uuid.uuid4().hex[:8]}"
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def clean_temporaries(self, older_than_s: float = 6 * 3600) -> list[str]:
        """Remove folders left by a crashed save (never a finished run's folder, nor a recent one that a
        concurrent save may still be writing)."""
        removed = []
        if self.root.exists():
            now = time.time()
            for p in [*self.root.glob(".tmp-*"), *self.root.glob(".old-*")]:
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime > older_than_s:
                        shutil.rmtree(p)
                        removed.append(p.name)
        return removed


def recall_at_k(
    searcher: Searcher,
    item_vectors: np.ndarray,
    user_vectors: np.ndarray,
    k: int,
    seen_indptr: np.ndarray | None = None,
    seen_items: np.ndarray | None = None,
    sample: int = 1000,
    seed: int = 0,
) -> float:
    """Mean recall@k of `searcher` against exact search over `item_vectors`, on `sample` users drawn with
    `seed` (seen items excluded on both sides): |approximate top-k ∩ exact top-k| / |exact top-k|."""
    n_users = user_vectors.shape[0]
    rows = np.sort(np.random.default_rng(seed).choice(n_users, size=min(sample, n_users), replace=False))
    indptr, items = None, None
    if seen_indptr is not None and seen_items is not None:
        counts = np.diff(seen_indptr)[rows]
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        items = np.concatenate(
            [seen_items[seen_indptr[r] : seen_indptr[r + 1]] for r in rows] or [np.zeros(0)]
        )
        items = items.astype(np.int64)
    queries = np.ascontiguousarray(user_vectors[rows], dtype=np.float32)
    got = search_topk(searcher, queries, k, indptr, items).items
    want = search_topk(
        ExactSearcher(np.ascontiguousarray(item_vectors, np.float32)), queries, k, indptr, items
    ).items
    hits = total = 0
    for g, w in zip(got, want, strict=True):
        exact = set(w[w >= 0].tolist())
        hits += len(exact & set(g[g >= 0].tolist()))
        total += len(exact)
    return hits / total if total else 1.0

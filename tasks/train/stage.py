"""The train stage: train one model on the workspace, evaluate it honestly, record the run.

Each run lives in WORKSPACE/runs/<run_id>/ (see storage/runs.py); the run id is a hash of the model's
settings and the input files' contents, so an unchanged rerun finds its finished run and skips, and an
interrupted one finds its checkpoint and resumes. A run that trains on changed inputs starts from the
best weights of the latest earlier run of the same model when they fit (warm start, tasks/train/warmstart.py)
and trains at most `warm_start_epochs`. The stage folder WORKSPACE/train/ holds the leaderboard of finished
runs (runs.parquet) and a manifest whose stats name the best run on the current inputs.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel

from bridgerec.models.base import Recommender
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import EvalSplit, SequenceData
from bridgerec.models.evaluate import (
    FloorOn,
    PriorFit,
    evaluate,
    fit_text_prior,
    headline,
    metric_rows,
    new_item_targets,
)
from bridgerec.models.optim import Optimizer
from bridgerec.models.pop import Popularity
from bridgerec.models.registry import build_model
from bridgerec.models.trainer import FitState, TrainingDiverged, fit, score_init, set_seed
from bridgerec.models.warmstart import WarmStartError
from bridgerec.runtime.logs import DETAIL
from bridgerec.runtime.reports import TableReport
from bridgerec.runtime.runner import step
from bridgerec.storage import schemas
from bridgerec.storage.files import atomic_path
from bridgerec.storage.runs import RunDir
from bridgerec.storage.workspace import Workspace, config_hash, hash_json
from bridgerec.tasks.context import StageRun
from bridgerec.tasks.train.checkpoint import load_weights, save_checkpoint, save_weights
from bridgerec.tasks.train.files import input_files, input_hashes
from bridgerec.tasks.train.inputs import TrainInputs, load_inputs
from bridgerec.tasks.train.refit import refit
from bridgerec.tasks.train.settings import MIN_NEW_TARGETS, TrainSettings
from bridgerec.tasks.train.warmstart import InitRecord, init_from

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
    # train.text_prior: w and c chosen (`_fit_text_prior`), validation full-ranking NDCG@10 at each tried
    text_prior: dict[str, Any] = {}
    # train.refit: the epochs replayed through the validation targets (their rates), seconds, or why not
    refit: dict[str, Any] = {}
    # split -> domain -> users with fewer unseen items than eval_negatives: their sampled candidates are
    # all of those items (a small domain, or a heavy user such as a crawler)
    sampled_short_users: dict[str, dict[str, int]] = {}
    skipped: bool = False
    seconds: float = 0.0
    run_dir: str = ""
    device: str = "cpu"
    threads: int = 1

    def best_epoch_text(self) -> str:
        """`best epoch B of E`, saying so when a warm start's best is its own init (epoch 0): no epoch
        beat it on validation, so the run keeps the previous night's weights (a new user's trial read
        `best epoch 0 of 1` as a run that did not train)."""
        text = f"best epoch {self.best_epoch} of {self.epochs}"
        if self.init == "warm" and self.best_epoch == 0:
            text += " (the warm start itself: no epoch beat it on validation, so its weights are kept)"
        return text

    def reports(self) -> list[TableReport]:
        """The metrics table: HR and NDCG per split, protocol (sampled, full ranking) and user group."""
        rows = []
        for split in ("valid", "test"):
            result = getattr(self, split)
            groups = {
                "sampled": {k: v for k, v in result.items() if k != "full"},
                "full": result.get("full", {}),
            }
            for protocol, by_group in groups.items():
                for group, metrics in by_group.items():
                    rows.append(
                        {"split": split, "protocol": protocol, "group": group}
                        | {k: round(v, 4) for k, v in metrics.items()}
                    )
        description = (
            f"{self.model} ({self.run_id}): {self.best_epoch_text()}, "
            f"{self.epoch_seconds:.1f} s/epoch"
            + (f", warm start from {self.warm_start_from}" if self.init == "warm" else "")
            + (
                f"; test: refit through the validation targets ({self.refit['epochs']} epochs)"
                if self.refit.get("epochs")
                else ""
            )
            + (" (skipped: already trained)" if self.skipped else "")
        )
        return [TableReport(f"train-metrics-{self.model}", rows, description)]


def run_id_for(settings: TrainSettings, hashes: dict[str, str]) -> str:
    return f"{settings.model}-{hash_json([config_hash(settings), hashes])[:12]}"


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


@step("train")
def run_train(run: StageRun[TrainSettings]) -> TrainSummary:
    """Train `settings.model` on the workspace; skip when the same run already finished.

    The run id hashes the settings (`config_hash`) and the input files; a run interrupted earlier resumes
    from its checkpoint, a new one starts warm or cold (`init_from`); a forced one is a run of its own
    beside the complete one (`_run_dir`)."""
    settings, workspace, log = run.settings, run.workspace, run.log
    started = time.perf_counter()
    hashes = input_hashes(input_files(workspace, settings.uses_llm_tables, settings.uses_profiles))
    run_dir = _run_dir(run, run_id_for(settings, hashes))
    if run_dir.is_complete():  # unforced, and these settings and inputs are trained: their latest run
        log.info("train: %s already trained on these inputs, skipping (%s)", run_dir.run_id, run_dir.path)
        summary = TrainSummary(**run_dir.read_summary())
        _record(workspace, run_dir, summary, hashes, config_hash(settings), settings.select_by)
        return summary.model_copy(update={"skipped": True, "seconds": time.perf_counter() - started})

    threads = run.threads_for(settings.threads)
    torch.set_num_threads(threads)
    device = pick_device(settings.device)
    set_seed(settings.seed, settings.deterministic)
    inputs = load_inputs(run)
    spec = settings.model_spec(**inputs.widths)  # the typed model config the model is built from
    model = build_model(spec, inputs.catalog, inputs.tables).to(device)
    start = _start(run, run_dir, model, spec, inputs, hashes, device)
    t0 = time.perf_counter()
    valid, test = (
        inputs.data.eval_split(name, settings.eval_negatives, settings.seed, settings.short_history)
        for name in ("valid", "test")
    )
    log.info("train: evaluation splits built in %.1f s", time.perf_counter() - t0, extra=DETAIL)
    short = {sp.name: _report_short(inputs.data, sp, settings.eval_negatives, log) for sp in (valid, test)}
    state = _fit(run, run_dir, model, inputs, start, valid, device)
    summary = _evaluate(run, run_dir, model, inputs, state, (valid, test), hashes, device)
    summary = summary.model_copy(
        update={
            "sampled_short_users": {k: {d: len(u) for d, u in v.items()} for k, v in short.items() if v},
            "resumed_from_epoch": start.resumed_from,
            "init": start.init.init,
            "warm_start_from": start.init.warm_start_from,
            "cold_start_reason": start.init.reason,
            "warm_start_items": start.init.items,
            "seconds": time.perf_counter() - started,
            "device": str(device),
            "threads": threads,
        }
    )
    summary = summary.model_copy(update={"run_dir": str(run_dir.path)})
    run_dir.write_summary(summary.model_dump(mode="json"))
    run_dir.checkpoint.unlink(missing_ok=True)
    _record(workspace, run_dir, summary, hashes, config_hash(settings), settings.select_by)
    log.info(
        "train: %s (%s start) %s, test ndcg@10 full ranking %.4f (sampled, %d negatives: %.4f), %.1f s/epoch",
        run_dir.run_id,
        summary.init,
        summary.best_epoch_text(),
        summary.test.get("full", {}).get("overall", {}).get("ndcg@10", float("nan")),
        settings.eval_negatives,
        summary.test["overall"]["ndcg@10"],
        summary.epoch_seconds,
    )
    return summary


def _run_dir(run: StageRun[TrainSettings], base: str) -> RunDir:
    """The folder this call trains in, or the complete run it skips to.

    Unforced: the best complete training of these settings and inputs (`base` or a forced retrain of
    it, `base-rN`; by validation under `select_by`, ties to the earlier: the one the leaderboard picks
    among them), skipped; else `base`, which resumes from its checkpoint if it has one. Forced: a
    complete run is never touched (it may be serving, the gate rescores it, warm starts read it), so the
    retrain is a run of its own, `base-r{N+1}`, that the leaderboard and the quality gate judge like any
    other; a forced retrain killed before it finished is resumed by the next forced call; an unfinished
    `base` is started again."""
    trainings = RunDir.trainings(run.workspace, base)
    complete = [t for t in trainings if t.is_complete()]
    if not run.force:
        return _best_of(complete, run.settings.select_by) if complete else RunDir(run.workspace, base)
    newest = trainings[-1] if trainings else RunDir(run.workspace, base)
    if newest.is_complete():
        retrain = RunDir(run.workspace, RunDir.retrain_id(base, _number(newest, base) + 1))
        run.log.info(
            "train: --force: retraining %s as %s beside it (%s and the earlier trainings stay as they are; "
            "the best of them on validation is what the gate judges against the served run)",
            base,
            retrain.run_id,
            newest.run_id,
        )
        return retrain
    if newest.run_id == base and newest.path.exists():  # an unfinished first attempt: nothing to keep
        shutil.rmtree(newest.path)
    return newest


def _best_of(runs: list[RunDir], select_by: str) -> RunDir:
    """The run among complete `runs` that `select_best` picks (their summaries' validation figures)."""
    rows = []
    for r in runs:
        valid = r.read_summary().get("valid", {})
        full = valid.get("full", {}).get("overall", {}).get("ndcg@10")
        rows.append(
            {"run": r, "valid_full_ndcg10": full, "valid_ndcg10": valid.get("overall", {}).get("ndcg@10")}
        )
    best: RunDir = select_best(rows, select_by)["run"]
    return best


def _number(run_dir: RunDir, base: str) -> int:
    """N of `base-rN` (1 for `base` itself)."""
    return 1 if run_dir.run_id == base else int(run_dir.run_id[len(base) + 2 :])


@dataclass
class _Started:
    """How the run starts: its init record, the fit state to continue (resumed or warm) and the optimizer
    state of a resumed run."""

    how: Literal["resume", "warm", "cold"]
    init: InitRecord
    state: FitState | None
    opt_state: Any  # the optimizer's state_dict of a resumed run
    resumed_from: int


def _start(
    run: StageRun[TrainSettings],
    run_dir: RunDir,
    model: Recommender,
    spec: ModelConfig,
    inputs: TrainInputs,
    hashes: dict[str, str],
    device: torch.device,
) -> _Started:
    """Decide the start (`init_from`: resume, warm or cold), record the run's config.json."""
    settings, log = run.settings, run.log
    # The resolved settings as recorded in config.json (`settings`; warm start compares them).
    model_settings = settings.model_dump(mode="json") | {
        "architecture": settings.architecture,
        "tables": inputs.widths,
    }
    run_dir.path.mkdir(parents=True, exist_ok=True)
    warm: bool | str = settings.warm_start
    if settings.cold_start.new_items:
        warm = "train.cold_start.new_items: earlier weights have seen the held-out items"
    start = init_from(
        model, run_dir, model_settings, inputs.catalog, run.workspace, hashes,
        force=run.force, warm=warm, device=device, log=log.info, warn=log.warning,
    )  # fmt: skip
    if model.prior_dims:  # off while training, whatever the loaded weights brought (a warm start: w, c)
        model.set_text_prior(0.0, spec.text_prior_new_items)
    run_dir.write_items(inputs.catalog.item_ids)
    catalog = inputs.catalog
    run_dir.write_config(
        {
            "run_id": run_dir.run_id,
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
            "init": start.init.model_dump(mode="json"),
            "created_at": datetime.now(UTC).isoformat(),
            "torch": torch.__version__,
        }
    )
    if start.checkpoint is not None:
        state = start.checkpoint.state
        log.info("train: resuming %s after epoch %d (%s start)", run_dir.run_id, state.epoch, start.init.init)
        return _Started("resume", start.init, state, start.checkpoint.optimizer, state.epoch)
    return _Started(start.how, start.init, None, None, 0)


def _fit(
    run: StageRun[TrainSettings],
    run_dir: RunDir,
    model: Recommender,
    inputs: TrainInputs,
    start: _Started,
    valid: EvalSplit,
    device: torch.device,
) -> FitState:
    """Train until early stopping (or count, for `pop`), keeping the best weights in the run folder."""
    settings, log = run.settings, run.log
    cfg = settings.fit_config(warm=start.init.init == "warm")  # a resumed warm run keeps the warm limits
    state = start.state
    if start.how == "warm":
        # Epoch 0 = the warm init itself: it is the best to beat, so training can only keep or improve it.
        # The warm run's optimizer starts fresh: the earlier run's Adam moments are not kept.
        state = score_init(model, valid, cfg, device)
        save_weights(model, run_dir)
        log.info("train: the warm init scores validation NDCG@10 %.4f before training", state.best_valid)

    def on_epoch(m: Recommender, opt: Optimizer, st: FitState, is_best: bool) -> None:
        if is_best:
            save_weights(m, run_dir)
        save_checkpoint(run_dir, m, opt, st, start.init.model_dump(mode="json"))

    counts = inputs.data.item_counts("train")
    model.set_trained_items(counts)
    if model.trainable and settings.data_parallel.workers > 1:
        from bridgerec.tasks.train.distributed import DataParallelJob, launch

        dp = settings.data_parallel
        log.info("train: data-parallel over %d workers (%s)", dp.workers, dp.launcher)
        job = DataParallelJob(
            settings=settings, workspace=str(run.workspace.root), run_id=run_dir.run_id,
            threads=max(1, int(dp.cpus_per_worker)), warm=start.init.init == "warm",
            init=start.init.model_dump(mode="json"),
        )  # fmt: skip
        state = launch(job, model, state, start.opt_state)
    elif model.trainable:
        try:
            state = fit(
                model, inputs.data, valid, cfg, device, inputs.profiles, state, start.opt_state, on_epoch,
                log=lambda message: log.info(message, extra=DETAIL),  # per epoch: in the log; the bar shows it
            )  # fmt: skip
        except TrainingDiverged as exc:
            raise TrainingDiverged(
                f"train: run {run_dir.run_id} failed: {exc}; it is not on the leaderboard"
            ) from exc
    else:  # pop: fitted by counting the training prefixes; its "epoch 0" is the only one
        assert isinstance(model, Popularity)
        model.fit_counts(counts)
        state = score_init(model, valid, cfg, device)
        save_weights(model, run_dir)
    if not run_dir.model.exists():
        raise RuntimeError("training finished without a single epoch; check train.epochs and the time budget")
    return state


def _evaluate(
    run: StageRun[TrainSettings],
    run_dir: RunDir,
    model: Recommender,
    inputs: TrainInputs,
    state: FitState,
    splits: tuple[EvalSplit, EvalSplit],
    hashes: dict[str, str],
    device: torch.device,
) -> TrainSummary:
    """The best weights on validation; the refit (`train.refit`, tasks/train/refit.py) or else the best
    weights on test, sampled and full ranking, plus the cold-start evaluations; writes metrics.parquet
    and the validation curve."""
    settings = run.settings
    data, catalog = inputs.data, inputs.catalog
    load_weights(model, run_dir, device)
    prior = _fit_text_prior(run, run_dir, model, inputs, splits[0], device)
    rows: list[dict] = []
    results = {}
    scorer, refit_record = model, {}
    for split in splits:
        if split.name == "test" and settings.refit:
            try:
                refitted = refit(run, run_dir, model, inputs, state, hashes, device)
                scorer, data, refit_record = refitted.model, refitted.data, refitted.record
            except WarmStartError as exc:  # the warm init cannot be rebuilt: test the selected weights
                run.log.warning("train: no refit, the test figures are the selected weights': %s", exc)
                refit_record = {"skipped": str(exc)}
                run_dir.refit.unlink(missing_ok=True)  # an earlier attempt's refit: served would prefer it
        ranks = evaluate(scorer, split, settings.eval_batch_size, settings.full_ranking, device)
        if ranks.nonfinite:  # e.g. a warm init that scored finite but whose test scores are not
            raise TrainingDiverged(
                f"train: run {run_dir.run_id} failed: its best weights give NaN or inf scores for "
                f"{ranks.nonfinite} {split.name} users; lower train.lr (now {settings.lr:g}) or check the inputs"
            )
        # popularity for the beyond-accuracy figures: what the scoring model trained on
        split_rows = metric_rows(ranks, split, catalog, data.item_counts("train"))
        results[split.name] = headline(split_rows, catalog.domains)
        rows += [r | {"run_id": run_dir.run_id, "epoch": state.best_epoch} for r in split_rows]
    cold_rows, cold_summary = inputs.cold_eval.evaluate(
        scorer, catalog, inputs.sequences, splits[1], ranks, settings.eval_batch_size,
        settings.full_ranking, device, settings.uses_llm_tables, settings.max_len,
    )  # fmt: skip
    rows += [r | {"run_id": run_dir.run_id, "epoch": state.best_epoch} for r in cold_rows]
    rows += _history_rows(run_dir.run_id, state.history)
    run_dir.write_metrics(rows)
    _plot_curve(state.history, run_dir.curve, f"{settings.model} ({run_dir.run_id})")

    hist = [h for h in state.history if h["epoch"] >= 1]  # epoch 0: the warm init, evaluated only
    return TrainSummary(
        run_id=run_dir.run_id,
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
        init_valid_ndcg10=next((h["valid_ndcg@10"] for h in state.history if h["epoch"] == 0), None),
        cold_start=cold_summary,
        text_prior=prior,
        refit=refit_record,
        run_dir=str(run_dir.path),
    )


def _fit_text_prior(
    run: StageRun[TrainSettings],
    run_dir: RunDir,
    model: Recommender,
    inputs: TrainInputs,
    valid: EvalSplit,
    device: torch.device,
) -> dict[str, Any]:
    """train.text_prior: choose the prior's weight w (and, unless fixed, its scale c on new items) on
    validation (full ranking) for the best weights and save them with it (publish scores with what the
    test figures measured); with `text_prior_new_items_guard` (`untrained` or `exposure`), among the
    pairs that rank the new-item targets at least as well as the same model untrained, or give new items
    at least its share of the top-10 slots (`untrained_prior_fit`). {} without a prior."""
    if not model.prior_dims:
        return {}
    started = time.perf_counter()
    settings = run.settings
    untrained = None
    if guards_new_items(settings) and new_item_targets(model, valid) >= MIN_NEW_TARGETS:
        _, untrained = untrained_prior_fit(settings, model, inputs, valid, device)
        key = (untrained.weight, untrained.new_items)
        run.log.info(
            "train: the new items' floor, from the same model untrained (not this run): text prior (%g, x%g), "
            "validation full NDCG@10 %.4f, %.4f +- %.4f on the %d new-item targets, new items %.1f%% of the "
            "top-10 slots",
            *key, untrained.ndcg10[key], untrained.ndcg10_new[key], untrained.ndcg10_new_se[key],
            untrained.new_targets, 100 * untrained.new_share[key],
        )  # fmt: skip
    fit = prior_fit(settings, model, valid, device, untrained)
    save_weights(model, run_dir)
    seconds = time.perf_counter() - started
    _log_prior_choice(run, fit, seconds, untrained)
    w, c = fit.weight, fit.new_items
    return {
        "weight": w,
        "new_items": c,
        "new_items_chosen": fit.fitted_new_items,
        "valid_new_item_targets": fit.new_targets,
        "valid_ndcg@10": {str(x): f for (x, y), f in fit.ndcg10.items() if y == c},  # by w, at the chosen c
        "valid_ndcg@10_new_items": {str(y): f for (x, y), f in fit.ndcg10.items() if x == w},  # by c, at w
        # at the chosen (w, c), over the validation targets that are new items (NaN: none) and the others
        "valid_ndcg@10_new_item_targets": fit.ndcg10_new[(w, c)],
        "valid_ndcg@10_warm_targets": fit.ndcg10_warm[(w, c)],
        "valid_new_item_share@10": fit.new_share[(w, c)],  # new items' share of the top-10 slots
        # the weight of new-item targets in the choice (None: as many as they are) and the figure chosen on
        "new_item_targets_share": fit.share,
        "valid_chosen_on": fit.chosen_on((w, c)),
        # the guard (`text_prior_new_items_guard`): the same model untrained, its (w, c) and its figure
        # over the new-item targets and exposure, the floor the chosen pair had to reach and on what
        # (`floor_on`: ndcg or exposure; None: no guard applied)
        "untrained": None if untrained is None else _untrained_record(untrained),
        "new_items_floor": fit.new_items_floor,
        "floor_on": fit.floor_on,
        "floor_met": fit.floor_met,
        "seconds": seconds,
    }


def _untrained_record(untrained: PriorFit) -> dict[str, float]:
    """The summary's `text_prior.untrained`: the untrained model's (w, c), its validation NDCG@10 overall
    and over the new-item targets (with its standard error and that over the figure: what guard `auto`
    compares with `text_prior_new_items_guard_rse`), and new items' share of its top-10 slots."""
    key = (untrained.weight, untrained.new_items)
    return {
        "weight": untrained.weight,
        "new_items": untrained.new_items,
        "valid_ndcg@10": untrained.ndcg10[key],
        "valid_ndcg@10_new_item_targets": untrained.ndcg10_new[key],
        "valid_ndcg@10_new_item_targets_se": untrained.ndcg10_new_se[key],
        "valid_ndcg@10_new_item_targets_rse": untrained_rse(untrained),
        "valid_new_item_share@10": untrained.new_share[key],
    }


def _log_prior_choice(
    run: StageRun[TrainSettings], fit: PriorFit, seconds: float, untrained: PriorFit | None
) -> None:
    """Log the text prior's chosen (w, c) and how c was had (chosen, fixed, the grid's floor; weighed; the
    untrained model's floor met or not, a warning where not; with guard `auto`, why that floor)."""
    w, c = fit.weight, fit.new_items
    how = (
        "chosen"
        if fit.fitted_new_items
        else "fixed"
        if run.settings.text_prior_new_items is not None
        else f"the grid's floor: fewer than {MIN_NEW_TARGETS} such targets"
    )
    if fit.share is not None:
        how += f", they weigh the catalogue's share of new items, {fit.share:.1%}"
    if fit.new_items_floor is not None:
        on = fit.floor_on or "ndcg"
        what = "NDCG@10 over the new-item targets" if on == "ndcg" else "new items' share of the top-10 slots"
        how += f", {what} at least the untrained model's {fit.new_items_floor:.4f}"
        if run.settings.text_prior_new_items_guard == "auto" and untrained is not None:
            rse, most = untrained_rse(untrained), run.settings.text_prior_new_items_guard_rse
            verdict = "within" if rse <= most else "over"
            how += (
                " ('auto': the untrained model's NDCG@10 over the new-item targets has a relative standard"
                f" error of {rse:.1%}, {verdict} {most:.1%})"
            )
        if not fit.floor_met:
            how += " (none reached it)"
            run.log.warning(
                "train: the text prior: no (w, c) reaches the same model untrained on validation's %s "
                "(%.4f, at best %.4f); the plain choice is kept",
                what, fit.new_items_floor, max(fit.on(on).values()),
            )  # fmt: skip
    run.log.info(
        "train: text prior weight %g, x%g on new items (%s; %d validation targets are new items); "
        "validation full NDCG@10 %.4f, %.4f without the prior; fitted in %.1f s",
        w, c, how, fit.new_targets, fit.ndcg10[(w, c)], fit.ndcg10.get((0.0, c), float("nan")), seconds,
    )  # fmt: skip


def guards_new_items(settings: TrainSettings) -> bool:
    """`text_prior_new_items_guard` applies: set (not `none`), for a text prior whose scale c on new items
    is chosen on validation, in a model with ID rows (where items can be new)."""
    guard = settings.text_prior_new_items_guard
    return guard != "none" and "text_prior_new_items_guard" not in settings.ignored_fields()


def prior_fit(
    settings: TrainSettings,
    model: Recommender,
    valid: EvalSplit,
    device: torch.device | str,
    untrained: PriorFit | None = None,
) -> PriorFit:
    """`fit_text_prior` on validation with the settings' grids and choice rule (leaves the model at the
    chosen (w, c)); with the `untrained` model's fit (`untrained_prior_fit`), its figure at its own pair
    is the floor a pair must reach (where c is chosen at all), on what `guard_floor_on` says."""
    fixed = settings.text_prior_new_items is not None
    on: FloorOn = "ndcg"
    floor = None
    if untrained is not None and untrained.fitted_new_items:
        on = guard_floor_on(settings, untrained)
        floor = untrained.on(on)[(untrained.weight, untrained.new_items)]
    return fit_text_prior(
        model, valid, settings.text_prior_grid, settings.eval_batch_size, device,
        new_items_grid=None if fixed else settings.text_prior_new_items_grid, min_new_targets=MIN_NEW_TARGETS,
        catalogue_share=settings.text_prior_new_items_share == "catalogue", new_items_floor=floor, floor_on=on,
    )  # fmt: skip


def guard_floor_on(settings: TrainSettings, untrained: PriorFit) -> FloorOn:
    """What `text_prior_new_items_guard` bounds, given the untrained model's fit: NDCG@10 over validation's
    new-item targets (`untrained`), the new items' share of the top-10 slots (`exposure`), or with
    `auto` the former where the untrained model's figure over those targets has a relative standard
    error (`PriorFit.ndcg10_new_se` over the figure) of at most `text_prior_new_items_guard_rse`, else
    the latter: with a few hundred targets that figure is too noisy a floor (seed 43 on food-kitchen's
    new-item split: 840 targets let through a pair that put new items at 0.87x the untrained model on
    test), with thousands it bounds the goal itself, where exposure can ask for more than it needs
    (docs/train.md, "One floor where validation can measure it")."""
    guard = settings.text_prior_new_items_guard
    if guard != "auto":
        return "exposure" if guard == "exposure" else "ndcg"
    return "ndcg" if untrained_rse(untrained) <= settings.text_prior_new_items_guard_rse else "exposure"


def untrained_rse(untrained: PriorFit) -> float:
    """The relative standard error of the untrained model's NDCG@10 over validation's new-item targets at
    its own (w, c): standard error over the figure; inf where the figure is 0 or not known."""
    key = (untrained.weight, untrained.new_items)
    figure, se = untrained.ndcg10_new[key], untrained.ndcg10_new_se.get(key, float("nan"))
    return se / figure if figure > 0 and se == se else float("inf")


def untrained_prior_fit(
    settings: TrainSettings,
    trained: Recommender,
    inputs: TrainInputs,
    valid: EvalSplit,
    device: torch.device | str,
) -> tuple[Recommender, PriorFit]:
    """The same model untrained, its text prior fitted on validation as the trained one's is (`prior_fit`):
    built from the run's seed with the trained model's config (a warm run's too: untrained is the cold
    start), the same items marked new, and its rows for new items fitted as after an epoch (`end_epoch`),
    so it scores as one epoch at a vanishing rate would. Its figure over the new-item targets is the
    floor of `text_prior_new_items_guard: untrained`. Returns the model (in eval mode, at its chosen
    (w, c)) and its fit. Costs one more fit of the prior (a full ranking of validation); the global RNG
    is reseeded before and after (what follows starts as it would have)."""
    set_seed(settings.seed, settings.deterministic)
    fresh = build_model(trained.config, inputs.catalog, inputs.tables).to(device)
    fresh.set_trained_items(inputs.data.item_counts("train"))
    fresh.end_epoch()
    fit = prior_fit(settings, fresh.eval(), valid, device)
    set_seed(settings.seed, settings.deterministic)
    return fresh, fit


def _report_short(data: SequenceData, split: EvalSplit, n: int, log: Any) -> dict[str, list[str]]:
    """Log the users whose sampled candidates are fewer than `n` (all their unseen items), per domain: a
    warning where the domain is larger than `n` (heavy users, crawlers), a detail line where it is not
    (every user is short there by construction: a small catalogue's six warnings a night that asked for
    nothing, in a new user's trial)."""
    short = data.short_candidate_users(split, n)
    for domain, users in short.items():
        d = data.catalog.domains.index(domain)
        small = int(data.catalog.sizes[d]) <= n
        (partial(log.info, extra=DETAIL) if small else log.warning)(
            "train: %s split: %d user(s) of domain %r (%d items) have fewer than %d unseen items there; their "
            "sampled candidates are all of them (e.g. %s); full ranking is unaffected",
            split.name, len(users), domain, int(data.catalog.sizes[d]), n, ", ".join(users[:5]),
        )  # fmt: skip
    return short


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def select_best(rows: list[dict], select_by: str) -> dict:
    """The leaderboard row with the highest validation NDCG@10 under `select_by` (full | sampled); a run
    without a finite figure (null, NaN or inf: a diverged run recorded before training checked for it)
    ranks below every run that has one; ties go to the earlier row."""
    key = "valid_full_ndcg10" if select_by == "full" else "valid_ndcg10"

    def value(r: dict) -> float:
        v = r.get(key)
        return v if v is not None and math.isfinite(v) else -1.0

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
    best validation NDCG@10 under `select_by` (full ranking; runs without a full figure rank last). A run
    already on the board (a skipped train records it again) keeps its row's place and `finished_at`: ties
    go to the earlier row, and a skip that moved it last handed a tie to a retrain finished before it (a
    new user's trial: the serving run switched, and was republished, on a night that trained nothing)."""
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
        previous = workspace.read_table(STAGE, "runs").to_pylist()
    # Runs whose folder was deleted drop out of the leaderboard.
    board = [
        r for r in previous if r["run_id"] == summary.run_id or RunDir(workspace, r["run_id"]).is_complete()
    ]
    if (at := next((i for i, r in enumerate(board) if r["run_id"] == summary.run_id), None)) is not None:
        board[at] = row | {"finished_at": board[at]["finished_at"]}
    else:
        board.append(row)
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

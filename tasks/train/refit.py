"""The refit (`train.refit`): once a run has chosen its epochs and the text prior's (w, c) on validation,
a fresh model is trained again along the path of the best weights on every user's history through the
validation item, and that model scores the test split and is what publish serves.

Why: leave-one-out keeps each user's last two items out of training (the validation target selects, the
test target measures), so the selected model never learns from the interactions nearest to what it
must predict, the ones that say most about a user's next item. Once the selection is made the
validation targets have done their job; training on them as well (the test target never) is the
train-then-refit-on-train+validation step of any model selection (e.g. scikit-learn's `refit=True`),
here with the epochs fixed by the selection instead of early stopping, which has no held-out split left.
Measured on food-kitchen (docs/train.md, "The refit"): test full-ranking NDCG@10 +9.9 % (three seeds).

The replayed path (`models.trainer.kept_rates`): the epochs the best weights went through, each at its
rate (under `lr_decay` the epochs no better than the best were undone and are left out). The fresh model
starts as the run did: from the run's seed (a cold run) or from the same earlier run (a warm run), from
the weights that run serves (its own refit where it has one). Items the cold-start evaluation holds out
stay without training interactions. `pop` is "refitted" by counting through the validation targets, so
its test row is measured as the models' are.

The selected weights stay in model.safetensors (validation figures, the quality gate's rescoring and
the next night's warm start read them: the refit has seen the validation targets); the refit's go to
refit.safetensors, which `RunDir.served` prefers. A crash during the refit leaves the selected weights
as they were; the rerun resumes the finished fit and refits again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bridgerec.models.base import Recommender
from bridgerec.models.data import SequenceData
from bridgerec.models.pop import Popularity
from bridgerec.models.registry import build_model
from bridgerec.models.trainer import FitState, kept_rates, set_seed, train_schedule
from bridgerec.models.warmstart import WarmStartError
from bridgerec.runtime.logs import DETAIL
from bridgerec.storage.runs import RunDir
from bridgerec.tasks.context import StageRun
from bridgerec.tasks.train.checkpoint import save_weights
from bridgerec.tasks.train.settings import TrainSettings
from bridgerec.tasks.train.warmstart import InitRecord, warm_plan

if TYPE_CHECKING:
    from bridgerec.tasks.train.inputs import TrainInputs

# The buffers of the text prior's (w, c), chosen on validation for the selected weights: the refit
# scores with the same ones.
PRIOR_BUFFERS = ("text_prior_weight", "text_prior_new_scale")


@dataclass
class Refitted:
    """The refit's model (in eval mode, weights saved), the data it trained on and its summary record."""

    model: Recommender
    data: SequenceData
    record: dict[str, Any]


def refit(
    run: StageRun[TrainSettings],
    run_dir: RunDir,
    selected: Recommender,
    inputs: TrainInputs,
    state: FitState,
    hashes: dict[str, str],
    device: torch.device,
) -> Refitted:
    """Train the refit of a finished run (`selected`: its best weights, prior fitted) and save it to
    refit.safetensors. A warm run starts its refit from the earlier run's served weights; where no epoch
    beat its init, that is the whole refit. Raises WarmStartError when a warm run's init can no longer be
    rebuilt (its earlier run's folder is gone): the caller then scores with the selected weights and
    removes a refit.safetensors an earlier attempt left."""
    settings, log = run.settings, run.log
    started = time.perf_counter()
    held = inputs.cold_eval.held.held if inputs.cold_eval.held is not None else None
    data = inputs.data.through_validation(held)
    counts = data.item_counts("train")
    if not selected.trainable:  # pop: its counts through the validation targets
        assert isinstance(selected, Popularity)
        model = build_model(selected.config, inputs.catalog).to(device)
        assert isinstance(model, Popularity)
        model.fit_counts(counts)
        save_weights(model, run_dir, run_dir.refit)
        return Refitted(model.eval(), data, {"epochs": 0, "counted": int(counts.sum())})
    init = InitRecord(**run_dir.read_config().get("init", {}))
    cfg = settings.fit_config(warm=init.init == "warm")
    rates = kept_rates(state, cfg)
    model = _fresh_model(run, selected, inputs, init, hashes, device)
    workers = settings.data_parallel.workers
    log.info(
        "train: refit through the validation targets: %d epochs at %s%s",
        len(rates), ", ".join(f"{r:g}" for r in rates) or "- (no epoch beat the warm init: the earlier run's refit)",
        f", data-parallel over {workers} workers" if workers > 1 and rates else "",
    )  # fmt: skip
    # An item is known where the refit trains on it: with no epoch, as the warm init had it.
    model.set_trained_items(counts if rates else inputs.data.item_counts("train"))
    losses: list[float] = []
    if not rates:
        model.set_serving(True)
    elif workers > 1:
        from bridgerec.tasks.train.distributed import DataParallelJob, launch_refit

        dp = settings.data_parallel
        job = DataParallelJob(
            settings=settings, workspace=str(run.workspace.root), run_id=run_dir.run_id,
            threads=max(1, int(dp.cpus_per_worker)), warm=init.init == "warm", init=init.model_dump(mode="json"),
            refit_rates=rates,
        )  # fmt: skip
        launch_refit(job, model)
        model.set_serving(True)  # the rows of items without interactions from the trained weights
    else:
        history = train_schedule(
            model,
            data,
            rates,
            cfg,
            device,
            inputs.profiles,
            log=lambda m: log.info("train: " + m, extra=DETAIL),
        )
        losses = [h["loss"] for h in history]
    selected_state = selected.state_dict()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in PRIOR_BUFFERS:
                buffer.copy_(selected_state[name])
    save_weights(model, run_dir, run_dir.refit)
    record = {
        "epochs": len(rates),
        "rates": rates,
        "loss": losses,  # per epoch (one process; a data-parallel refit's are in the workers' log)
        "workers": workers,
        "seconds": time.perf_counter() - started,
        "users": int((data.train_lengths >= 2).sum()),
    }
    log.info("train: refit done in %.1f s", record["seconds"])
    return Refitted(model.eval(), data, record)


def _fresh_model(
    run: StageRun[TrainSettings],
    selected: Recommender,
    inputs: TrainInputs,
    init: InitRecord,
    hashes: dict[str, str],
    device: torch.device,
) -> Recommender:
    """The model as the run started: built from the run's seed, then (a warm run) the same earlier run's
    weights remapped onto it, the ones it serves (its own refit's where it has one: they have seen the
    earlier validation targets, never a test target of tonight's); the text prior off while it trains."""
    settings = run.settings
    set_seed(settings.seed, settings.deterministic)
    model = build_model(selected.config, inputs.catalog, inputs.tables)
    if init.init == "warm" and init.warm_start_from:
        previous = RunDir(run.workspace, init.warm_start_from)
        if not previous.model.exists():
            raise WarmStartError(f"the warm init's run {init.warm_start_from} is gone")
        plan = warm_plan(model, previous, previous.read_config(), inputs.catalog, hashes, served=True)
        model.load_state_dict(plan.state, strict=True)
    if model.prior_dims:
        model.set_text_prior(0.0, selected.config.text_prior_new_items)
    return model.to(device)

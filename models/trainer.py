"""The training loop: Adam, early stopping on validation NDCG@10 (full ranking by default, `select_by`),
best weights kept, resumable.

Everything random (batch order, negatives) comes from a generator seeded with (seed, epoch), so a run
resumed after a crash continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from bridgerec.models.base import Recommender
from bridgerec.models.batch import Batch, cloze_mask
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import EvalSplit, SequenceData
from bridgerec.models.evaluate import evaluate
from bridgerec.models.metrics import ndcg
from bridgerec.models.objectives import draw_shared_negatives, sampling_probs
from bridgerec.models.optim import Optimizer
from bridgerec.runtime.errors import InputError
from bridgerec.runtime.progress import advance, progress_bar


class TrainingDiverged(InputError):
    """The training loss or the validation scores stopped being finite (NaN or inf): the model diverged,
    usually from a learning rate far too high. Training stops at that epoch and the run fails (it never
    reaches the leaderboard); the same settings diverge again, so it is not retried (exit code 2)."""


@dataclass
class FitConfig:
    """The training loop's settings (built by `TrainSettings.fit_config()`)."""

    lr: float
    weight_decay: float
    batch_size: int
    eval_batch_size: int
    epochs: int
    patience: int
    seed: int
    time_budget_s: float | None = None
    select_by: Literal["full", "sampled"] = "full"  # the validation NDCG@10 that selects the best epoch
    # Hidden-domain examples per eligible batch row and epoch (0 = off; a fraction is drawn with that
    # probability; see SequenceData.hidden_domain_examples).
    hide_domain: float = 0.0
    # How a batch's summed per-position loss is reduced (docs/train.md, "How positions are weighed"):
    # "batch": its mean, so every batch weighs the same (batches group users of similar length, so a
    # position of a short history weighs more than one of a long history); "global": over the epoch's
    # mean positions per batch, so every position weighs the same (as random batches give); "domain":
    # the sum over target domains of each one's mean (the authors' reduction).
    loss_norm: Literal["batch", "global", "domain"] = "batch"


@dataclass
class FitState:
    """What a checkpoint holds besides the weights; also the training history."""

    epoch: int = 0  # epochs finished
    best_epoch: int = 0
    best_valid: float = -math.inf
    bad_epochs: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # one row per epoch


@dataclass
class Profiles:
    """Profile vectors by user_idx; users without one have has=False and a zero row."""

    vectors: torch.Tensor  # [U, Dp]
    has: torch.Tensor  # [U] bool


def train_epoch(
    model: Recommender,
    data: SequenceData,
    optimizer: Optimizer,
    cfg: FitConfig,
    epoch: int,
    profiles: Profiles | None,
    device: torch.device,
    on_batch: Callable[[float], None] | None = None,
) -> dict[str, float]:
    """One pass over every user's training prefix; returns mean losses."""
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    totals: dict[str, float] = {}
    n = 0
    spec = model.config
    probs = None
    if spec.objective == "sampled_softmax":
        counts = torch.from_numpy(data.item_counts("train"))
        probs = sampling_probs(counts, model.sizes, [int(o) for o in data.catalog.offsets], spec.sampling)
    position_norm = None
    if cfg.loss_norm == "global":
        n_batches = math.ceil(data.n_users / cfg.batch_size)
        position_norm = epoch_positions(data.train_lengths, spec) / n_batches
    for users in data.train_batches(cfg.batch_size, gen):
        prefix = data.train_prefix(users)  # [B, L+1]
        if prefix.shape[1] < 2:
            continue  # users with a one-item prefix have no training target
        batch = training_batch(data, prefix, users, spec, cfg, gen, probs, position_norm)
        if profiles is not None:
            batch.profile = profiles.vectors[batch.users]
            batch.has_profile = profiles.has[batch.users]
        batch = batch.to(device)
        loss, parts = model.loss(batch)
        if not torch.isfinite(loss.detach()):
            raise TrainingDiverged(
                f"{model.name} diverged in epoch {epoch}: the training loss is {float(loss.detach())} at batch "
                f"{n + 1}; lower train.lr (now {cfg.lr:g}) or check the inputs"
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        totals["loss"] = totals.get("loss", 0.0) + value
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
        n += 1
        if on_batch is not None:
            on_batch(value)
    return {k: v / max(n, 1) for k, v in totals.items()}


def training_batch(
    data: SequenceData,
    prefix: torch.Tensor,
    users: torch.Tensor,
    spec: ModelConfig,
    cfg: FitConfig,
    gen: torch.Generator,
    probs: list[torch.Tensor] | None,
    position_norm: float | None,
) -> Batch:
    """One training batch from the users' prefixes [B, L+1]: the hidden-domain examples appended
    (`cfg.hide_domain`), the cloze mask (task cloze), one negative per target (two with per-thread bce
    negatives) and the shared negatives (`probs`: sampled_softmax), drawn from `gen` in that order."""
    if spec.task == "cloze":
        prefix = prefix[:, -spec.max_len :]  # the inputs are the whole prefix: max_len items at most
    history = prefix
    extra = 0
    if cfg.hide_domain > 0:
        src, hidden = data.hidden_domain_examples(prefix, cfg.hide_domain, gen)
        extra = len(src)
        prefix, users, history = (
            torch.cat([prefix, hidden]),
            torch.cat([users, users[src]]),
            torch.cat([history, history[src]]),  # negatives still avoid the hidden items
        )
    cloze = cloze_mask(prefix, spec.mask_prob, gen, extra) if spec.task == "cloze" else None
    batch = Batch(
        prefix, prefix[:0], users, hidden_domain_rows=extra, position_norm=position_norm,
        domain_means=cfg.loss_norm == "domain", task=spec.task, cloze=cloze,
    )  # fmt: skip
    targets = batch.targets
    batch.negatives = data.sample_negatives(targets, history, gen)  # the shape of targets
    if spec.per_thread_negatives:
        batch.mixed_negatives = data.sample_negatives(targets, history, gen, domain_of=batch.inputs)
    if probs is not None:
        batch.shared = draw_shared_negatives(probs, spec.negatives, gen)
    return batch


def epoch_positions(train_lengths: torch.Tensor, spec: ModelConfig) -> float:
    """The training positions of an epoch's users' own prefixes (train_lengths [U]: prefix lengths
    including the first input), by task: next, every position but the first; last, one per user with
    two items or more; cloze, the last item and the expected share `mask_prob` of the others."""
    lengths = train_lengths.double()
    if spec.task == "last":
        return float((lengths >= 2).sum())
    if spec.task == "cloze":
        kept = lengths.clamp(max=spec.max_len)
        return float((1 + spec.mask_prob * (kept - 1)).sum())
    return float((lengths - 1).clamp(min=0).sum())


def fit(
    model: Recommender,
    data: SequenceData,
    valid: EvalSplit,
    cfg: FitConfig,
    device: torch.device,
    profiles: Profiles | None = None,
    state: FitState | None = None,
    optimizer_state: dict | None = None,
    on_epoch: Callable[[Recommender, Optimizer, FitState, bool], None] | None = None,
    log: Callable[[str], None] = print,
) -> FitState:
    """Train until patience, `epochs` or the time budget runs out. `on_epoch(model, opt, state, is_best)`
    persists the checkpoint (and the best weights); `state`/`optimizer_state` resume a run."""
    optimizer = Optimizer(model, cfg.lr, cfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    state = state or FitState()
    n_batches = math.ceil(data.n_users / cfg.batch_size)
    remaining = cfg.epochs - state.epoch
    with progress_bar(f"train {model.name}", total=remaining * n_batches, unit="batches") as bar:
        while state.epoch < cfg.epochs and state.bad_epochs < cfg.patience:
            if cfg.time_budget_s is not None and state.elapsed_s >= cfg.time_budget_s:
                log(f"time budget of {cfg.time_budget_s:.0f} s reached after {state.epoch} epochs")
                break
            epoch = state.epoch + 1
            started = time.perf_counter()
            running = {"sum": 0.0, "n": 0}

            def on_batch(loss: float, epoch: int = epoch, running: dict = running) -> None:
                running["sum"] += loss
                running["n"] += 1
                advance(bar, 1, f"train {model.name} epoch {epoch} loss {running['sum'] / running['n']:.4f}")

            losses = train_epoch(model, data, optimizer, cfg, epoch, profiles, device, on_batch)
            model.end_epoch()
            train_s = time.perf_counter() - started
            score, scores = validate(model, valid, cfg, device, epoch)
            eval_s = time.perf_counter() - started - train_s
            is_best = score > state.best_valid
            if is_best:
                state.best_valid, state.best_epoch, state.bad_epochs = score, epoch, 0
            else:
                state.bad_epochs += 1
            state.epoch = epoch
            state.elapsed_s += train_s + eval_s
            state.history.append(
                {
                    "epoch": epoch,
                    **losses,
                    **scores,
                    "train_seconds": train_s,
                    "eval_seconds": eval_s,
                }
            )
            log(
                f"epoch {epoch}: loss {losses.get('loss', float('nan')):.4f} valid ndcg@10 ({cfg.select_by}) "
                f"{score:.4f} "
                f"({'best' if is_best else f'best {state.best_valid:.4f} @ {state.best_epoch}'}) "
                f"train {train_s:.1f} s eval {eval_s:.1f} s"
            )
            if on_epoch is not None:
                on_epoch(model, optimizer, state, is_best)
    return state


def validate(
    model: Recommender, valid: EvalSplit, cfg: FitConfig, device: torch.device, epoch: int = 0
) -> tuple[float, dict[str, float]]:
    """(the selection score: validation NDCG@10 under `cfg.select_by`, the history row's figures).

    Raises TrainingDiverged when a validation score or figure is not finite (`epoch` names it; 0: the
    initial weights)."""
    ranks = evaluate(model, valid, cfg.eval_batch_size, full=cfg.select_by == "full", device=device)
    row = {"valid_ndcg@10": ndcg(ranks.sampled, 10), "valid_hr@10": float((ranks.sampled < 10).mean())}
    if ranks.full is not None:
        row |= {
            "valid_full_ndcg@10": ndcg(ranks.full, 10),
            "valid_full_hr@10": float((ranks.full < 10).mean()),
        }
    score = row["valid_full_ndcg@10"] if cfg.select_by == "full" else row["valid_ndcg@10"]
    where = f"in epoch {epoch}" if epoch else "before training (the initial weights)"
    if ranks.nonfinite:
        raise TrainingDiverged(
            f"{model.name} diverged {where}: its validation scores are NaN or inf for {ranks.nonfinite} of "
            f"{len(ranks.sampled)} users; lower train.lr (now {cfg.lr:g}) or check the inputs"
        )
    bad = {k: v for k, v in row.items() if not math.isfinite(v)}
    if bad:
        raise TrainingDiverged(f"{model.name}: validation figures {where} are not finite: {bad}")
    return score, row


def score_init(model: Recommender, valid: EvalSplit, cfg: FitConfig, device: torch.device) -> FitState:
    """The loop state before a warm run's first epoch: the warm init, scored as epoch 0, is the best."""
    started = time.perf_counter()
    score, row = validate(model, valid, cfg, device)
    seconds = time.perf_counter() - started
    history = [{"epoch": 0, **row, "train_seconds": 0.0, "eval_seconds": seconds}]
    return FitState(best_valid=score, elapsed_s=seconds, history=history)


def set_seed(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)

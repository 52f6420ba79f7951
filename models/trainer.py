"""The training loop: Adam, early stopping on validation NDCG@10 (full ranking by default, `select_by`),
best weights kept, the learning rate decayed on a plateau from the best weights (`lr_decay`), resumable.

Everything random (batch order, negatives) comes from a generator seeded with (seed, epoch), so a run
resumed after a crash continues exactly as the uninterrupted run would have.

The refit (`kept_rates`, `train_schedule`): once a run has chosen its epochs on validation, a fresh model
can retrain on the prefixes through each user's validation target (`SequenceData.through_validation`)
along the path the best weights took (the kept epochs and their rates), with no validation and no early
stopping: the selection is the first run's, the test target is still never a training target.

Data-parallel training (`Ranks`, torch DistributedDataParallel): every rank draws the whole global batch
from the same generator, as one process would, and trains on its contiguous share of the rows; each rank's
loss is normalised by the global batch's positions over the world size, so DDP's mean of the gradients is
the one-process gradient of the global batch (exact for the recommendation loss under `loss_norm` global or
batch; the auxiliary contrastive terms see each rank's share). Rank 0 validates and decides early
stopping for all ranks.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from bridgerec.models.base import Recommender
from bridgerec.models.batch import Batch, cloze_mask
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import EvalSplit, SequenceData
from bridgerec.models.evaluate import evaluate
from bridgerec.models.metrics import ndcg
from bridgerec.models.objectives import draw_shared_negatives, sampling_probs
from bridgerec.models.optim import Optimizer
from bridgerec.runtime.errors import InputError
from bridgerec.runtime.progress import advance, finish, progress_bar

T = TypeVar("T")


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
    # Learning rate on a plateau: after an epoch no better than the best, training goes on from the best
    # epoch's weights and Adam moments at `lr_decay` times the learning rate (1 = off: the epoch's
    # weights, the same rate). Keras's ReduceLROnPlateau (patience 0) with its best weights restored.
    lr_decay: float = 1.0
    # Under lr_decay, a plateau that would take the rate below `lr_min` ends the run there instead, on
    # the best epoch's weights (fairseq's --stop-min-lr); 0 = never (patience and `epochs` end it).
    lr_min: float = 0.0
    # What progress bars and error messages call the model: the preset trained (`llm4cdsr-hybrid`);
    # empty: the model's architecture name (`llm4cdsr`)
    label: str = ""


@dataclass
class FitState:
    """What a checkpoint holds besides the weights; also the training history."""

    epoch: int = 0  # epochs finished
    best_epoch: int = 0
    best_valid: float = -math.inf
    bad_epochs: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    lr_scale: float = 1.0  # the learning rate now, as a multiple of FitConfig.lr (lr_decay's product)
    stopped: str = ""  # why the run ended before patience or `epochs` did ("lr_min"), "" while it may go on


@dataclass
class _Snapshot:
    """The best epoch's weights and optimizer state, in memory, for `lr_decay` to go back to."""

    model: dict[str, torch.Tensor]
    optimizer: list[dict[str, Any]]

    @classmethod
    def take(cls, model: nn.Module, optimizer: Optimizer) -> _Snapshot:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(weights, copy.deepcopy(optimizer.state_dict()))

    def restore(self, model: nn.Module, optimizer: Optimizer) -> None:
        model.load_state_dict(self.model)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))


@dataclass
class _LrOnPlateau:
    """`lr_decay` across a run: the best epoch's snapshot, and after an epoch no better than it the way
    back to it at `lr_decay` times the rate (`FitState.lr_scale` keeps the product for a resume)."""

    cfg: FitConfig
    best: _Snapshot | None = None

    @classmethod
    def start(cls, cfg: FitConfig, model: nn.Module, optimizer: Optimizer, state: FitState) -> _LrOnPlateau:
        """Set the run's current rate. Under lr_decay a resumed run's checkpoint holds the best weights
        (after a worse epoch they were restored before it was written), and a warm start's epoch 0 is its
        init: either way the state now is the best so far."""
        optimizer.set_lr(cfg.lr * state.lr_scale)
        on = cfg.lr_decay < 1 and bool(state.history)
        return cls(cfg, _Snapshot.take(model, optimizer) if on else None)

    def epoch_end(self, model: nn.Module, optimizer: Optimizer, state: FitState, is_best: bool) -> str:
        """Snapshot a best epoch; after a worse one restore the best and lower the rate. Returns what the
        epoch's log line adds ("" when nothing changed)."""
        if self.cfg.lr_decay >= 1:
            return ""
        if is_best:
            self.best = _Snapshot.take(model, optimizer)
            return ""
        if self.best is not None:
            self.best.restore(model, optimizer)
        lr = self.cfg.lr * state.lr_scale * self.cfg.lr_decay
        if lr < self.cfg.lr_min:
            state.stopped = "lr_min"
            return f"; stopped: the next rate, {lr:.3g}, would be under lr_min {self.cfg.lr_min:g}"
        state.lr_scale *= self.cfg.lr_decay
        optimizer.set_lr(lr)
        return f"; on from epoch {state.best_epoch}'s weights at lr {lr:.3g}"


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel group: rank r of `world` trains rows [r/world, (r+1)/world)
    of every global batch; `ddp` is the DistributedDataParallel wrapper the training step goes through."""

    rank: int = 0
    world: int = 1
    ddp: nn.Module | None = None

    @property
    def leader(self) -> bool:
        return self.rank == 0


ONE_PROCESS = Ranks()


class LossStep(nn.Module):
    """`model.loss(batch)` as a module's forward, so DistributedDataParallel can wrap it: DDP syncs the
    gradients of the parameters a forward used."""

    def __init__(self, model: Recommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.loss(batch)


def rank_share(batch: Batch, ranks: Ranks) -> Batch:
    """This rank's contiguous rows of a global batch (hidden-domain rows stay last), its loss normalised
    by the global batch's positions / world size (or the epoch's per-batch norm / world size)."""
    if ranks.world == 1:
        return batch
    rows = batch.prefix.shape[0]
    lo, hi = rows * ranks.rank // ranks.world, rows * (ranks.rank + 1) // ranks.world
    main = batch.main_rows
    norm = batch.position_norm or float((batch.targets > 0).sum())

    def part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[lo:hi]

    share = Batch(
        batch.prefix[lo:hi],
        batch.negatives[lo:hi],
        batch.users[lo:hi],
        profile=part(batch.profile),
        has_profile=part(batch.has_profile),
        shared=batch.shared,
        mixed_negatives=part(batch.mixed_negatives),
        hidden_domain_rows=max(0, hi - max(lo, main)),
        position_norm=norm / ranks.world,
        domain_means=batch.domain_means,
        task=batch.task,
        cloze=part(batch.cloze),
    )
    return share


@dataclass
class Profiles:
    """Profile vectors by user_idx; users without one have has=False and a zero row."""

    vectors: torch.Tensor  # [U, Dp]
    has: torch.Tensor  # [U] bool


def _called(model: Recommender, cfg: FitConfig) -> str:
    """What the progress bars and errors call the model: the preset (`cfg.label`), else its architecture."""
    return cfg.label or model.name


def train_epoch(
    model: Recommender,
    data: SequenceData,
    optimizer: Optimizer,
    cfg: FitConfig,
    epoch: int,
    profiles: Profiles | None,
    device: torch.device,
    on_batch: Callable[[float], None] | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> dict[str, float]:
    """One pass over every user's training prefix (this rank's share of each batch); returns mean losses
    (over all ranks)."""
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
        batch = rank_share(batch.to(device), ranks)
        loss, parts = model.loss(batch) if ranks.ddp is None else ranks.ddp(batch)
        # The global batch's loss, so every rank sees a non-finite loss together and stops together;
        # checked before the step: the weights stay those of the last good batch.
        value = _mean_over_ranks(float(loss.detach()), ranks)
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"{_called(model, cfg)} diverged in epoch {epoch}: the training loss is {value} at batch {n + 1}; "
                f"lower train.lr (now {cfg.lr:g}) or check the inputs"
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
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


def _mean_over_ranks(value: float, ranks: Ranks) -> float:
    """A rank's loss (its rows' sum over the global norm / world) -> the global batch's loss."""
    if ranks.world == 1:
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / ranks.world


def _from_leader(value: T, ranks: Ranks) -> T:
    """Rank 0's `value` on every rank (a no-op in one process)."""
    if ranks.world == 1:
        return value
    import torch.distributed as dist

    box: list[object] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def fit(
    model: Recommender,
    data: SequenceData,
    valid: EvalSplit,
    cfg: FitConfig,
    device: torch.device,
    profiles: Profiles | None = None,
    state: FitState | None = None,
    optimizer_state: list[dict[str, Any]] | None = None,
    on_epoch: Callable[[Recommender, Optimizer, FitState, bool], None] | None = None,
    log: Callable[[str], None] = print,
    ranks: Ranks = ONE_PROCESS,
) -> FitState:
    """Train until patience, `epochs` or the time budget runs out. `on_epoch(model, opt, state, is_best)`
    persists the checkpoint (and the best weights); `state`/`optimizer_state` resume a run. With `ranks`,
    this process is one rank of a data-parallel group (`on_epoch` and logging belong on rank 0)."""
    model.set_serving(False)  # the epochs' own fits score new items until training is over
    try:
        return _fit(model, data, valid, cfg, device, profiles, state, optimizer_state, on_epoch, log, ranks)
    finally:
        model.set_serving(True)


def _fit(
    model: Recommender,
    data: SequenceData,
    valid: EvalSplit,
    cfg: FitConfig,
    device: torch.device,
    profiles: Profiles | None,
    state: FitState | None,
    optimizer_state: list[dict[str, Any]] | None,
    on_epoch: Callable[[Recommender, Optimizer, FitState, bool], None] | None,
    log: Callable[[str], None],
    ranks: Ranks,
) -> FitState:
    """`fit`'s loop."""
    optimizer = Optimizer(model, cfg.lr, cfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    state = state or FitState()
    plateau = _LrOnPlateau.start(cfg, model, optimizer, state)
    n_batches = math.ceil(data.n_users / cfg.batch_size)
    remaining = cfg.epochs - state.epoch
    with progress_bar(f"train {_called(model, cfg)}", total=remaining * n_batches, unit="batches") as bar:
        while state.epoch < cfg.epochs and state.bad_epochs < cfg.patience and not state.stopped:
            if cfg.time_budget_s is not None and state.elapsed_s >= cfg.time_budget_s:
                log(f"time budget of {cfg.time_budget_s:.0f} s reached after {state.epoch} epochs")
                break
            epoch = state.epoch + 1
            started = time.perf_counter()
            running = {"sum": 0.0, "n": 0}

            def on_batch(loss: float, epoch: int = epoch, running: dict[str, float] = running) -> None:
                running["sum"] += loss
                running["n"] += 1
                # The bar counts up to the epoch cap (its ETA is an upper bound): early stopping ends it sooner.
                label = (
                    f"train {_called(model, cfg)} epoch {epoch} of at most {cfg.epochs}, "
                    f"loss {running['sum'] / running['n']:.4f}"
                )
                advance(bar, 1, label + (f", best valid {state.best_valid:.4f}" if state.history else ""))

            losses = train_epoch(model, data, optimizer, cfg, epoch, profiles, device, on_batch, ranks)
            model.end_epoch()
            train_s = time.perf_counter() - started
            # Rank 0 validates; every rank takes its score and clock, so all stop at the same epoch.
            score, scores = _from_leader(
                validate(model, valid, cfg, device, epoch) if ranks.leader else (0.0, {}), ranks
            )
            eval_s = time.perf_counter() - started - train_s
            is_best = score > state.best_valid
            if is_best:
                state.best_valid, state.best_epoch, state.bad_epochs = score, epoch, 0
            else:
                state.bad_epochs += 1
            state.epoch = epoch
            state.elapsed_s = _from_leader(state.elapsed_s + train_s + eval_s, ranks)
            state.history.append(
                {
                    "epoch": epoch,
                    **losses,
                    **scores,
                    "lr": cfg.lr * state.lr_scale,
                    "train_seconds": train_s,
                    "eval_seconds": eval_s,
                }
            )
            advance(  # the bar says the new best at once (it was relabelled only by the next epoch's batches)
                bar, 0, f"train {_called(model, cfg)} epoch {epoch} of at most {cfg.epochs} validated, "
                f"best valid {state.best_valid:.4f} (epoch {state.best_epoch})",
            )  # fmt: skip
            decayed = plateau.epoch_end(model, optimizer, state, is_best)  # before the checkpoint keeps it
            if on_epoch is not None:  # the checkpoint first: a logged epoch is a kept epoch
                on_epoch(model, optimizer, state, is_best)
            log(
                f"epoch {epoch}: loss {losses.get('loss', float('nan')):.4f} valid ndcg@10 ({cfg.select_by}) "
                f"{score:.4f} "
                f"({'best' if is_best else f'best {state.best_valid:.4f} @ {state.best_epoch}'}) "
                f"train {train_s:.1f} s eval {eval_s:.1f} s{decayed}"
            )
        finish(bar)  # stopped early: the bar ends full, at the batches trained
    return state


def kept_rates(state: FitState, cfg: FitConfig) -> list[float]:
    """The learning rate of each epoch the best weights went through, in order: what `train_schedule`
    replays. An epoch counts when it was the best so far (its weights went on); one that was not counts
    only at a constant rate (`lr_decay` 1: training went on from its weights), not under `lr_decay` (the
    best weights were restored after it); none after the best epoch. A warm run's epoch 0 (its init) is
    the first best and no epoch; [] when the init was never beaten."""
    key = "valid_full_ndcg@10" if cfg.select_by == "full" else "valid_ndcg@10"
    best, rates = -math.inf, []
    for row in state.history:
        epoch, score = row["epoch"], row.get(key, -math.inf)
        if epoch > state.best_epoch:
            break
        better = score > best
        best = max(best, score)
        if epoch >= 1 and (better or cfg.lr_decay >= 1):
            rates.append(float(row.get("lr", cfg.lr)))
    return rates


def train_schedule(
    model: Recommender,
    data: SequenceData,
    rates: list[float],
    cfg: FitConfig,
    device: torch.device,
    profiles: Profiles | None = None,
    log: Callable[[str], None] = print,
    ranks: Ranks = ONE_PROCESS,
) -> list[dict[str, float]]:
    """Train one epoch per rate in `rates` (fresh Adam, each epoch at its rate, the ID-row fits after every
    epoch as in `fit`), with no validation: the refit. Epoch e draws its batches and negatives from the
    same seeded generator as epoch e of `fit`; with `ranks`, this process trains its share of each global
    batch as in `fit`. Returns each epoch's mean losses."""
    optimizer = Optimizer(model, cfg.lr, cfg.weight_decay)
    n_batches = math.ceil(data.n_users / cfg.batch_size)
    history: list[dict[str, float]] = []
    model.set_serving(False)
    try:
        with progress_bar(
            f"refit {_called(model, cfg)}", total=len(rates) * n_batches, unit="batches"
        ) as bar:
            for epoch, lr in enumerate(rates, 1):
                optimizer.set_lr(lr)
                started = time.perf_counter()
                label = f"refit {_called(model, cfg)} epoch {epoch}/{len(rates)}"

                def on_batch(_: float, label: str = label) -> None:
                    advance(bar, 1, label)

                losses = train_epoch(model, data, optimizer, cfg, epoch, profiles, device, on_batch, ranks)
                model.end_epoch()
                history.append(losses | {"lr": lr, "train_seconds": time.perf_counter() - started})
                log(
                    f"refit epoch {epoch}/{len(rates)}: loss {losses.get('loss', float('nan')):.4f} at lr {lr:g}"
                )
            finish(bar)
    finally:
        model.set_serving(True)
    return history


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
            f"{_called(model, cfg)} diverged {where}: its validation scores are NaN or inf for {ranks.nonfinite} of "
            f"{len(ranks.sampled)} users; lower train.lr (now {cfg.lr:g}) or check the inputs"
        )
    bad = {k: v for k, v in row.items() if not math.isfinite(v)}
    if bad:
        raise TrainingDiverged(f"{_called(model, cfg)}: validation figures {where} are not finite: {bad}")
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

"""Settings of the train stage (section `train` of the config).

`model` names a preset (an architecture plus the switches that define it, see `MODEL_PRESETS`); the
other fields are the hyper-parameters, shared by every model. Defaults follow the authors' Amazon
settings (hidden 128, 2 layers, 1 head, max_len 200, Adam 1e-3, batch 128, patience 20) except where a
measurement on food-kitchen chose otherwise (docs/train.md, "Benchmark"): the rate cut to a fifth from
the best epoch's weights on a plateau, once, and the next plateau ends the run (`lr_decay` 0.2,
`lr_min` 1e-4; theirs: a constant rate until patience runs out), new items' text similarity weighing
at least 1.25x (`text_prior_new_items_grid`), dropout 0.2 (theirs 0.5), the sampled softmax with 2,048
shared negatives (theirs: BCE), causal attention (theirs leaks the target),
a learned start state for a domain the user has no item of yet (theirs: none), and one hidden-domain
training example per user and epoch (`hide_domain: 1`, theirs: none) for users who never shopped in a
domain. The block layout is theirs (SASRec.pytorch's), measured better than the standard pre-LN one
here, and every training position weighs the same (`loss_norm: global`, as their random batches give).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bridgerec.models.config import (
    Architecture,
    BceNegatives,
    BlockLayout,
    Fusion,
    ModelConfig,
    Objective,
    Positions,
    Sampling,
    Task,
    WeightInit,
)
from bridgerec.storage.workspace import StageSettings

if TYPE_CHECKING:  # the training loop's module imports torch: not needed to read the settings
    from bridgerec.models.trainer import FitConfig

# name -> (architecture, switches forced by the preset). A preset's switches override the fields below.
MODEL_PRESETS: dict[str, tuple[Architecture, dict[str, Any]]] = {
    # The paper's model: adapted global LLM table (mixed thread) + frozen local tables (domain threads).
    "llm4cdsr": ("llm4cdsr", {}),
    # Ours: trainable item-ID embeddings added to the LLM embeddings in every thread.
    "llm4cdsr-hybrid": ("llm4cdsr", {"id_embeddings": True}),
    # Ablations of the paper.
    "llm4cdsr-noprofile": ("llm4cdsr", {"beta": 0.0}),
    "llm4cdsr-llmonly": ("llm4cdsr", {"alpha": 0.0, "beta": 0.0}),
    # Baselines: SASRec with item-ID embeddings on the mixed sequence, and one SASRec per domain.
    "sasrec": ("sasrec", {}),
    "sasrec-domain": ("sasrec_domain", {}),
    # The floor: items of the target's domain by their interaction count (no training).
    "pop": ("pop", {}),
}


class ColdStartSettings(BaseModel):
    """The two cold-start evaluations (docs/train.md, "Cold start"), reported beside the standard one."""

    model_config = ConfigDict(extra="forbid")
    new_items: bool = Field(
        default=False,
        description=(
            "Hold out new_items_fraction of each domain's items (latest first appearance where timestamps "
            "exist, seeded random otherwise), remove every interaction with them from training and "
            "validation, and score the test targets that are held-out items against the whole domain. "
            "Changes what the run trains on (a run of its own, always from a random init)."
        ),
    )
    new_items_fraction: float = Field(
        default=0.05, gt=0.0, lt=1.0, description="Share of each domain's items held out as new items."
    )
    new_items_in_validation: bool = Field(
        default=False,
        description=(
            "With new_items: keep a held-out item where it is a user's validation target (removed from "
            "training only), so validation sees new items as targets in the proportion test does and "
            "what is chosen on validation (the text prior's c) can see them; off: the held-out items are "
            "only ever test targets (the issue #28 protocol)."
        ),
    )
    untouched_domain: bool = Field(
        default=False,
        description=(
            "Also score the test target of every user whose history spans two domains with every item of "
            "the target's domain hidden from the input (a domain the user never shopped in). Evaluation only."
        ),
    )


class DataParallelSettings(BaseModel):
    """Data-parallel training: DistributedDataParallel over `workers` processes (tasks/train/distributed.py)."""

    model_config = ConfigDict(extra="forbid")
    workers: int = Field(
        default=1,
        ge=1,
        description="Training processes; 1 = one process (no torch.distributed). Each trains a share of every "
        "batch of `batch_size` users (the global batch stays the same, so the run is the same run).",
    )
    launcher: Literal["ray", "torchrun"] = Field(
        default="ray",
        description="ray: Ray Train's TorchTrainer, on the cluster of runtime.ray.address when "
        "runtime.runner is ray, else on a local Ray it starts (the address is only used by the ray runner); "
        "torchrun: worker processes on this machine, without Ray.",
    )
    cpus_per_worker: float = Field(
        default=1.0,
        gt=0,
        description="CPUs each data-parallel worker reserves under Ray Train (a GPU each on GPU nodes), and "
        "its torch threads under either launcher (train.threads and runtime.threads are not used then).",
    )


# The settings of the text prior's scale on new items (ignored together where no item is "new").
NEW_ITEMS = frozenset(
    {
        "text_prior_new_items",
        "text_prior_new_items_grid",
        "text_prior_new_items_share",
        "text_prior_new_items_guard",
        "text_prior_new_items_guard_rse",
    }
)
MIN_NEW_TARGETS = 100  # validation targets that are new items, at least, for c to be chosen on them


class TrainSettings(StageSettings):
    model_config = ConfigDict(extra="forbid")
    # The run id (storage.workspace.StageSettings): these change how fast a run goes (threads, device,
    # eval_batch_size) or how it starts (warm from an earlier run's weights, or at random: recorded in the
    # run's summary, `init`), not which run it is; a cold retrain of the same inputs is `--force`.
    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"threads", "device", "eval_batch_size", "warm_start", "warm_start_epochs", "data_parallel"}
    )
    # Switches added after runs existed -> the value those runs had: at it, the switch is left out of the
    # run id, so the earlier run ids stay valid (a warm start or skip still finds them).
    hashed_since: ClassVar[Mapping[str, Any]] = {
        "cold_start": ColdStartSettings().model_dump(mode="json"),
        "id_dropout": 0.0,
        "hide_domain": 0.0,
        "block": "pre_ln",
        "loss_norm": "batch",
        "positions": "from_end",
        "weight_init": "torch",
        "task": "next",
        "id_text_fit": False,
        "id_text_knn": 0,
        "item_bias": False,
        "adapter_per_domain": False,
        "fusion": "add",
        "semantic_dims": 64,
        "mask_prob": 0.2,
        "text_prior": False,
        "text_prior_grid": [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
        "text_prior_new_items": 1.0,
        "text_prior_new_items_grid": [1.0],
        "text_prior_new_items_share": "validation",
        "text_prior_new_items_guard": "none",
        "text_prior_decay": 1.0,
        "lr_decay": 1.0,
        "lr_min": 0.0,
        "refit": False,
    }

    def ignored_fields(self) -> set[str]:
        """Switches the chosen model does not use (left out of the run id): `domain_start` outside
        LLM4CDSR, `hide_domain` without a mixed thread, `bce_negatives` unless bce with LLM4CDSR,
        `id_text_fit` without ID embeddings, `lr_min` without `lr_decay`."""
        ignored = set() if self.architecture == "llm4cdsr" else {"domain_start"}
        ignored |= set() if self.task == "cloze" else {"mask_prob"}
        ignored |= set() if self.fusion == "null_space" else {"semantic_dims"}
        ignored |= set() if self.id_embeddings else {"id_text_fit", "id_text_knn"}  # no ID rows
        ignored |= set() if self.id_text_fit else {"id_text_knn"}  # no map to replace
        ignored |= set() if self.lr_decay < 1 else {"lr_min"}  # the rate never drops
        ignored |= {"hide_domain"} if self.effective_hide_domain == 0 else set()
        if self.architecture != "llm4cdsr":
            ignored |= {"text_prior", "text_prior_grid", "text_prior_decay"} | NEW_ITEMS  # no LLM table
        elif not self.text_prior:
            ignored |= {"text_prior_grid", "text_prior_decay"} | NEW_ITEMS
        elif not self.id_embeddings:  # every item is scored by its text: none is "new"
            ignored |= NEW_ITEMS
        elif self.text_prior_new_items is not None:  # fixed: no grid, no choice of c
            ignored |= {
                "text_prior_new_items_grid",
                "text_prior_new_items_share",
                "text_prior_new_items_guard",
                "text_prior_new_items_guard_rse",
            }
        if self.text_prior_new_items_guard != "auto":  # the floor is fixed: nothing to decide it by
            ignored.add("text_prior_new_items_guard_rse")
        return ignored | (set() if self.bce_negatives_apply else {"bce_negatives"})

    model: str = Field(default="llm4cdsr-hybrid", description=f"One of: {', '.join(MODEL_PRESETS)}.")
    hidden: int = Field(default=128, ge=8, description="Hidden size of every thread.")
    layers: int = Field(default=2, ge=1, description="Transformer blocks of every thread.")
    heads: int = Field(default=1, ge=1, description="Attention heads of every block (divides hidden).")
    dropout: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="Dropout in every thread (the authors': 0.5; docs/train.md)."
    )
    max_len: int = Field(default=200, ge=2, description="Most recent items a thread sees.")
    causal: bool = Field(
        default=True,
        description=(
            "Causal attention mask. Off = bidirectional, as the authors' code: with a loss at every position "
            "each position then sees its own target (docs/train.md)."
        ),
    )
    block: BlockLayout = Field(
        default="sasrec",
        description=(
            "Transformer block layout: pre_ln (standard pre-LayerNorm, keys = real items) | sasrec "
            "(SASRec.pytorch's and the LLM4CDSR authors' code: queries normalised, keys and values raw, "
            "inputs scaled by sqrt(width), max_len padding attended as keys); docs/train.md."
        ),
    )
    positions: Positions = Field(
        default="from_end",
        description=(
            "Where position embeddings count from: from_end (the latest item is position max_len, as "
            "SASRec.pytorch) | from_start (the first item is position 1, as the LLM4CDSR authors' code); "
            "docs/train.md."
        ),
    )
    objective: Objective = Field(
        default="sampled_softmax",
        description="Training loss: bce (the paper's) | sampled_softmax | ce (full softmax); docs/train.md.",
    )
    task: Task = Field(
        default="next",
        description=(
            "Training task: next (every position predicts the next item, causal) | last (only each prefix's "
            "last item is a target; attention may look both ways) | cloze (BERT4Rec's masked items: "
            "mask_prob of the items and always the last one masked and predicted, attention both ways); "
            "docs/train.md, Training tasks."
        ),
    )
    mask_prob: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="task cloze: the share of a prefix's items masked besides its last.",
    )
    weight_init: WeightInit = Field(
        default="torch",
        description=(
            "Sequence encoders' init: torch (torch's defaults, positions N(0, 0.02)) | xavier (Xavier-normal "
            "weights and position table, zero attention biases: the authors' code); docs/train.md."
        ),
    )
    bce_negatives: BceNegatives = Field(
        default="per_thread",
        description=(
            "bce with llm4cdsr: per_thread (the mixed thread gets a negative of its own, from the domain of "
            "the position's input item, the domain thread one from the target's: the authors' code, "
            "measured better) | fused (one negative of the target's domain, scored by every thread); "
            "docs/train.md."
        ),
    )
    negatives: int = Field(
        default=2048,
        ge=1,
        description=(
            "sampled_softmax: negatives per domain per batch, shared by the batch (2,048 since 2026-12-04: "
            "+2.5 % full-ranking validation over 1,024 for 1.2x a training step, 1.4x an epoch; docs/train.md)."
        ),
    )
    sampling: Sampling = Field(
        default="popularity", description="sampled_softmax: draw negatives uniform | by popularity (logQ)."
    )
    select_by: Literal["full", "sampled"] = Field(
        default="full",
        description="Validation NDCG@10 that early stopping and the best run use: full ranking or sampled "
        "(sampled whenever full_ranking is off).",
    )
    adapter_init: Literal["xavier", "torch"] = Field(
        default="xavier",
        description="LLM4CDSR adapter init: Xavier-normal weights, zero biases | torch default.",
    )
    fusion: Fusion = Field(
        default="add",
        description=(
            "LLM4CDSR: how an item's LLM embedding and ID rows combine: add (the paper's adapter, plus the ID "
            "rows in the hybrid) | null_space (AlphaFuse, SIGIR 2025: the frozen, whitened LLM embedding in "
            "semantic_dims coordinates, the ID rows in the others; needs id_embeddings); docs/train.md."
        ),
    )
    semantic_dims: int = Field(
        default=64,
        ge=1,
        description="fusion null_space: coordinates of the LLM embedding (the rest: ID rows).",
    )
    adapter_per_domain: bool = Field(
        default=False,
        description=(
            "LLM4CDSR: the mixed thread's item input adds a linear map of the item's own domain to the shared "
            "adapter's output (zero-initialised; after LLM-EDT's domain-specific adapters)."
        ),
    )
    id_embeddings: bool = Field(
        default=False, description="LLM4CDSR: add trainable item-ID embeddings to the LLM embeddings."
    )
    id_dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "LLM4CDSR with id_embeddings: in training, replace each item's ID row with this probability by "
            "a row predicted from its LLM embeddings (DropoutNet); items without training interactions "
            "(new items) are scored with the predicted row. 0 = off (docs/train.md, Cold start). Needs "
            "id_text_fit off (the default has it on: both set the ID-row generators)."
        ),
    )
    item_bias: bool = Field(
        default=False,
        description=(
            "LLM4CDSR with id_embeddings: a learned bias per item added to every score (its popularity whoever "
            "the user is); items without training interactions get their domain's mean (docs/train.md)."
        ),
    )
    id_text_fit: bool = Field(
        default=True,
        description=(
            "LLM4CDSR with id_embeddings: after every epoch, fit a map from each item's LLM embeddings to its "
            "learned ID rows over the items with training interactions (ridge regression, weighted by them); "
            "items without interactions (new items) are scored with the predicted rows. Training is "
            "unchanged. On by default since 2026-12-03: new items ranked 1.9x higher, warm items the same "
            "(one seed; docs/train.md, issue #28 benchmark). Ignored without id_embeddings."
        ),
    )
    id_text_knn: int = Field(
        default=10,
        ge=0,
        description=(
            "LLM4CDSR with id_text_fit: k > 0 scores an item without training interactions, once training "
            "is over, with the mean ID row of its k text-nearest items with them (cosine of the LLM "
            "embeddings, per thread) instead of the ridge map's prediction (which still scores it while "
            "training); 0 = the ridge map. 10 by default since 2026-12-04: test +0.5 % overall and new "
            "items 1.75x their text-only bound (1.45x) on food-kitchen's three seeds (docs/train.md)."
        ),
    )
    text_prior: bool = Field(
        default=True,
        description=(
            "LLM4CDSR: add w * cos(history text, item text) to every score, the cosine of the item's LLM "
            "embedding with the unit-norm sum of the history's (raw text similarity), w chosen after "
            "training on full-ranking validation NDCG@10 from text_prior_grid (0 = no prior). The user and "
            "item vectors get the LLM table's width more columns. On by default since 2026-12-03 "
            "(docs/train.md, issue #28 benchmark)."
        ),
    )
    text_prior_decay: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description=(
            "LLM4CDSR with text_prior: the history's text vector weighs the item k places before the "
            "latest by decay^k (1 = every item alike, the plain sum until 2026-12-05). 0.5 by default: "
            "test full ranking +1.2 % and +1.5 % on food-kitchen's two seeds measured, validation flat "
            "from 0.5 to 0.2 (docs/train.md, 'A recency-weighted history text')."
        ),
    )
    text_prior_grid: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
        min_length=1,
        description="The weights text_prior tries on validation (the scores' own scale: the learned "
        "part's dot products).",
    )
    text_prior_new_items: float | None = Field(
        default=None,
        ge=0.0,
        description=(
            "LLM4CDSR with text_prior and id_embeddings: the prior's weight on items without training "
            "interactions (new catalogue items) is w times this c, how much their text similarity to the "
            "history counts; 1 = as for every item. 'validation' (or null, the default): chosen with w on "
            f"full-ranking validation from text_prior_new_items_grid where at least {MIN_NEW_TARGETS} "
            "validation targets are such items (items first bought at a user's validation position), else "
            "the grid's smallest. A number fixes it: a policy for new items' exposure (docs/train.md, "
            "'New items against their exposure')."
        ),
    )
    text_prior_new_items_grid: list[float] = Field(
        default_factory=lambda: [1.25, 1.375, 1.5, 1.625, 1.75, 2.0],
        min_length=1,
        description=(
            "The values of c text_prior_new_items tries on validation. Its smallest is a floor: validation "
            "under-rates a boost for new items (docs/train.md: on food-kitchen it chose 1 or 1.1 where test "
            "gained from 1.25), so the default grid starts at 1.25 (since 2026-12-04; before: 1 to 2; "
            "1.375 added that evening, 1.625 and 1.75 on 2026-12-06: steps for text_prior_new_items_guard)."
        ),
    )
    text_prior_new_items_share: Literal["validation", "catalogue"] = Field(
        default="validation",
        description=(
            f"How much the validation targets that are new items weigh in the choice of (w, c), with at "
            f"least {MIN_NEW_TARGETS} of them: 'validation' (the default) as many as they are (the plain "
            "mean over the targets); 'catalogue' as much as the catalogue's share of items without "
            "training interactions, the other targets the rest (a stratified NDCG@10): for new catalogue "
            "items expected to sell like the rest, which validation cannot see (docs/train.md: new items "
            "1.58x their text bound on food-kitchen's new-item split against 1.45x, overall unchanged; "
            "-19 % on the bundled sample, whose new items are its validation's own)."
        ),
    )
    domain_start: bool = Field(
        default=True,
        description=(
            "LLM4CDSR: a learned start state per domain thread, used where a user has no earlier item of "
            "the target's domain (else that thread adds nothing); docs/train.md, Cold start."
        ),
    )
    hide_domain: float = Field(
        default=1.0,
        ge=0.0,
        le=4.0,
        description=(
            "Training augmentation for a domain the user never shopped in: each epoch, every user whose "
            "training prefix spans two domains also trains this many examples with one domain hidden (an "
            "item as the only target, the other domains' earlier items as the input; a fraction is drawn "
            "with that probability). llm4cdsr and sasrec (the models with a mixed thread); 0 = off "
            "(docs/train.md, Cold start)."
        ),
    )
    loss_norm: Literal["batch", "global", "domain"] = Field(
        default="global",
        description=(
            "batch: each batch's training loss is its mean per position (every batch weighs the same; "
            "batches group users of similar length) | global: every training position weighs the same "
            "(each batch's sum over the epoch's mean positions per batch, as random batches give) | domain: the sum over target domains of each one's mean over the batch (the "
            "authors' code: a position of the smaller domain weighs more); docs/train.md."
        ),
    )
    alpha: float = Field(default=0.1, ge=0.0, description="Weight of the adapter's contrastive loss.")
    beta: float = Field(default=0.1, ge=0.0, description="Weight of the profile-guidance loss.")
    tau: float = Field(default=1.0, gt=0.0, description="Temperature of both contrastive losses.")
    lr: float = Field(default=1e-3, gt=0.0, description="Adam's learning rate (lazy Adam on item-ID tables).")
    lr_decay: float = Field(
        default=0.2,
        gt=0.0,
        le=1.0,
        description=(
            "On a plateau (an epoch no better on validation than the best), go on from the best epoch's "
            "weights and Adam moments at lr_decay times the learning rate; 1 = off (the epoch's own weights, "
            "the same rate). Patience still counts the epochs that were no better. 0.2 by default since "
            "2026-12-04 (docs/train.md, 'Learning rate on a plateau')."
        ),
    )
    lr_min: float = Field(
        default=1e-4,
        ge=0.0,
        description=(
            "With lr_decay below 1: a plateau that would take the learning rate below lr_min ends the run "
            "instead, on the best epoch's weights (fairseq's --stop-min-lr); 0 = never. 1e-4 by default: "
            "with lr 1e-3 and lr_decay 0.2 one drop, to 2e-4, and the next plateau ends the run (a second "
            "drop cost new items more than it gained: docs/train.md)."
        ),
    )
    refit: bool = Field(
        default=True,
        description=(
            "Once the run has chosen its epochs and the prior's weights on validation, train a fresh model "
            "(the same seed, or the same warm init) again along the path of the best weights (the kept "
            "epochs, each at its rate) on every user's history through the validation item, so each user's "
            "latest item before the test target is a training target too; that model scores the test split "
            "and is what publish serves (refit.safetensors). The validation figures, the quality gate and "
            "warm starts use the selected weights (model.safetensors). Costs about the kept epochs once "
            "more, with no validation. On by default since 2026-12-05: test full-ranking NDCG@10 +9.9 % on "
            "food-kitchen (docs/train.md, 'The refit')."
        ),
    )
    weight_decay: float = Field(
        default=0.0, ge=0.0, description="Adam's L2 weight decay on dense parameters."
    )
    batch_size: int = Field(default=128, ge=2, description="Training sequences per batch.")
    eval_batch_size: int = Field(
        default=1024, ge=1, description="Users scored at once in evaluation (memory, not results)."
    )
    epochs: int = Field(default=200, ge=1, description="Upper bound on epochs.")
    patience: int = Field(default=20, ge=1, description="Epochs without a better validation NDCG@10.")
    time_budget_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Stop training (at an epoch boundary) once its epochs, validation included, took this many seconds."
        ),
    )
    warm_start: bool = Field(
        default=True,
        description=(
            "When the stage trains (inputs or settings changed), initialise the model from the best weights "
            "of the latest earlier finished run of the same model, item rows remapped by item_id, and train "
            "at most warm_start_epochs. Falls back to a random init (cold) when there is no such run or it "
            "does not fit (docs/train.md). Off, or --force: always cold. Not part of the run id."
        ),
    )
    warm_start_epochs: int = Field(
        default=3,
        ge=1,
        description=(
            "Upper bound on epochs of a warm-started run (also capped by epochs); its patience is "
            "min(patience, max(1, warm_start_epochs // 2)), the warm init counting as epoch 0."
        ),
    )
    eval_negatives: int = Field(default=100, ge=1, description="Sampled protocol: negatives per user.")
    short_history: int = Field(
        default=5, ge=1, description="Users with fewer history items than this form the 'short' group."
    )
    text_prior_new_items_guard: Literal["auto", "exposure", "untrained", "none"] = Field(
        default="exposure",
        description=(
            f"With c chosen on validation (at least {MIN_NEW_TARGETS} new-item targets), so that training "
            "never ranks new items below what their text gave the same model untrained (built from the "
            "seed, its prior fitted alike): 'untrained' chooses (w, c) only among the pairs that rank "
            "validation's new-item targets at least as well as it (with a few hundred targets a noisy "
            "floor); 'exposure' (the default since 2026-12-06) only among those that give new items at "
            "least its share of validation's top-10 slots (every user counts, but it can ask for more "
            "exposure than new items need); 'auto' the first where the untrained model's figure over those "
            "targets is known to within text_prior_new_items_guard_rse, the second elsewhere (measured: "
            "-1.2 % instead of -4.5 % overall at one seed, new items 0.95x the untrained model at another). "
            "Where no pair reaches the floor, the plain choice and a warning. Costs one more fit of the "
            "prior. 'none': the plain choice (docs/train.md, 'One floor where validation can measure it')."
        ),
    )
    text_prior_new_items_guard_rse: float = Field(
        default=0.1,
        gt=0,
        description=(
            "With text_prior_new_items_guard 'auto': the NDCG floor is used where its relative standard error "
            "(the untrained model's NDCG@10 over validation's new-item targets: their spread over sqrt(n), "
            "over the mean) is at most this; the exposure floor elsewhere (0.1: some 2,500 new-item targets "
            "at food-kitchen's figures)."
        ),
    )
    full_ranking: bool = Field(default=True, description="Also rank the whole target domain.")
    cold_start: ColdStartSettings = Field(default_factory=ColdStartSettings)
    seed: int = Field(
        default=42, description="Seeds initialisation, batches, negatives and the cold-start hold-out."
    )
    deterministic: bool = Field(default=False, description="torch deterministic algorithms.")
    threads: int = Field(default=0, ge=0, description="torch threads; 0 = runtime.threads.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where torch trains: auto = cuda when a GPU is visible, else cpu."
    )
    data_parallel: DataParallelSettings = Field(default_factory=DataParallelSettings)

    @field_validator("text_prior_new_items", mode="before")
    @classmethod
    def _new_items_on_validation(cls, value: Any) -> Any:
        """'validation' (a config file's or env var's word for it) is None: c chosen on validation."""
        return None if value == "validation" else value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODEL_PRESETS:
            raise ValueError(f"unknown model {value!r}; choose one of {', '.join(MODEL_PRESETS)}")
        return value

    @model_validator(mode="after")
    def _preset_not_contradicted(self) -> TrainSettings:
        """A switch set by hand that the preset sets otherwise is an error, not silently overridden:
        `model: llm4cdsr-noprofile` with `beta: 0.2` trained with beta 0 (a new contributor's trial).
        The preset's switches are then applied to the fields left unset (not marked as set), so the
        settings hold what the model is built from and a dump (`model_dump_json`, a data-parallel job, a
        benchmark's child process) validates again: every field is set there, each to the preset's value."""
        switches = MODEL_PRESETS[self.model][1]
        clash = [
            f"{k}: {getattr(self, k)!r} (the preset's: {v!r})"
            for k, v in switches.items()
            if k in self.model_fields_set and getattr(self, k) != v
        ]
        if clash:
            raise ValueError(
                f"model {self.model!r} sets {', '.join(clash)}; remove the setting or choose another model"
            )
        self.__dict__.update({k: v for k, v in switches.items() if k not in self.model_fields_set})
        return self

    @property
    def architecture(self) -> Architecture:
        return MODEL_PRESETS[self.model][0]

    def model_spec(self, global_dim: int = 0, local_dim: int = 0, profile_dim: int = 0) -> ModelConfig:
        """The typed model config these settings build, given the enrich tables' widths (the preset's switches
        are in the fields: `_preset_not_contradicted`)."""
        keys = ("hidden", "layers", "heads", "dropout", "max_len", "causal", "block", "positions", "weight_init", "task", "mask_prob", "id_embeddings", "id_dropout", "id_text_fit", "id_text_knn", "item_bias", "domain_start",
                "alpha", "beta", "tau", "adapter_init", "adapter_per_domain", "fusion", "semantic_dims", "objective", "negatives", "sampling", "bce_negatives")  # fmt: skip
        return ModelConfig(
            architecture=self.architecture,
            **{k: getattr(self, k) for k in keys},
            text_prior=self.text_prior and self.architecture == "llm4cdsr",
            text_prior_new_items=(
                min(self.text_prior_new_items_grid)
                if self.text_prior_new_items is None
                else self.text_prior_new_items
            ),  # validation's choice starts (and, with too few new-item targets, stays) at the grid's floor
            text_prior_decay=self.text_prior_decay,
            global_dim=global_dim,
            local_dim=local_dim,
            profile_dim=profile_dim,
        )

    def fit_config(self, warm: bool = False) -> FitConfig:
        """The training loop's config; a warm-started run gets `warm_limits()`."""
        from bridgerec.models.trainer import FitConfig

        epochs, patience = self.warm_limits() if warm else (self.epochs, self.patience)
        return FitConfig(
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            epochs=epochs,
            patience=patience,
            seed=self.seed,
            time_budget_s=self.time_budget_s,
            select_by=self.select_by if self.full_ranking else "sampled",
            hide_domain=self.effective_hide_domain,
            loss_norm=self.loss_norm,
            lr_decay=self.lr_decay,
            lr_min=self.lr_min,
            label=self.model,
        )

    @property
    def effective_hide_domain(self) -> float:
        """`hide_domain` where the model has a mixed thread to learn from other domains, else 0 (a model
        of per-domain threads only, or `pop`, has nothing to learn from the hidden-domain examples)."""
        return self.hide_domain if self.architecture in ("llm4cdsr", "sasrec") else 0.0

    @property
    def bce_negatives_apply(self) -> bool:
        """Whether `bce_negatives` changes anything (`ModelConfig.bce_negatives_apply`)."""
        return self.model_spec().bce_negatives_apply

    def warm_limits(self) -> tuple[int, int]:
        """(epochs, patience) of a warm-started run. The warm model starts near its optimum: the epochs
        that fail to beat it (or the best so far) are mostly drift, so stop after half the budget of them."""
        epochs = min(self.epochs, self.warm_start_epochs)
        patience = min(self.patience, max(1, self.warm_start_epochs // 2))
        return epochs, patience

    @property
    def uses_llm_tables(self) -> bool:
        return self.architecture == "llm4cdsr"

    @property
    def uses_profiles(self) -> bool:
        return self.architecture == "llm4cdsr" and self.beta > 0

"""The typed configuration of a model (as nanoGPT's `GPTConfig` -> `GPT(config)`).

A `ModelConfig` holds everything that decides a model's tensors and its training loss; it is built from
the train settings (`TrainSettings.model_spec()`), saved in the run's config.json under `model_config`,
and passed whole to the model's constructor by `registry.build_model`. Unknown keys are an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Architecture = Literal["llm4cdsr", "sasrec", "sasrec_domain", "pop"]
# Training objectives (the field's names):
#   bce             - binary cross-entropy against one negative per target, drawn uniformly from the
#                     target's domain (SASRec's and the LLM4CDSR paper's loss);
#   sampled_softmax - softmax cross-entropy over the target and K negatives shared by the batch, drawn
#                     from the target's domain (uniformly or by popularity, with the logQ correction);
#   ce              - full softmax cross-entropy over every item of the target's domain.
Objective = Literal["bce", "sampled_softmax", "ce"]
Sampling = Literal["uniform", "popularity"]
# Transformer block layout (models/backbone.py `Block`): standard pre-LayerNorm, or SASRec.pytorch's (the
# LLM4CDSR authors' code), with its unmasked padding and sqrt(width) input scaling.
BlockLayout = Literal["pre_ln", "sasrec"]
# Where position embeddings count from (models/backbone.py `SequenceEncoder`): the latest item is position
# max_len, as in SASRec.pytorch's padded layout, or the first item is position 1, as in the LLM4CDSR
# authors' code (then a prefix's states do not depend on what follows it).
Positions = Literal["from_end", "from_start"]
BceNegatives = Literal["fused", "per_thread"]
# Which positions of a training prefix are targets (docs/train.md, "Training tasks"):
#   next  - every position predicts the next item (SASRec; the causal mask keeps each target out of view);
#   last  - only the prefix's last item is a target, predicted from every item before it (one target per
#           user and epoch; attention may then look both ways without seeing the target);
#   cloze - masked-item prediction (BERT4Rec, Sun et al., CIKM 2019): a share `mask_prob` of the items,
#           and always the last one, are replaced by a learned mask token and predicted, attention looking
#           both ways; at inference a mask token after the history is what the user vector reads.
Task = Literal["next", "last", "cloze"]
Fusion = Literal["add", "null_space"]
# Initialisation of the sequence encoders (models/backbone.py `SequenceEncoder`): torch's defaults
# (positions N(0, 0.02)), or the authors' code: Xavier-normal for every weight matrix and the position
# table (their `_init_weights`), zero attention biases (torch's MultiheadAttention), FFN biases torch's.
WeightInit = Literal["torch", "xavier"]


@dataclass(frozen=True)
class ModelConfig:
    architecture: Architecture
    hidden: int = 128
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 200
    causal: bool = True
    # Runs recorded before the switch were pre_ln; TrainSettings' default is sasrec.
    block: BlockLayout = "pre_ln"
    positions: Positions = "from_end"
    weight_init: WeightInit = "torch"
    task: Task = "next"
    mask_prob: float = 0.2  # cloze: the share of a prefix's items masked (besides its last item)
    # LLM4CDSR only
    id_embeddings: bool = False
    # ID dropout (DropoutNet, Volkovs et al. NeurIPS 2017): in training each item's ID row is replaced with
    # this probability by a row predicted from its LLM embeddings, which items without training
    # interactions (new items) then use instead of no ID row at all. 0 = no predicted rows.
    id_dropout: float = 0.0
    # A learned bias per item added to every score (the user side gets a constant 1): what an item's
    # popularity adds whoever the user is; an item without training interactions gets the mean bias of its
    # domain's items with them. Needs id_embeddings.
    item_bias: bool = False
    # A mapping fitted on warm items: after every epoch, the ID-row generators (as for id_dropout) are
    # fitted in closed form, a ridge regression from each item's LLM embedding to its learned ID row over
    # the items with training interactions (weighted by them; the ridge strength chosen on a held-out
    # fifth of those items), instead of by gradient steps; items without interactions use the predicted row.
    id_text_fit: bool = False
    # With id_text_fit and id_embeddings, k > 0: once training is over, an item without training
    # interactions takes the mean ID row of its k text-nearest items with them (cosine of each thread's
    # LLM embeddings; a domain thread's neighbours are of its domain) instead of the ridge map's
    # prediction, which still scores it while training. 0 = the ridge map; ignored otherwise.
    id_text_knn: int = 0
    # The text prior: every score gets w * cos(history text, item text), the cosine of the item's LLM
    # embedding with the unit-norm sum of the history's (what raw text similarity ranks by, untrained);
    # the user vector carries w * that sum, the item vector the item's unit-norm embedding (the scoring
    # contract holds). Off while training; w is fitted on validation after it (`fit_text_prior`).
    text_prior: bool = False
    # The prior's weight on items without training interactions (`id_known` 0: new catalogue items) is
    # w * text_prior_new_items: how much of their text similarity new items may bring to the score.
    text_prior_new_items: float = 1.0
    # The history's text vector weighs the item k places before the latest by text_prior_decay ** k
    # (recency; 1 = the plain sum, the text-only bound's user). Read at inference only.
    text_prior_decay: float = 1.0
    # A learned state per domain thread for a target with no earlier item of its domain (instead of no
    # domain term): what a user who never shopped in the domain is scored with.
    domain_start: bool = False
    # Per-domain adapters (after LLM-EDT's domain-specific adapters): the mixed thread's item input is the
    # shared adapter's output plus a linear map of the item's domain (zero-initialised).
    adapter_per_domain: bool = False
    # How LLM4CDSR's item inputs combine the LLM table and the ID rows: `add` (the paper's adapter, plus the
    # ID rows in the hybrid) or `null_space` (AlphaFuse: the frozen, whitened LLM embedding in the first
    # `semantic_dims` coordinates, the ID rows in the rest; needs id_embeddings).
    fusion: Fusion = "add"
    semantic_dims: int = 64
    alpha: float = 0.1
    beta: float = 0.1
    tau: float = 1.0
    adapter_init: Literal["xavier", "torch"] = "xavier"
    global_dim: int = 0  # widths of the enrich tables (0: not an LLM model)
    local_dim: int = 0
    profile_dim: int = 0  # 0 = no profile guidance
    # training loss
    objective: Objective = "bce"
    negatives: int = 2048  # sampled_softmax: K negatives per domain, shared by the batch
    sampling: Sampling = "popularity"  # sampled_softmax: how the K negatives are drawn
    # bce with LLM4CDSR: `fused` scores one negative of the target's domain with every thread; `per_thread`
    # gives the mixed thread a negative of its own, drawn from the domain of the position's input item,
    # and the domain thread one from the target's domain (the authors' code).
    bce_negatives: BceNegatives = "fused"

    def __post_init__(self) -> None:
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout {self.id_dropout} must be in [0, 1)")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.fusion == "null_space" and not (self.id_embeddings and 0 < self.semantic_dims < self.hidden):
            raise ValueError("fusion null_space needs id_embeddings and 0 < semantic_dims < hidden")
        if self.item_bias and not self.id_embeddings:
            raise ValueError("item_bias is an ID feature: it needs id_embeddings")
        if self.id_text_fit and self.id_dropout > 0:
            raise ValueError("id_text_fit and id_dropout both set the ID-row generators: choose one")
        if self.id_text_knn < 0:
            raise ValueError(f"id_text_knn {self.id_text_knn} must be >= 0")
        if not 0.0 <= self.mask_prob < 1.0:
            raise ValueError(f"mask_prob {self.mask_prob} must be in [0, 1)")
        built = {"next": ("llm4cdsr", "sasrec", "sasrec_domain", "pop"), "last": ("llm4cdsr", "sasrec"),
                 "cloze": ("llm4cdsr",)}  # fmt: skip
        if self.architecture not in built[self.task]:
            raise ValueError(
                f"task {self.task!r} is built for {', '.join(built[self.task])}, not {self.architecture}"
            )

    @property
    def bidirectional(self) -> bool:
        """Whether attention looks both ways: `causal` off, or the cloze task (whose masked positions keep
        the targets out of view)."""
        return not self.causal or self.task == "cloze"

    @property
    def bce_negatives_apply(self) -> bool:
        """Whether `bce_negatives` changes anything: `bce` with the two-thread LLM4CDSR."""
        return self.objective == "bce" and self.architecture == "llm4cdsr"

    @property
    def per_thread_negatives(self) -> bool:
        """Whether training draws the mixed thread a negative of its own (`Batch.mixed_negatives`)."""
        return self.bce_negatives_apply and self.bce_negatives == "per_thread"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Strict: a key this class does not know is an error (no silent swallowing)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> ModelConfig:
        """The model config of a run folder's config.json. Runs written before `model_config` existed
        recorded the resolved settings under `settings` (bidirectional unless `causal`, BCE, the torch
        default adapter initialisation)."""
        if "model_config" in config:
            return cls.from_dict(config["model_config"])
        s, tables = config["settings"], config["settings"].get("tables", {})
        keys = ("hidden", "layers", "heads", "dropout", "max_len", "causal", "id_embeddings", "alpha")
        return cls(
            architecture=s["architecture"],
            **{k: s[k] for k in keys},
            beta=s["beta"],
            tau=s["tau"],
            adapter_init="torch",
            global_dim=int(tables.get("global_dim", 0)),
            local_dim=int(tables.get("local_dim", 0)),
            profile_dim=int(tables.get("profile_dim", 0)),
            objective="bce",
        )

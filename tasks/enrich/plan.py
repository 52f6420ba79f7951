"""What travels between the enrich stage's shard functions: small pydantic objects that a remote task run
can take (the plan, a shard, a shard's work) and the stage's summary."""

from __future__ import annotations

import os
import socket

from pydantic import BaseModel, Field


class EnrichSummary(BaseModel):
    """What `bridgerec enrich --json` prints."""

    items: int = 0
    items_embedded: int = 0
    items_cached: int = 0
    texts_embedded: int = 0
    profile_users: int = 0  # users selected for a profile (all, or the first profiles.max_users)
    profiles_generated: int = 0
    profiles_cached: int = 0
    errors: int = 0
    errors_by_step: dict[str, int] = Field(default_factory=dict)
    embedding_dim: int = 0
    global_dim: int = 0
    local_dim: int = 0
    embed_model_id: str = ""
    llm_model_id: str | None = None
    profile_mode: str = "llm"
    profile_estimate: dict | None = None  # calls, tokens, minutes, printed before generating
    tokens_generated: int = 0
    generation_tokens_per_s: float | None = None
    embedding_texts_per_s: float | None = None
    engines_started: list[dict] = Field(default_factory=list)
    shards: list[dict] = Field(default_factory=list)  # one row per shard task run: rows, new work, worker
    skipped: bool = False
    seconds: float = 0.0
    workspace: str = ""


def worker_name() -> str:
    """host:pid of the process that ran a shard (ops see where the work went)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Shard(BaseModel):
    """Rows [start, stop) of the ingest items, or of the selected users (by user_idx)."""

    index: int
    start: int
    stop: int


def shards(n: int, size: int) -> list[Shard]:
    return [Shard(index=i, start=s, stop=min(s + size, n)) for i, s in enumerate(range(0, n, size))]


class EnrichPlan(BaseModel):
    """Decided once per run and passed to every shard task (small, so remote task runs can take it)."""

    workspace: str
    threads: int
    config_hash: str
    input_hashes: dict[str, str]
    embed_dir: str
    embed_id: str
    llm_dir: str | None
    llm_id: str | None
    items: int
    item_shards: list[Shard]
    skipped: EnrichSummary | None = None  # set when the inputs are unchanged: nothing else to do


class ItemShardWork(BaseModel):
    shard: Shard
    items_embedded: int
    texts_embedded: int
    seconds: float
    failures: list[dict]  # text_hash, reason, attempts: not tried again by later passes of this run
    engines_started: list[dict]
    worker: str = Field(default_factory=worker_name)


class ProfilePlan(BaseModel):
    shards: list[Shard]
    embedding_dim: int
    users_selected: int
    to_generate: int
    estimate: dict


class ProfileShardWork(BaseModel):
    shard: Shard
    generated: int
    tokens: int
    seconds: float
    errors: list[dict]  # rows of errors.parquet, keyed by user_id
    engines_started: list[dict]
    worker: str = Field(default_factory=worker_name)

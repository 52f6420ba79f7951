"""The enrich run's skeleton. What travels between the shard functions: small pydantic objects that a
remote task run can take (the plan, a shard, a shard's work, the summary). What a shard function opens from
the plan in the process that runs it: `EnrichContext` (the workspace's readers, the engines)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, Field

from bridgerec.runtime.reports import TableReport
from bridgerec.runtime.runner import shard_size
from bridgerec.storage.checkpoints import Checkpoints
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.enrich.engine import Embedder, EnginePool, EngineSpec, Generator, process_engines
from bridgerec.tasks.enrich.outputs import STAGE, EnrichOutputs
from bridgerec.tasks.enrich.settings import EnrichSettings, ProfileSettings


class EnrichSummary(BaseModel):
    """What `bridgerec enrich --json` prints."""

    items: int = 0
    items_embedded: int = 0
    items_cached: int = 0
    texts_embedded: int = 0
    profile_users: int = 0  # users selected for a profile (all, or profiles.max_users of them)
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

    def reports(self) -> list[TableReport]:
        """New work and cached counts, errors by step; one row per shard task run."""
        rows = [
            {"what": "items embedded (new)", "count": self.items_embedded},
            {"what": "items cached", "count": self.items_cached},
            {"what": "profiles generated (new)", "count": self.profiles_generated},
            {"what": "profiles cached", "count": self.profiles_cached},
            {"what": "errors", "count": self.errors},
        ]
        rows += [{"what": f"errors: {step}", "count": n} for step, n in self.errors_by_step.items()]
        description = (
            f"Enrich: {self.items} items, {self.embedding_dim}-d {self.embed_model_id}; "
            f"profiles {self.profile_mode} ({self.llm_model_id})"
            + (" (skipped: inputs unchanged)" if self.skipped else f" in {self.seconds:.0f} s")
        )
        reports = [TableReport("enrich-summary", rows, description)]
        if self.shards:
            reports.append(
                TableReport(
                    "enrich-shards",
                    self.shards,
                    "Enrich shards: one task run each (rows [start, stop) of the new item texts or of the "
                    "selected users, new work, seconds, worker)",
                )
            )
        return reports


def worker_name() -> str:
    """host:pid of the process that ran a shard (ops see where the work went)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Shard(BaseModel):
    """Rows [start, stop) of the ingest items, or of the selected users (by user_idx)."""

    index: int
    start: int
    stop: int


def shards(n: int, size: int, slots: int = 1) -> list[Shard]:
    """[0, n) in shards of `size` rows (the last one shorter), or of n / `slots` rows (rounded up) when
    that is smaller, so that `slots` workers running at once each get a shard."""
    size = shard_size(n, size, slots)
    return [Shard(index=i, start=s, stop=min(s + size, n)) for i, s in enumerate(range(0, n, size))]


class EnrichPlan(BaseModel):
    """Decided once per run by `plan_enrich` and passed to every shard function (small, so remote task runs
    can take it): the settings, the model folders and ids, the input hashes and the item shards."""

    enrich: EnrichSettings
    profiles: ProfileSettings
    workspace: str
    threads: int  # CPU threads of one shard's engines (`Runner.shard_threads`)
    slots: int = 1  # shards that run at once (`Runner.slots`): shards are cut so that each gets work
    config_hash: str
    input_hashes: dict[str, str]
    embed_dir: str
    embed_id: str
    llm_dir: str | None
    llm_id: str | None
    items: int
    item_shards: list[Shard]
    started_at: float  # wall clock (time.time(), s) when the run began: the summary's `seconds`
    skipped: EnrichSummary | None = None  # set when the inputs are unchanged: nothing else to do
    force: bool = False  # --force: the PCA tables are fit anew too

    @property
    def with_profiles(self) -> bool:
        return self.profiles.mode == "llm"


class ItemShardWork(BaseModel):
    shard: Shard  # rows of the run's new item texts (tasks/enrich/stage.py: PENDING_FILE)
    texts_embedded: int
    seconds: float
    failures: list[dict]  # text_hash, reason, attempts: not tried again by later passes of this run
    engines_started: list[dict]
    worker: str = Field(default_factory=worker_name)


class ProfilePlan(BaseModel):
    shards: list[Shard]  # of the selected users, by user_idx
    embedding_dim: int
    estimate: dict  # calls, tokens and minutes of the users to generate (profiles.estimate_cost)


class ProfileShardWork(BaseModel):
    shard: Shard
    generated: int
    tokens: int
    seconds: float
    errors: list[dict]  # rows of errors.parquet, keyed by user_id
    engines_started: list[dict]
    worker: str = Field(default_factory=worker_name)


@dataclass(frozen=True)
class EnrichContext:
    """What every shard function reads, opened from the plan in the process that runs the shard: the
    settings and model ids (through the plan), the workspace, the previous output (the caches), this run's
    checkpoints and the engines (started on first use, one per model for the process or the run)."""

    plan: EnrichPlan
    workspace: Workspace
    outputs: EnrichOutputs  # the finished output of the previous build
    checkpoints: Checkpoints  # finished batches of this run (and of a crashed one)
    pool: EnginePool
    first_start: int  # engines the pool had started before this context opened

    @classmethod
    def open(cls, plan: EnrichPlan) -> EnrichContext:
        workspace = Workspace(plan.workspace)
        pool = process_engines()
        return cls(
            plan, workspace, EnrichOutputs(workspace), Checkpoints(workspace, STAGE), pool, len(pool.starts)
        )

    @property
    def enrich(self) -> EnrichSettings:
        return self.plan.enrich

    @property
    def profiles(self) -> ProfileSettings:
        return self.plan.profiles

    @property
    def previous_stats(self) -> dict:
        """`stats` of the previous build's manifest ({} on the first build)."""
        manifest = self.outputs.manifest()
        return manifest.stats if manifest is not None else {}

    def items(self) -> pa.Table:
        """Ingest items.parquet (every item, in ingest row order)."""
        return self.outputs.ingest.table("items")

    def embedder(self) -> Embedder:
        """The item embedding engine (also embeds the profile texts)."""
        spec = EngineSpec.of("pooling", Path(self.plan.embed_dir), self.enrich.engine, self.plan.threads)
        return self.pool.embedder(spec, self.plan.embed_id, truncate=self.enrich.truncate)

    def generator(self) -> Generator:
        """The profile generation engine (profiles.mode: llm only)."""
        assert self.plan.llm_dir is not None and self.plan.llm_id is not None
        spec = EngineSpec.of("generate", Path(self.plan.llm_dir), self.profiles.engine, self.plan.threads)
        return self.pool.generator(spec, self.plan.llm_id)

    def engines_started(self) -> list[dict]:
        """The engines started since this context opened (runner, model, seconds)."""
        return self.pool.starts[self.first_start :]

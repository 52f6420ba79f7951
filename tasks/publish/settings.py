"""Settings of the publish stage (section `publish`).

The warehouse file itself is the top-level `warehouse` setting; the night's Parquet parts go beside it
(`<warehouse folder>/<warehouse name>.parts/`) unless `data_dir` says otherwise (a folder or
s3://bucket/prefix); FAISS indexes go to `<warehouse folder>/indexes/<run_id>/` unless `index_dir` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ConfigDict, Field

from bridgerec.storage.index_store import IndexSettings
from bridgerec.storage.workspace import StageSettings


class PublishSettings(StageSettings):
    model_config = ConfigDict(extra="forbid")
    # Threads, batch and shard sizes, row groups, where indexes and parts go, how long dropped files are
    # kept: they change how, not what, is published.
    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {
            "threads",
            "batch_users",
            "index_dir",
            "data_dir",
            "users_per_shard",
            "row_group_users",
            "retention_grace_hours",
        }
    )
    # Switches added after warehouses existed -> the value their runs had (storage.workspace.StageSettings).
    hashed_since: ClassVar[Mapping[str, Any]] = {"history": False}
    k: int = Field(default=20, ge=1, le=1000, description="Recommendations per user and domain.")
    exclude_seen: bool = Field(default=True, description="Never recommend an item the user already had.")
    explain: bool = Field(
        default=True,
        description=(
            "Beside each recommended item, the item of the user's own history closest to it in the model's "
            "text space (its LLM item embeddings, cosine) and that similarity: the because_item_id and "
            "because_score columns (tasks/publish/explain.py). NULL for models without a text space (pop: "
            "its reason is popularity; sasrec). Off: both columns NULL, and publish saves its cost "
            "(docs/publish.md)."
        ),
    )
    new_items: bool = Field(
        default=True,
        description=(
            "Recommend catalogue items nobody interacted with yet, when the model scores items from their "
            "text (the LLM models). ID-only models (sasrec, sasrec-domain, pop) never rank them: their rows "
            "are untrained; the summary says how many were left out and why."
        ),
    )
    history: bool = Field(
        default=True,
        description=(
            "Write each user's history (the ingested interactions the run's lists were computed from) "
            "beside the lists: the warehouse's `interactions` and `latest_interactions` views, so analysts "
            "join a list to what the user had in SQL, for any retained run. Off: no history rows, and "
            "publish saves their writing (6 % of a night's bytes on food-kitchen: docs/publish.md)."
        ),
    )
    index: IndexSettings = Field(default_factory=IndexSettings)
    retention_runs: int = Field(
        default=7, ge=1, description="Completed runs whose recommendations, profiles and indexes are kept."
    )
    retention_grace_hours: float = Field(
        default=24.0,
        ge=0,
        description=(
            "How long the files of a run that retention (or a republish) took out of the views are kept "
            "before a publish deletes them: a reader that opened the warehouse before may still read them."
        ),
    )
    data_dir: str | None = Field(
        default=None,
        description=(
            "Where the night's Parquet parts go: a folder (relative = to the warehouse's folder) or "
            "s3://bucket/prefix (credentials from the AWS environment variables); default "
            "<warehouse name>.parts beside the warehouse file."
        ),
    )
    users_per_shard: int = Field(
        default=50_000, ge=1, description="Users scored (and written as one part per domain) by one shard."
    )
    row_group_users: int = Field(
        default=2048, ge=1, description="Users per Parquet row group: a user's lookup reads one row group."
    )
    index_dir: Path | None = Field(
        default=None, description="Where per-run FAISS indexes go; default `<warehouse folder>/indexes`."
    )
    threads: int = Field(default=0, ge=0, description="FAISS/DuckDB threads; 0 = runtime.threads.")
    batch_users: int = Field(default=8192, ge=1, description="Users searched per FAISS batch.")
    storage_compatibility: str = Field(
        default="v1.0.0",
        pattern=r"^(v\d+\.\d+\.\d+|latest)$",
        description=(
            "DuckDB storage format of the warehouse file (DuckDB's storage_compatibility_version): "
            "v1.0.0 is read by DuckDB 1.1 and later clients (1.0.x cannot read the file: docs/publish.md); "
            "latest only by the DuckDB bridgerec runs."
        ),
    )

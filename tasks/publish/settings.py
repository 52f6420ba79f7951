"""Settings of the publish stage (section `publish`).

The warehouse file itself is the top-level `warehouse` setting; FAISS indexes go beside it
(`<warehouse folder>/indexes/<run_id>/`) unless `index_dir` says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class IndexSettings(BaseModel):
    """Which FAISS index serves each domain. `flat` is exact; `ivf` and `hnsw` are for large catalogues."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["flat", "ivf", "hnsw"] = Field(default="flat", description="flat = exact inner product.")
    ivf_nlist: int = Field(default=1024, ge=1, description="IVF cells (capped at items/39 for training).")
    ivf_nprobe: int = Field(default=32, ge=1, description="IVF cells visited per query.")
    hnsw_m: int = Field(default=32, ge=4, description="HNSW neighbours per node.")
    hnsw_ef_construction: int = Field(default=80, ge=8)
    hnsw_ef_search: int = Field(default=128, ge=8, description="Raised to k + seen items when smaller.")
    gpu: Literal["auto", "off"] = Field(
        default="auto", description="auto = search on the GPU when faiss finds one (faiss-gpu)."
    )


class PublishSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(default=20, ge=1, le=1000, description="Recommendations per user and domain.")
    exclude_seen: bool = Field(default=True, description="Never recommend an item the user already had.")
    index: IndexSettings = Field(default_factory=IndexSettings)
    retention_runs: int = Field(
        default=7, ge=1, description="Completed runs whose recommendations, profiles and indexes are kept."
    )
    index_dir: Path | None = Field(
        default=None, description="Where per-run FAISS indexes go; default `<warehouse folder>/indexes`."
    )
    threads: int = Field(default=0, ge=0, description="FAISS/DuckDB threads; 0 = runtime.threads.")
    batch_users: int = Field(default=8192, ge=1, description="Users searched per FAISS batch.")

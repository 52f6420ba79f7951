"""What the train stage reads: the ingest outputs (id spaces, sequences) and the enrich outputs (LLM
item tables, profile vectors), as numpy arrays keyed by the ingest's dense ids, and `TrainInputs`, the
arrays a run trains on (`load_inputs`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch

from bridgerec.models.data import Catalog, SequenceData, Sequences
from bridgerec.models.registry import ItemTables
from bridgerec.models.trainer import Profiles
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.context import StageRun
from bridgerec.tasks.enrich import EnrichOutputs
from bridgerec.tasks.ingest import IngestOutputs
from bridgerec.tasks.train import coldstart
from bridgerec.tasks.train.settings import TrainSettings


def load_catalog(workspace: Workspace) -> Catalog:
    ingest = IngestOutputs(workspace)
    domains = ingest.table("domains").sort_by("domain_idx")
    items = ingest.table("items", columns=["item_id", "global_id"]).sort_by("global_id")
    gids = items["global_id"].to_numpy()
    if not np.array_equal(gids, np.arange(1, len(gids) + 1)):
        raise ValueError("ingest items.parquet: global ids are not 1..N")
    return Catalog(
        domains=domains["domain"].to_pylist(),
        sizes=domains["n_items"].to_numpy().astype(np.int64),
        offsets=domains["global_offset"].to_numpy().astype(np.int64),
        item_ids=items["item_id"].to_pylist(),
    )


def load_sequences(workspace: Workspace) -> Sequences:
    seqs = IngestOutputs(workspace).table("sequences", columns=["user_id", "user_idx", "global_ids"])
    seqs = seqs.sort_by("user_idx")
    if not np.array_equal(seqs["user_idx"].to_numpy(), np.arange(seqs.num_rows)):
        raise ValueError("ingest sequences.parquet: user_idx is not 0..U-1")
    lists = seqs["global_ids"].combine_chunks()
    flat = pc.list_flatten(lists).to_numpy().astype(np.int64)
    offsets = lists.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    return Sequences(user_ids=seqs["user_id"].to_pylist(), flat=flat, offsets=offsets)


def load_item_tables(workspace: Workspace) -> ItemTables:
    global_table, local = EnrichOutputs(workspace).item_tables()
    return ItemTables(
        np.asarray(global_table, np.float32), [np.asarray(local[d], np.float32) for d in sorted(local)]
    )


def load_profiles(workspace: Workspace, n_users: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(vectors [U, D] with zero rows for users without a profile, has [U] bool), or None if none exist."""
    try:
        user_idx, vectors = EnrichOutputs(workspace).profile_vectors()
    except FileNotFoundError:
        return None
    user_idx = np.asarray(user_idx, np.int64)
    if len(user_idx) == 0:
        return None
    if user_idx.min() < 0 or user_idx.max() >= n_users:
        raise ValueError("profile vectors name users outside the ingest's user_idx range")
    out = np.zeros((n_users, vectors.shape[1]), np.float32)
    has = np.zeros(n_users, bool)
    out[user_idx] = vectors
    has[user_idx] = True
    return out, has


@dataclass
class TrainInputs:
    """What a run trains on, loaded once: the catalogue, the sequences (after the cold-start hold-out), the
    LLM tables and profile vectors where the model uses them, and the cold-start evaluation."""

    catalog: Catalog
    sequences: Sequences
    data: SequenceData
    tables: ItemTables | None
    profiles: Profiles | None
    cold_eval: coldstart.ColdStart

    @property
    def widths(self) -> dict[str, int]:
        """The enrich tables' widths the model is built for (0 where unused)."""
        t = self.tables
        return {
            "global_dim": int(t.global_table.shape[1]) if t else 0,
            "local_dim": int(t.local_tables[0].shape[1]) if t else 0,
            "profile_dim": int(self.profiles.vectors.shape[1]) if self.profiles is not None else 0,
        }


def load_inputs(run: StageRun[TrainSettings]) -> TrainInputs:
    """The catalogue and sequences (with the cold-start hold-out applied), and the enrich tables and
    profile vectors where the model uses them."""
    settings, workspace, log = run.settings, run.workspace, run.log
    catalog = load_catalog(workspace)
    sequences, cold_eval = coldstart.prepare(
        settings.cold_start, catalog, load_sequences(workspace), workspace, settings.seed, log.info
    )
    data = SequenceData(catalog, sequences, settings.max_len)
    tables = load_item_tables(workspace) if settings.uses_llm_tables else None
    profiles = None
    if settings.uses_profiles:
        loaded = load_profiles(workspace, cold_eval.source_users)
        if loaded is None:
            log.warning("train: no profile vectors in the workspace; training without the profile term")
        else:
            vectors, has_profile = cold_eval.select_users(loaded[0]), cold_eval.select_users(loaded[1])
            profiles = Profiles(torch.from_numpy(vectors), torch.from_numpy(has_profile))
            log.info(
                "train: %s of %s users have a profile", f"{int(has_profile.sum()):,}", f"{data.n_users:,}"
            )
    return TrainInputs(catalog, sequences, data, tables, profiles, cold_eval)

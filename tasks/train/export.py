"""Export a trained run as per-domain user and item vectors for publishing (the train stage's side of
the hand-over in storage/vectors.py; publish reads it through `TrainOutputs.export_vectors`).

The served weights (`RunDir.served`: the refit's where the run has them). For every target domain d:
user_vectors[u] . item_vectors[i] equals the model's fused score of item i for user u, where the user's
state comes from the FULL history (training prefix + validation + test items), i.e. the representation
that recommends the next, unseen item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from bridgerec.models.base import Recommender
from bridgerec.models.config import ModelConfig
from bridgerec.models.data import Catalog, SequenceData, Sequences
from bridgerec.models.registry import build_model
from bridgerec.storage.runs import RunDir
from bridgerec.storage.vectors import DomainVectors, TextSpace, csr_from_pairs
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.train.inputs import load_catalog, load_sequences


def catalogue_mismatch(run: RunDir, catalog: Catalog) -> str | None:
    """Why `run` cannot score `catalog` (trained on other domains, item counts or items in its rows: its
    rows would not be today's items; ingest renumbers every night), or None when it can."""
    recorded = run.read_config()["catalog"]
    sizes = [int(n) for n in catalog.sizes]
    if recorded["domains"] != catalog.domains or recorded["sizes"] != sizes:
        return (
            f"run {run.path.name} was trained on another catalogue ({recorded['domains']}, "
            f"{recorded['sizes']} items; the workspace has {catalog.domains}, {sizes})"
        )
    try:  # the same counts: the same items in the same rows?
        moved = run.read_items() != list(catalog.item_ids)
    except FileNotFoundError:  # a run from before items.parquet: the counts are all there is
        return None
    return (
        f"run {run.path.name} was trained on other items in its rows than today's catalogue"
        if moved
        else None
    )


def load_run(
    run_dir: Path,
    workspace: Workspace,
    device: str = "cpu",
    weights: Literal["served", "selected"] = "served",
) -> tuple[Recommender, dict, Catalog]:
    """Rebuild a run's model from config.json and its weights: `served`, what publish serves and the test
    figures measured (the refit's, refit.safetensors, where the run has them, else the best), or
    `selected`, the best on validation (model.safetensors: what validation figures measured)."""

    run = RunDir(workspace, Path(run_dir).name)
    run.path = Path(run_dir)
    config = run.read_config()
    catalog = load_catalog(workspace)
    if (mismatch := catalogue_mismatch(run, catalog)) is not None:
        raise ValueError(f"{mismatch}: retrain")
    model = build_model(ModelConfig.from_run_config(config), catalog)
    path = run.served if weights == "served" else run.model
    model.load_state_dict(load_file(str(path), device=device), strict=True)
    return model.to(device).eval(), config, catalog


@torch.no_grad()
def export_vectors(
    run_dir: Path, workspace: Workspace, device: str = "cpu", batch_size: int = 2048
) -> dict[str, DomainVectors]:
    """{domain name: DomainVectors} for every domain, every user, every item of the domain."""

    model, config, catalog = load_run(run_dir, workspace, device)
    sequences = load_sequences(workspace)
    data = SequenceData(catalog, sequences, int(config["settings"]["max_len"]))
    model.serving_update(data)  # pop: count every known interaction, not just the training prefixes
    inputs = data.eval_split("export", 0, 0, 1).inputs  # [U, max_len], the whole history
    order = torch.argsort((inputs > 0).sum(1), stable=True)  # similar lengths together (trimmed batches)
    items = [model.item_vectors(d)[1:].float().cpu().numpy() for d in range(len(catalog.domains))]  # [n_d, D]
    users = [np.zeros((data.n_users, v.shape[1]), np.float32) for v in items]  # [U, D] per domain
    for chunk in torch.split(order, batch_size):
        # one pass over the history for every domain: the threads the domains share run once
        for d, vectors in enumerate(model.user_vectors_all(inputs[chunk].to(device))):
            users[d][chunk.numpy()] = vectors.float().cpu().numpy()
    out: dict[str, DomainVectors] = {}
    for d, name in enumerate(catalog.domains):
        indptr, seen = seen_items(catalog, sequences, d)
        out[name] = DomainVectors(
            domain=name,
            user_ids=list(sequences.user_ids),
            user_vectors=users[d],
            item_ids=catalog.domain_item_ids(d),
            item_vectors=items[d],
            seen_indptr=indptr,
            seen_items=seen,
        )
    return out


def seen_items(catalog: Catalog, sequences: Sequences, domain: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the item rows (local id - 1) of `domain` each user interacted with, ever (deduplicated)."""
    users = np.repeat(np.arange(len(sequences.lengths)), sequences.lengths)
    g = sequences.flat
    keep = catalog.item_domain[g] == domain
    return csr_from_pairs(
        users[keep], catalog.item_local[g[keep]] - 1, len(sequences.lengths), int(catalog.sizes[domain])
    )


def export_text_space(run_dir: Path, workspace: Workspace) -> TextSpace | None:
    """The run's text space (storage.vectors.TextSpace): its frozen LLM item table `E_all` as saved
    with its weights (what the model scored with, not a later enrich), and every user's whole history;
    None for a model without one (pop, sasrec, sasrec-domain)."""
    from safetensors import safe_open

    run = RunDir(workspace, Path(run_dir).name)
    run.path = Path(run_dir)
    with safe_open(str(run.model), framework="numpy") as weights:
        if "E_all" not in weights.keys():  # noqa: SIM118  (safe_open has no __contains__)
            return None
        table = weights.get_tensor("E_all")[1:]  # [N, Dg]; row 0 is padding
    catalog = load_catalog(workspace)
    sequences = load_sequences(workspace)
    n_users = len(sequences.lengths)
    users = np.repeat(np.arange(n_users), sequences.lengths)
    indptr, items = csr_from_pairs(users, sequences.flat - 1, n_users, len(catalog.item_ids))
    return TextSpace.from_table(list(catalog.item_ids), table, list(sequences.user_ids), indptr, items)

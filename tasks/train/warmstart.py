"""How a run starts (`init_from`, as nanoGPT's): resume its own checkpoint, warm-start from an earlier
run, or start cold. Warm start: pick the earlier run to start from, check that it fits, load its best
weights into the new model with the item rows remapped (models/warmstart.py), or say why not.

A warm start must never fail the nightly run: every problem ends in a cold start with the reason logged
and recorded in the run's summary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from bridgerec.models.base import Recommender
from bridgerec.models.data import Catalog
from bridgerec.models.warmstart import ItemSpace, WarmStart, WarmStartError, warm_state
from bridgerec.storage.runs import RunDir
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.enrich import EnrichOutputs
from bridgerec.tasks.train.checkpoint import Checkpoint, load_checkpoint, restore

STAGE = "train"
# What defines the tensors' shapes or what they mean: an earlier run must match on all of them. (lr,
# dropout, alpha, beta, tau, epochs... only change how it trains: a warm start across them is fine.)
SHAPE_KEYS = ("architecture", "hidden", "layers", "heads", "max_len", "causal", "id_embeddings")
TABLE_KEYS = ("global_dim", "local_dim")
# The frozen LLM tables come from the current enrich output. A refit PCA on slightly more items moves
# them a little; another embedding model (same width) moves them completely, and the adapter trained on
# the old ones would be meaningless: below this mean cosine over shared items, start cold.
MIN_TABLE_COSINE = 0.9


class InitRecord(BaseModel):
    """How a run's weights started; in summary.json, config.json, the checkpoint and the leaderboard."""

    init: Literal["warm", "cold"] = "cold"
    warm_start_from: str | None = None  # the run whose best weights initialised this one
    reason: str | None = None  # why the run started cold (null when warm)
    items: dict[str, int] = Field(default_factory=dict)  # warm: kept / new / dropped items
    table_cosine: dict[str, float] = Field(default_factory=dict)  # warm: frozen tables, old vs current


def cold(reason: str) -> InitRecord:
    return InitRecord(init="cold", reason=reason)


def previous_run(workspace: Workspace, model: str, exclude: str) -> RunDir | None:
    """The latest finished run of preset `model` on the leaderboard, other than `exclude`."""
    path = workspace.stage_dir(STAGE) / "runs.parquet"
    if not path.exists():
        return None
    rows = workspace.read_table(STAGE, "runs", columns=["run_id", "model", "finished_at"]).to_pylist()
    rows = sorted(
        (r for r in rows if r["model"] == model and r["run_id"] != exclude), key=lambda r: r["finished_at"]
    )
    for row in reversed(rows):
        run = RunDir(workspace, row["run_id"])
        if run.is_complete():
            return run
    return None


def incompatibility(previous: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why weights trained with `previous` settings (config.json's `settings`) cannot start `current`."""
    diffs = [
        f"{k} {previous.get(k)!r} -> {current.get(k)!r}"
        for k in SHAPE_KEYS
        if previous.get(k) != current.get(k)
    ]
    had, has = (
        float(s.get("id_dropout") or 0.0) > 0 or bool(s.get("id_text_fit")) for s in (previous, current)
    )
    if had != has:  # the ID-row generators exist only with ID dropout or the fitted map
        fit = [bool(s.get("id_text_fit")) for s in (previous, current)]
        key, default = ("id_text_fit", False) if fit[0] != fit[1] else ("id_dropout", 0.0)
        diffs.append(f"{key} {previous.get(key, default)!r} -> {current.get(key, default)!r}")
    tasks = [s.get("task") or "next" for s in (previous, current)]  # the tensors and what they compute
    if tasks[0] != tasks[1]:
        diffs.append(f"task {tasks[0]!r} -> {tasks[1]!r}")
    # LLM4CDSR's domain start states: one tensor more or less (no other architecture has them)
    before, now = bool(previous.get("domain_start")), bool(current.get("domain_start"))
    if current.get("architecture") == "llm4cdsr" and before != now:
        diffs.append(f"domain_start {before!r} -> {now!r}")
    priors = [bool(s.get("text_prior")) for s in (previous, current)]  # its weight: one tensor more or less
    if current.get("architecture") == "llm4cdsr" and priors[0] != priors[1]:
        diffs.append(f"text_prior {priors[0]!r} -> {priors[1]!r}")
    # The block layout changes what the same weights compute (runs before it existed were pre_ln).
    layouts = [s.get("block") or "pre_ln" for s in (previous, current)]
    if layouts[0] != layouts[1]:
        diffs.append(f"block {layouts[0]!r} -> {layouts[1]!r}")
    origins = [s.get("positions") or "from_end" for s in (previous, current)]  # the same tensors
    if origins[0] != origins[1]:
        diffs.append(f"positions {origins[0]!r} -> {origins[1]!r}")
    old_tables, new_tables = previous.get("tables", {}), current.get("tables", {})
    diffs += [
        f"enrich {k} {old_tables.get(k)} -> {new_tables.get(k)}"
        for k in TABLE_KEYS
        if old_tables.get(k) != new_tables.get(k)
    ]
    return ", ".join(diffs) or None


def previous_items(
    run: RunDir, config: dict[str, Any], hashes: dict[str, str], catalog: Catalog
) -> ItemSpace:
    """The id spaces `run` was trained on. Runs from before items.parquet existed can still be used when
    they were trained on the same ingest items file as this run (then the ids are the current ones)."""
    recorded = config["catalog"]
    if run.items.exists():
        item_ids = run.read_items()
    elif config.get("inputs", {}).get("ingest/items") == hashes.get("ingest/items"):
        item_ids = list(catalog.item_ids)
    else:
        raise WarmStartError("it has no items.parquet (trained before warm start existed) and other items")
    if len(item_ids) != sum(recorded["sizes"]):
        raise WarmStartError(
            f"items.parquet holds {len(item_ids)} items, its config {sum(recorded['sizes'])}"
        )
    return ItemSpace(item_ids, list(recorded["domains"]), list(recorded["offsets"]), list(recorded["sizes"]))


def warm_plan(
    model: Recommender,
    previous: RunDir,
    config: dict[str, Any],
    catalog: Catalog,
    hashes: dict[str, str],
    served: bool = False,
) -> WarmStart:
    """`previous`'s best weights (or with `served` the ones it serves: its refit's where it has one)
    remapped onto `model`'s items (not loaded yet). Raises WarmStartError when they do not fit; `config`
    is `previous`'s config.json."""
    from safetensors.torch import load_file

    items = previous_items(previous, config, hashes, catalog)
    weights = load_file(str(previous.served if served else previous.model), device="cpu")
    return warm_state(model, weights, items, ItemSpace.of(catalog))


def warm_start(
    model: Recommender,
    model_config: dict[str, Any],
    catalog: Catalog,
    workspace: Workspace,
    run_id: str,
    hashes: dict[str, str],
    log: Callable[..., None],
    warn: Callable[..., None],
) -> InitRecord:
    """Initialise `model` (freshly built, seeded) from the latest earlier run of the same preset when it
    fits; otherwise leave it as built. Returns what happened, with the reason for a cold start."""
    name = model_config["model"]
    previous = previous_run(workspace, name, exclude=run_id)
    if previous is None:
        return cold(f"no earlier finished {name} run in the workspace")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        config = previous.read_config()
        why = incompatibility(config["settings"], model_config)
        if why:
            return cold(f"run {previous.run_id} does not fit this model: {why}")
        plan = warm_plan(model, previous, config, catalog, hashes)
        moved = {k: round(c, 4) for k, c in plan.table_cosine.items() if c < MIN_TABLE_COSINE}
        if moved:
            manifest = EnrichOutputs(workspace).manifest()
            refit = manifest.stats.get("pca_refit") if manifest is not None else None
            return cold(
                f"the enrich item tables moved since run {previous.run_id} (mean cosine over shared items "
                f"{moved} < {MIN_TABLE_COSINE}: "
                + (f"enrich fit its PCA tables anew: {refit})" if refit else "another embedding model?)")
            )
        model.load_state_dict(plan.state, strict=True)
    except WarmStartError as exc:
        return cold(f"run {previous.run_id} does not fit this model: {exc}")
    except Exception as exc:  # a warm start is an optimisation: never fail the run for it
        model.load_state_dict(fresh)
        warn("train: warm start from %s failed, starting cold", previous.run_id, exc_info=True)
        return cold(f"warm start from {previous.run_id} failed: {type(exc).__name__}: {exc}")
    log("train: warm start from %s: %s", previous.run_id, plan.describe())
    return InitRecord(
        init="warm",
        warm_start_from=previous.run_id,
        items=plan.items,
        table_cosine={k: round(c, 6) for k, c in plan.table_cosine.items()},
    )


@dataclass
class Start:
    """How a run starts: `resume` (its own checkpoint, with the init it recorded), `warm` or `cold`."""

    how: Literal["resume", "warm", "cold"]
    init: InitRecord
    checkpoint: Checkpoint | None = None


def init_from(
    model: Recommender,
    run: RunDir,
    model_settings: dict[str, Any],
    catalog: Catalog,
    workspace: Workspace,
    hashes: dict[str, str],
    *,
    force: bool,
    warm: bool | str,
    device: torch.device | str,
    log: Callable[..., None],
    warn: Callable[..., None],
) -> Start:
    """The one place that decides how a run starts (model freshly built and seeded).

    A checkpoint in the run's own folder means *this* run was interrupted: it resumes, whatever `warm`
    says now, with the init it recorded. Only a run that starts afresh may warm-start from an *earlier*
    run (`warm` True, not `--force`, a model with trained weights); `warm` as a string is the reason it
    may not (e.g. a cold-start evaluation). Any problem means a cold start, with the reason recorded."""
    ckpt = load_checkpoint(run, device)
    if ckpt is not None:
        restore(model, ckpt)
        return Start("resume", InitRecord(**ckpt.init), ckpt)
    run.model.unlink(missing_ok=True)  # best weights of an attempt killed before its first checkpoint
    run.refit.unlink(missing_ok=True)
    if force:
        init = cold("--force")
    elif isinstance(warm, str):
        init = cold(warm)
    elif not warm:
        init = cold("train.warm_start is off")
    elif not model.trainable:
        init = cold(f"{model_settings['model']} is fitted by counting: nothing to warm-start")
    else:
        init = warm_start(model, model_settings, catalog, workspace, run.run_id, hashes, log, warn)
    if init.init == "cold":
        log("train: cold start (random init): %s", init.reason)
    return Start(init.init, init)

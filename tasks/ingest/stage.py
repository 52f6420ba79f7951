"""The ingest stage end to end: read, check, filter, split, write, with a manifest that lets an
unchanged rerun skip all of it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow.compute as pc
from pydantic import BaseModel

from bridgerec.runtime.logs import DETAIL
from bridgerec.runtime.progress import advance, progress_bar
from bridgerec.runtime.reports import TableReport
from bridgerec.runtime.runner import step
from bridgerec.storage import schemas
from bridgerec.storage.workspace import config_hash, hash_file, hash_json
from bridgerec.tasks.context import StageRun
from bridgerec.tasks.ingest.preprocess import IngestTables, preprocess
from bridgerec.tasks.ingest.settings import IngestSettings
from bridgerec.tasks.ingest.sources import input_files, read_source

STAGE = "ingest"
# Bumped when the same files and settings give different outputs (2: catalogue text cleaned at
# ingest, epoch units by magnitude, Python-literal and Parquet readers; 3: a CSV whose quotes span lines
# read by lines, CSV records numbered by line, item_quarantined, naive times in timestamps.naive_zone
# rather than the machine's zone), so old stages are rebuilt.
RULES_VERSION = 3


class IngestSummary(BaseModel):
    """What `bridgerec ingest --json` prints."""

    users: int
    items: int
    items_without_interactions: int = 0  # of `items`: new catalogue items nobody interacted with yet
    items_per_domain: dict[str, int]
    interactions: int
    overlap_users: int
    quarantined: int
    quarantined_by_reason: dict[str, int]
    filtered_by_reason: dict[str, int]
    accounting: dict[str, dict]
    kcore_rounds: int = 0
    # interactions ordered within their user by file order alone (same time and position as another)
    order_ties: int = 0
    skipped: bool = False
    seconds: float = 0.0
    workspace: str = ""

    def reports(self) -> list[TableReport]:
        """The data-quality table: rows read, kept, quarantined and filtered per table and reason."""
        rows = []
        for table, acc in self.accounting.items():
            rows.append({"table": table, "outcome": "read", "reason": "", "rows": acc["read"]})
            rows.append({"table": table, "outcome": "kept", "reason": "", "rows": acc["kept"]})
            for outcome in ("quarantined", "filtered"):
                for reason, n in acc[f"{outcome}_by_reason"].items():
                    rows.append({"table": table, "outcome": outcome, "reason": reason, "rows": n})
        description = (
            f"Ingest: {self.users} users, {self.items} items, {self.interactions} interactions, "
            f"{self.overlap_users} overlapping users, {self.quarantined} rows quarantined"
            + (" (skipped: inputs unchanged)" if self.skipped else "")
        )
        return [TableReport("ingest-data-quality", rows, description)]


def settings_hash(settings: IngestSettings) -> str:
    sections = config_hash(settings)
    return hash_json({"settings": sections, "rules_version": RULES_VERSION})


def input_hashes(settings: IngestSettings) -> dict[str, str]:
    return {role: hash_file(Path(p)) for role, p in input_files(settings).items() if Path(p).is_file()}


def summarise(tables: IngestTables) -> dict:
    per_domain = dict(
        zip(tables.domains["domain"].to_pylist(), tables.domains["n_items"].to_pylist(), strict=True)
    )
    inter, items = tables.interactions_accounting, tables.items_accounting
    quarantined_by_reason: dict[str, int] = {}
    for acc in (inter, items):
        for reason, n in acc.quarantined.items():
            quarantined_by_reason[reason] = quarantined_by_reason.get(reason, 0) + n
    filtered = {f"interactions.{k}": v for k, v in inter.filtered.items()} | {
        f"items.{k}": v for k, v in items.filtered.items()
    }
    users_by_size = tables.users["n_domains"]
    return {
        "users": tables.users.num_rows,
        "items": tables.items.num_rows,
        "items_without_interactions": items.kept_without_interactions,
        "items_per_domain": per_domain,
        "interactions": tables.interactions.num_rows,
        "overlap_users": int(pc.sum(pc.greater(users_by_size, 1)).as_py() or 0),
        "quarantined": sum(quarantined_by_reason.values()),
        "quarantined_by_reason": dict(sorted(quarantined_by_reason.items())),
        "filtered_by_reason": dict(sorted(filtered.items())),
        "accounting": {"interactions": inter.as_dict(), "items": items.as_dict()},
    }


def accounting_sentence(table: str, acc: dict) -> str:
    """`8,896 interactions read, 8,896 kept, 0 quarantined, 0 filtered` (+ the reasons) for one table's
    row accounting (read = kept + quarantined + filtered)."""
    text = f"{acc['read']:,} {table} read, {acc['kept']:,} kept"
    if acc.get("kept_without_interactions"):
        text += f" ({acc['kept_without_interactions']:,} without interactions)"
    text += f", {acc['quarantined']:,} quarantined, {acc['filtered']:,} filtered"
    for outcome in ("quarantined", "filtered"):
        reasons = acc.get(f"{outcome}_by_reason") or {}
        if reasons:
            text += f"; {outcome}: " + ", ".join(f"{r} {n:,}" for r, n in reasons.items())
    return text


@step("ingest")
def run_ingest(run: StageRun[IngestSettings]) -> IngestSummary:
    """Ingest the configured source into `workspace/ingest/`; skip when inputs and config are unchanged."""
    settings, workspace, threads, force, log = run.settings, run.workspace, run.threads, run.force, run.log
    started = time.perf_counter()
    hashes = input_hashes(settings)
    chash = settings_hash(settings)
    existing = workspace.current(
        STAGE, schema_version=schemas.INGEST_SCHEMA_VERSION, config_hash=chash, input_hashes=hashes
    )
    if not force and existing is not None and len(hashes) == len(input_files(settings)):
        log.info("ingest: inputs and config unchanged, skipping (workspace %s)", workspace.stage_dir(STAGE))
        return IngestSummary(
            **existing.stats,
            skipped=True,
            seconds=time.perf_counter() - started,
            workspace=str(workspace.root),
        )

    with progress_bar("ingest", total=7) as bar:
        advance(bar, 0, "ingest: reading raw files")
        raw = read_source(settings)
        log.info(
            "ingest: read %s item rows and %s interaction rows (%s + %s unparseable)",
            f"{raw.items.table.num_rows:,}",
            f"{raw.interactions.table.num_rows:,}",
            f"{len(raw.items.rejects):,}",
            f"{len(raw.interactions.rejects):,}",
            extra=DETAIL,
        )
        advance(bar)
        tables = preprocess(raw, settings, threads, progress=lambda step: advance(bar, 1, f"ingest: {step}"))
        stats = summarise(tables)
        advance(bar, 1, "ingest: writing Parquet")
        with workspace.building(STAGE) as stage:
            stage.write_table("domains", tables.domains, schemas.DOMAINS)
            stage.write_table("items", tables.items, schemas.ITEMS)
            stage.write_table("users", tables.users, schemas.USERS)
            stage.write_table("interactions", tables.interactions, schemas.INTERACTIONS)
            stage.write_table("sequences", tables.sequences, schemas.SEQUENCES)
            stage.write_table("quarantine", tables.quarantine, schemas.QUARANTINE)
            stage.finish(
                schema_version=schemas.INGEST_SCHEMA_VERSION,
                config_hash=chash,
                input_hashes=hashes,
                stats=stats | {"kcore_rounds": tables.kcore_rounds, "order_ties": tables.order_ties},
            )
    for table, acc in stats["accounting"].items():
        log.info("ingest: %s", accounting_sentence(table, acc))
    if stats["quarantined"]:
        reasons = ", ".join(f"{r}: {n:,}" for r, n in stats["quarantined_by_reason"].items())
        log.warning(
            "ingest: %s rows quarantined (%s); they are in %s",
            f"{stats['quarantined']:,}",
            reasons,
            workspace.stage_dir(STAGE) / "quarantine.parquet",
        )
    if tables.order_ties:
        # Day-granular timestamps tie often; a given position should not: there it is worth a warning.
        log.log(
            logging.WARNING if raw.has_position else logging.INFO,
            "ingest: %s interactions share their %s with another of the same user's; their order (and so "
            "which is a user's test or validation target) is the files' order",
            f"{tables.order_ties:,}",
            "position" if raw.has_position and not raw.has_timestamp else "time and position",
        )
    return IngestSummary(
        **stats,
        kcore_rounds=tables.kcore_rounds,
        order_ties=tables.order_ties,
        seconds=time.perf_counter() - started,
        workspace=str(workspace.root),
    )

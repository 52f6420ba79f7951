"""The night's figures, kept as one JSON file per night (WORKSPACE/nights/<night_id>.json) so a report can
be rebuilt for any kept night, also after retention purged its lists from the warehouse.

A record is the nightly flow's summary (stages, timings, data checks, gate, list stability) plus what
only the report needs, each computed at night time: validation NDCG@10 per domain of tonight's run and of
the popularity list, the churn histogram and the most recommended items of tonight's lists, and a few
example users with profile, recent history and lists. A figure that cannot be computed is left out with
the reason under `figures.missing`; a report must never fail a night.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridgerec.runtime.errors import InputError
from bridgerec.runtime.logs import DETAIL, get_logger
from bridgerec.storage.files import write_json_atomic
from bridgerec.storage.warehouse import WarehouseError, user_recommendations
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.enrich import EnrichOutputs
from bridgerec.tasks.ingest import IngestOutputs
from bridgerec.tasks.quality import churn_histogram, top_items
from bridgerec.tasks.report.settings import ReportSettings
from bridgerec.tasks.train import Tonight, TrainSettings, popularity_validation_by_domain

NIGHTS_DIR = "nights"


class ReportMissing(InputError):
    """No night record to build a report from (or not the one asked for); the message says which."""


def night_file(workspace: Path, night_id: str) -> Path:
    return Path(workspace) / NIGHTS_DIR / f"{night_id}.json"


def _valid_by_domain(summary: dict, workspace: Workspace, train: TrainSettings) -> dict[str, dict]:
    """{domain | "overall": {"model": tonight's run, "popularity": the floor}}: full-ranking validation
    NDCG@10 on tonight's validation split."""
    full = ((summary["stages"].get("train") or {}).get("valid") or {}).get("full") or {}
    pop = popularity_validation_by_domain(Tonight.load(workspace, train))
    out = {}
    for domain in sorted(set(full) | set(pop)):
        out[domain] = {"model": (full.get(domain) or {}).get("ndcg@10"), "popularity": pop.get(domain)}
    return out


def _history(workspace: Workspace, user_ids: list[str], n: int) -> dict[str, list[dict]]:
    """Each user's `n` most recent items (title, domain), newest first, from the ingest output."""
    if not user_ids:
        return {}
    ingest = IngestOutputs(workspace)
    seqs = ingest.table("sequences", columns=["user_id", "global_ids"]).to_pylist()
    items = ingest.table("items", columns=["global_id", "item_id", "domain", "title"]).to_pylist()
    by_gid = {r["global_id"]: r for r in items}
    wanted = set(user_ids)
    out = {}
    for row in seqs:
        if row["user_id"] in wanted:
            last = [by_gid[g] for g in reversed(row["global_ids"][-n:]) if g in by_gid]
            out[row["user_id"]] = [
                {"item_id": r["item_id"], "domain": r["domain"], "title": r["title"]} for r in last
            ]
    return out


def _examples(workspace: Workspace, warehouse: Path, run_id: str, settings: ReportSettings) -> list[dict]:
    """The first `settings.examples` users (by id) with an LLM profile, else the first users: their
    profile, interests, recent history and the top `list_length` of each domain's list in `run_id`."""
    if settings.examples == 0:
        return []
    try:
        profiles = EnrichOutputs(workspace).profile_texts()
    except ValueError:  # unreadable profiles: users without one
        profiles = None
    profiled = sorted(profiles["user_id"].to_pylist()) if profiles is not None else []
    users = profiled or sorted(
        IngestOutputs(workspace).table("users", columns=["user_id"])["user_id"].to_pylist()
    )
    out: list[dict[str, Any]] = []
    for user_id in users:
        if len(out) >= settings.examples:
            break
        try:
            r = user_recommendations(warehouse, user_id, None, run_id, history=settings.list_length)
        except WarehouseError:
            continue
        r["recommendations"] = {d: rows[: settings.list_length] for d, rows in r["recommendations"].items()}
        r["history"] = [
            {"item_id": h["item_id"], "domain": h["domain"], "title": h["title"]} for h in r["history"] or []
        ]
        out.append(r)
    # A run published without its history (publish.history off): tonight's ingest output has it.
    history = _history(workspace, [r["user_id"] for r in out if not r["history"]], settings.list_length)
    for r in out:
        r["history"] = r["history"] or history.get(r["user_id"], [])
    return out


def collect_night(
    summary: dict,
    workspace: Workspace,
    warehouse: Path,
    settings: ReportSettings,
    train: TrainSettings,
    started_at: datetime,
) -> dict:
    """The night's record: `summary` (a copy) plus `started_at`, `recorded_at` and `figures`."""
    log = get_logger()
    record = copy.deepcopy(summary)
    record["started_at"] = started_at.isoformat()
    record["recorded_at"] = datetime.now(UTC).isoformat()
    figures: dict[str, Any] = {"missing": {}}
    serving = summary.get("published_run_id")
    publish = summary["stages"].get("publish") or {}
    # A skipped publish (the serving run unchanged) wrote no lists: nothing churned, whatever came before.
    published_tonight = None if publish.get("skipped") else publish.get("run_id")
    stability: list[dict[str, Any]] = summary.get("list_stability") or []
    previous = stability[0].get("previous_run_id") if stability else None
    steps = {
        "valid_by_domain": lambda: (
            _valid_by_domain(summary, workspace, train) if summary["stages"].get("train") else None
        ),
        "churn_histogram": lambda: (
            churn_histogram(warehouse, published_tonight, previous) if published_tonight else None
        ),
        "top_items": lambda: top_items(warehouse, serving) if serving else None,
        "examples": lambda: _examples(workspace, warehouse, serving, settings) if serving else None,
    }
    for name, step in steps.items():
        try:
            value = step()
        except Exception as exc:  # a report never fails a night: say what is missing and why
            figures["missing"][name] = f"{type(exc).__name__}: {exc}"
            log.warning("report: no %s tonight: %s", name.replace("_", " "), exc)
            continue
        if value is None:
            figures["missing"][name] = (
                "this night did not get that far"
                if name != "churn_histogram"
                else (
                    "the serving lists are unchanged tonight (the published run is the best on these inputs)"
                    if publish.get("skipped")
                    else "nothing published tonight"
                )
            )
        else:
            figures[name] = value
    record["figures"] = figures
    log.info("report: figures of night %s collected", summary["night_id"], extra=DETAIL)
    return record


def save_night(workspace: Path, record: dict, keep: int) -> Path:
    """Write the record (atomically) and delete all but the newest `keep` records."""
    path = write_json_atomic(record, night_file(workspace, record["night_id"]))
    records = sorted(path.parent.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    for old in records[: max(len(records) - keep, 0)]:
        old.unlink(missing_ok=True)
    return path


def load_nights(workspace: Path) -> list[dict]:
    """Every kept night record, oldest first (by start time)."""
    folder = Path(workspace) / NIGHTS_DIR
    records = []
    for path in folder.glob("*.json") if folder.exists() else []:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            get_logger().warning("report: night record %s unreadable (%s): left out", path, exc)
    return sorted(records, key=lambda r: (r.get("started_at") or "", r["night_id"]))


def select_nights(workspace: Path, night_id: str | None, n: int) -> tuple[dict, list[dict]]:
    """(the night to report, the nights of its trends: the `n` newest up to and including it)."""
    records = load_nights(workspace)
    if not records:
        raise ReportMissing(
            f"no night records in {Path(workspace) / NIGHTS_DIR}: run the nightly pipeline first "
            "(`bridgerec run`)"
        )
    ids = [r["night_id"] for r in records]
    if night_id is None:
        i = len(records) - 1
    elif night_id in ids:
        i = ids.index(night_id)
    else:
        raise ReportMissing(
            f"night {night_id!r} has no record in {Path(workspace) / NIGHTS_DIR}; "
            + (f"the newest 5 of the {len(ids)} kept: " if len(ids) > 5 else "kept: ")
            + ", ".join(ids[-5:])
        )
    return records[i], records[max(0, i + 1 - n) : i + 1]

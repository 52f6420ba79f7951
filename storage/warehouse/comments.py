"""What each table, view and column of the warehouse means, written into the file as DuckDB comments
(`COMMENT ON`), so analysts' tools show it where they look: DBeaver's and DataGrip's column tooltips,
`SELECT column_name, comment FROM duckdb_columns() WHERE table_name = 'recommendations'`,
`SELECT view_name, comment FROM duckdb_views()`. docs/publish.md ("The warehouse") says the same at
length; a new column gets its line here (a test checks that every column of every view and table has one).

`apply_comments` runs at every change of the file, after the views are rewritten (`CREATE OR REPLACE
VIEW` drops a view's comments). A column's comment is `COLUMNS[(object, column)]`, else that of the
table the view shows (`AS_TABLE`), else `COLUMNS[column]` (the meaning shared by every object with that
column).
"""

from __future__ import annotations

import duckdb

from bridgerec.storage.warehouse.views import sql_literal

# Table or view -> what one row is.
OBJECTS: dict[str, str] = {
    "runs": "Every published run (kind 'publish', seq = publish order) and every night of the nightly flow "
    "(kind 'night'); docs/publish.md and docs/nightly.md",
    "latest_run": "The newest completed, retained published run: the one `latest_*` views serve",
    "nights": "The nightly flow's nights (`runs` with kind 'night'): status, the gate's decision and figures",
    "metrics": "Each published run's final evaluation: one row per split, protocol, domain, user group and "
    "metric (docs/train.md)",
    "latest_metrics": "`metrics` of the latest run",
    "recommendations": "Top-k per user and domain of every retained run (filter on run_id for time travel)",
    "latest_recommendations": "Top-k per user and domain of the latest run, with the item's title",
    "serving": "The same lists as `recommendations`, one row per user and domain (item_ids best first)",
    "latest_serving": "`serving` of the latest run",
    "user_profiles": "The LLM profile each retained run used for a user",
    "latest_user_profiles": "`user_profiles` of the latest run",
    "items": "The catalogue: the latest metadata of every item ever published",
    "interactions": "Each user's history as each retained run read it (the ingested interactions its lists "
    "were computed from), one row per interaction",
    "latest_interactions": "`interactions` of the latest run",
    "parts": "Every Parquet part a publish wrote (the views read the ones not dropped)",
    "data_checks": "The nightly data checks: tonight's counts against the last completed night's, per night, "
    "entity and domain",
    "list_stability": "How much each published list changed since the previously published run, and coverage, "
    "per night and domain",
    "schema_migrations": "The schema migrations applied to this file",
    "warehouse_info": "Facts about the file (the folder its views were written in)",
}

# Column -> meaning, shared by every object with that column; (object, column) -> where it differs.
COLUMNS: dict[str | tuple[str, str], str] = {
    "run_id": "The published run's id (= the train run's, WORKSPACE/runs/<id>); in `runs` also a night's id "
    "(night-<flow run id>)",
    "user_id": "The user's id in the source data",
    "item_id": "The item's id in the source data",
    "domain": "The item's domain (the recommended item's, for lists)",
    "rank": "1 = best; ranks 1..k within a user's list for a domain",
    "score": "The model's score of the item for the user (higher = better; comparable within one list only)",
    "because_item_id": "The item of the user's history closest to this one in the model's text space (cosine): "
    "why it is on the list; NULL for models without a text space (pop) or items without text",
    "because_score": "Cosine similarity of the item and because_item_id in the text space, in [-1, 1]; what "
    "is high depends on the catalogue and the embedding model: because_percentile says it against the domain",
    "because_percentile": "Percent of 64 reference items of the domain less close to this user's history than "
    "the item (ties half): about 50 = no closer than chance, 100 = closer than all; NULL before this column",
    "title": "The item's title from the catalogue",
    "item_ids": "The list's item ids, best first",
    "scores": "The list's scores, non-increasing",
    "profile_text": "The LLM-written profile of the user's interests",
    "cluster_summaries": "The profile's per-interest summaries (one per cluster of the user's history)",
    "llm_model": "The language model that wrote the profile",
    "brand": "The item's brand, as ingested",
    "categories": "The item's categories, as ingested",
    "price": "The item's price as the text ingested",
    "price_amount": "price as a number where it is one amount ('$1,299.00' = 1299.0); NULL for ranges, "
    "decimal commas or words",
    "updated_run_id": "The run that last published this item's metadata",
    "seq": "Publish order of the completed runs (NULL for nights)",
    "status": "running / completed / failed / crashed",
    "started_at": "UTC start (a night: its first attempt; a published run: the publish)",
    "finished_at": "UTC end (a night: its last attempt; a published run: the publish)",
    "model": "The recommender (train.model preset, e.g. llm4cdsr-hybrid, pop)",
    "train_run_id": "The train run behind the lists (WORKSPACE/runs/<id> and the train leaderboard)",
    "config_hash": "Hash of the settings the run was trained with",
    "inputs_hash": "Hash of the input files the run was trained on",
    "k": "List length: items per user and domain",
    "n_users": "Users with lists",
    "n_items": "Items in the catalogue the run scored",
    "n_interactions": "Interactions the run was trained on",
    "n_domains": "Domains",
    "n_recommendations": "Rows the run published in `recommendations`",
    "index_path": "Folder of the run's FAISS indexes",
    "message": "Why a night failed or what it did; NULL when there is nothing to say",
    "purged_at": "When retention took the run's rows out of the views (its row and metrics stay)",
    "kind": "publish (a published run) or night (a run of the nightly flow)",
    "flow_run_id": "The Prefect flow run of the night",
    "published_run_id": "The published run (runs row of kind publish) serving after the night",
    "attempts": "Starts of the night (a Prefect retry of the same flow run adds one)",
    "gate": "The quality gate's decision: passed / refused / first / unchanged / off (docs/nightly.md)",
    "gate_message": "The gate's reason, with its figures",
    "valid_ndcg10": "Validation NDCG@10, full ranking: a night's run as the gate scored it; a published run's "
    "own (from `metrics`)",
    "published_valid_ndcg10": "The gate's score of the run that was serving before the night",
    "popularity_valid_ndcg10": "The gate's score of the most-popular list (the floor every model must beat)",
    "host": "The machine that ran the night",
    "pid": "The process that ran the night",
    "process_started_at": "When that process started (with pid: tells a crashed night from a running one)",
    "write_id": "The publish attempt that wrote the parts",
    "index_kind": "Per domain, the FAISS index searched (flat = exact)",
    "index_recall": "The lowest recall@k of an approximate index; NULL for exact search",
    "data_bytes": "Bytes of the run's Parquet parts",
    "n_parts": "Number of the run's Parquet parts",
    "n_history": "Rows the run published in `interactions` (each user's history); NULL: published without "
    "them (publish.history off, or before histories were published), so its history views read empty",
    (
        "metrics",
        "split",
    ): "valid / test, or a cold-start split (test_new_items, test_warm_items, test_untouched)",
    ("metrics", "protocol"): "full (ranked against the whole domain) or sampled (against 100 negatives)",
    ("metrics", "domain"): "A target domain, or 'all'",
    ("metrics", "user_group"): "all / overlap / single / short / long",
    ("metrics", "metric"): "hr@K, ndcg@K; under full also coverage@10, top1pct_share@10, pop_percentile@10, "
    "new_item_share@10",
    ("metrics", "value"): "The metric's value",
    ("metrics", "users"): "Users the value is averaged over",
    ("metrics", "model"): "The recommender evaluated",
    ("parts", "kind"): "recommendations / serving / user_profiles / items / interactions",
    ("interactions", "position"): "The interaction's place in the user's history, 0 = the first (time order, "
    "the order the model reads)",
    ("interactions", "domain"): "The item's domain",
    (
        "interactions",
        "timestamp",
    ): "When it happened (UTC), as ingested; NULL for sources ordered by position",
    ("interactions", "rating"): "The rating as ingested (NULL where the source has none)",
    ("parts", "shard"): "The user shard that wrote the part",
    ("parts", "root"): "Where the parts live (a folder beside the file, or s3://...)",
    ("parts", "path"): "The part's path under root",
    ("parts", "rows"): "Rows in the part",
    ("parts", "bytes"): "Bytes of the part",
    ("parts", "written_at"): "When the part was written (UTC)",
    ("parts", "dropped_at"): "When no view read the part any more (retention); NULL while served",
    ("data_checks", "night_id"): "The night (runs.run_id of kind night)",
    ("data_checks", "checked_at"): "When the check ran (UTC)",
    ("data_checks", "entity"): "interactions / users / items",
    ("data_checks", "count"): "Tonight's count",
    ("data_checks", "previous"): "The last completed night's count",
    ("data_checks", "new"): "Keys tonight that were not there last night",
    ("data_checks", "gone"): "Keys last night that are not there tonight",
    ("data_checks", "share_new"): "new / tonight's count",
    ("data_checks", "share_gone"): "gone / last night's count",
    ("data_checks", "change"): "(count - previous) / previous",
    ("data_checks", "passed"): "false when the count fell by more than checks.max_drop: the night stopped",
    ("list_stability", "night_id"): "The night (runs.run_id of kind night)",
    ("list_stability", "run_id"): "The run published that night",
    ("list_stability", "previous_run_id"): "The run published before it, compared with",
    ("list_stability", "users"): "Users with a list in the domain",
    ("list_stability", "users_compared"): "Users with a list in both runs",
    ("list_stability", "mean_changed"): "Mean share of a user's top-k not in their previous list",
    ("list_stability", "p10_changed"): "10th percentile of that share over the users compared",
    ("list_stability", "p50_changed"): "Median of that share",
    ("list_stability", "p90_changed"): "90th percentile of that share",
    ("list_stability", "distinct_items"): "Distinct items recommended in the domain",
    ("list_stability", "catalogue_items"): "Items of the domain",
    ("list_stability", "coverage"): "distinct_items / catalogue_items",
    ("list_stability", "top_item_id"): "The most recommended item",
    ("list_stability", "top_item_share"): "Share of the lists holding it",
    ("list_stability", "top10_slot_share"): "Share of all slots taken by the 10 most recommended items",
    ("schema_migrations", "version"): "Migration number (storage/warehouse/schema.py MIGRATIONS)",
    ("schema_migrations", "name"): "What the migration did",
    ("schema_migrations", "applied_at"): "When it was applied (UTC)",
    ("warehouse_info", "key"): "The fact's name",
    ("warehouse_info", "value"): "Its value",
}


# Views whose columns are those of a table: they take its column comments.
AS_TABLE = {
    "latest_run": "runs",
    "nights": "runs",
    "latest_metrics": "metrics",
    "latest_recommendations": "recommendations",
    "latest_serving": "serving",
    "latest_user_profiles": "user_profiles",
    "latest_interactions": "interactions",
}


def column_comment(obj: str, column: str) -> str | None:
    """The comment of `column` of table or view `obj` (None: none written)."""
    base = AS_TABLE.get(obj, obj)
    return COLUMNS.get((obj, column)) or COLUMNS.get((base, column)) or COLUMNS.get(column)


def apply_comments(con: duckdb.DuckDBPyConnection) -> None:
    """COMMENT ON every table and view of OBJECTS that exists and on each of its columns (a write: inside
    the change's transaction)."""
    found = con.execute(
        "SELECT table_name, column_name, table_name IN (SELECT view_name FROM duckdb_views() WHERE NOT internal) "
        "FROM duckdb_columns() WHERE NOT internal AND schema_name = 'main' AND database_name = current_database()"
    ).fetchall()
    kinds = {table: "VIEW" if is_view else "TABLE" for table, _, is_view in found}
    for obj, kind in kinds.items():
        if obj in OBJECTS:
            con.execute(f"COMMENT ON {kind} {obj} IS {sql_literal(OBJECTS[obj])}")
    for obj, column, _ in found:
        text = column_comment(obj, column) if obj in OBJECTS else None
        if text is not None:
            con.execute(f"COMMENT ON COLUMN {obj}.{column} IS {sql_literal(text)}")

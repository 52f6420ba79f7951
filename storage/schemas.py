"""Arrow schemas of every table a later stage or an analyst reads, written down once.

Ids at the edges are the source's strings (`user_id`, `item_id`); dense integer ids (`user_idx`,
`global_id`, `local_id`) exist for the model and are always stored beside them.
"""

from __future__ import annotations

import pyarrow as pa

INGEST_SCHEMA_VERSION = 1

# One row per domain, in the order of the global id space: global_id = global_offset + local_id.
DOMAINS = pa.schema(
    [
        pa.field("domain", pa.string(), nullable=False),
        pa.field("domain_idx", pa.int8(), nullable=False),
        pa.field("n_items", pa.int32(), nullable=False),
        pa.field("global_offset", pa.int32(), nullable=False),
    ]
)

# The kept catalogue: items with at least one kept interaction. Ids 0 are padding, never used here.
ITEMS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("domain_idx", pa.int8(), nullable=False),
        pa.field("global_id", pa.int32(), nullable=False),  # 1..n_items over all domains
        pa.field("local_id", pa.int32(), nullable=False),  # 1..n_items(domain)
        pa.field("title", pa.string(), nullable=False),
        pa.field("brand", pa.string()),
        pa.field("categories", pa.string()),
        pa.field("price", pa.string()),
        pa.field("description", pa.string()),
        pa.field("attributes", pa.string()),  # JSON object of any other text columns of the source
    ]
)

USERS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("user_idx", pa.int32(), nullable=False),  # 0..n_users-1
        pa.field("n_interactions", pa.int32(), nullable=False),
        pa.field("n_domains", pa.int8(), nullable=False),  # domains touched by the whole sequence
    ]
)

# Every kept interaction, in each user's mixed chronological order.
INTERACTIONS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("global_id", pa.int32(), nullable=False),
        pa.field("local_id", pa.int32(), nullable=False),
        pa.field("domain_idx", pa.int8(), nullable=False),
        pa.field("seq_pos", pa.int32(), nullable=False),  # 0-based position in the mixed sequence
        pa.field("timestamp", pa.timestamp("us", tz="UTC")),  # null for position-ordered sources
        pa.field("rating", pa.float32()),
        pa.field("split", pa.string(), nullable=False),  # train | valid | test (leave-one-out)
    ]
)

# One row per user: the whole mixed sequence. The last element is the test target, the one before
# it the validation target, the rest is the training prefix.
SEQUENCES = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("global_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("local_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("domain_idx", pa.list_(pa.int8()), nullable=False),
    ]
)

# Rows that could not be used, with the reason; `row` holds the raw fields (JSON) or the raw line.
QUARANTINE = pa.schema(
    [
        pa.field("table", pa.string(), nullable=False),  # items | interactions
        pa.field("file", pa.string(), nullable=False),
        pa.field("record", pa.int64()),  # 1-based data record (line for JSONL/CSV when known)
        pa.field("reason", pa.string(), nullable=False),
        pa.field("row", pa.string()),
    ]
)

# --- train stage -------------------------------------------------------------------------------------
TRAIN_SCHEMA_VERSION = 1

# WORKSPACE/runs/<run_id>/metrics.parquet, long format. Training history: split "train" (metric "loss",
# "rec", "reg", "user", "seconds") and split "valid" per epoch (sampled ndcg@10/hr@10). Final evaluation
# of the best weights: split valid|test, protocol sampled|full, group overall | domain:<name> | overlap |
# single | short | long, metric hr@k / ndcg@k for k in 5, 10, 20.
TRAIN_METRICS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),  # the best epoch for the final evaluation
        pa.field("split", pa.string(), nullable=False),
        pa.field("protocol", pa.string(), nullable=False),  # sampled | full | train
        pa.field("group", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("users", pa.int64()),
    ]
)

# WORKSPACE/train/runs.parquet: one row per finished run on the workspace (the leaderboard).
TRAIN_RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("input_hash", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("epochs", pa.int32(), nullable=False),
        pa.field("best_epoch", pa.int32(), nullable=False),
        pa.field("epoch_seconds", pa.float64()),
        pa.field("valid_ndcg10", pa.float64()),
        pa.field("valid_full_ndcg10", pa.float64()),  # full-ranking validation (selects the best run)
        pa.field("test_hr10", pa.float64()),
        pa.field("test_ndcg10", pa.float64()),
        pa.field("test_full_hr10", pa.float64()),
        pa.field("test_full_ndcg10", pa.float64()),
        # How the run started (null for runs recorded before warm start existed, which were all cold).
        pa.field("init", pa.string()),  # warm | cold
        pa.field("warm_start_from", pa.string()),  # the run whose weights initialised it
    ]
)

# WORKSPACE/runs/<run_id>/items.parquet: the run's item id map (warm start remaps item rows by item_id).
TRAIN_RUN_ITEMS = pa.schema(
    [
        pa.field("global_id", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
    ]
)

# --- enrich stage ------------------------------------------------------------------------------------
# WORKSPACE/enrich/. Vector widths depend on the model and the settings, so those schemas are functions.
ENRICH_SCHEMA_VERSION = 1


def vector_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def item_embeddings_schema(dim: int) -> pa.Schema:
    """item_embeddings.parquet: the raw model vector of every embedded item (unit norm)."""
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("domain", pa.string(), nullable=False),
            pa.field("text_hash", pa.string(), nullable=False),  # blake2b-64 of the item text
            pa.field("model_id", pa.string(), nullable=False),  # name@fingerprint of the weights
            pa.field("vector", vector_type(dim), nullable=False),
        ]
    )


def item_vectors_schema(global_dim: int, local_dim: int) -> pa.Schema:
    """item_vectors.parquet: the frozen tables of the model, global PCA and per-domain PCA. Every ingest
    item has a row; an item whose embedding failed has zero vectors (and a row in errors.parquet)."""
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("domain", pa.string(), nullable=False),
            pa.field("global_vector", vector_type(global_dim), nullable=False),
            pa.field("local_vector", vector_type(local_dim), nullable=False),
        ]
    )


def profiles_schema(dim: int) -> pa.Schema:
    """profiles.parquet: one row per user with a profile (capped and failed users are absent)."""
    return pa.schema(
        [
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("history_hash", pa.string(), nullable=False),  # of the cluster groups of titles
            pa.field("cluster_summaries", pa.list_(pa.string()), nullable=False),
            pa.field("profile_text", pa.string(), nullable=False),
            pa.field("llm_model_id", pa.string(), nullable=False),
            pa.field("embed_model_id", pa.string(), nullable=False),
            pa.field("prompt_version", pa.string(), nullable=False),
            pa.field("vector", vector_type(dim), nullable=False),
        ]
    )


# errors.parquet: every item or user the stage could not finish, with why. Nothing is dropped silently.
ENRICH_ERRORS = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # item | profile
        pa.field("key", pa.string(), nullable=False),  # item_id | user_id
        pa.field("step", pa.string(), nullable=False),  # embed | analyze | summarize | embed_profile
        pa.field("reason", pa.string(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
    ]
)

# item_clusters.parquet: the K-means cluster of each item's raw vector (-1: no vector), for profiles.
ITEM_CLUSTERS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("cluster", pa.int16(), nullable=False),
    ]
)


# --- publish stage -----------------------------------------------------------------------------------
# The warehouse's DuckDB tables (runs, recommendations, metrics, items, user_profiles and the latest_*
# views) are written down once, as the numbered migrations in storage/warehouse.py.

# The rows the publish stage hands to the warehouse for `recommendations` (run_id is added there).
RECOMMENDATION_ROWS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),  # 1..k
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # non-increasing with rank
    ]
)

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
        pa.field("test_hr10", pa.float64()),
        pa.field("test_ndcg10", pa.float64()),
        pa.field("test_full_hr10", pa.float64()),
        pa.field("test_full_ndcg10", pa.float64()),
    ]
)

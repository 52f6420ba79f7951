"""The publish stage: the best trained run's vectors -> FAISS top-k per user and domain, scored in user
shards that each write their own Parquet parts -> the night registered in the DuckDB warehouse (one small
atomic swap) and per-run indexes.

Its face: `PublishSettings`, `run_publish` -> `PublishSummary`, `PublishError` (a missing or
inconsistent input), the shard function and its plan (`score_shard`, `ShardPlan`, `PublishShard`,
`ShardResult`) and the other steps the stage's runner calls (`plan_publish`, `register_publish`), and
`candidate_lists` (the rows a publish would write, written nowhere: for the quality gate). The warehouse
itself is read through `bridgerec.storage.warehouse`.
"""

# The face loads lazily (SPEC 1, `lazy_loader`): a name's module is imported on first use, so that
# `import bridgerec.config` (every command, `--help` included) reads the settings without torch, faiss,
# vLLM or matplotlib. The names and their modules are in __init__.pyi, which type checkers read.
import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)

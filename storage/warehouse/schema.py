"""The warehouse file's schema: numbered migrations, applied in order, each recorded in schema_migrations.

The DuckDB file holds the small tables (runs, metrics, nights' checks and stability, the parts
catalogue) and the views analysts query; the night's rows are Parquet parts the views read
(docs/publish.md, "The warehouse"). A file from a newer bridgerec is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb

from bridgerec.runtime.errors import InputError


class WarehouseError(InputError):
    """The warehouse cannot be used as asked (missing, damaged, held by another process, newer schema);
    the message says why and what to do."""


class WarehouseDamaged(WarehouseError):
    """The warehouse file is damaged (a full disk, a bad sector, a copy cut short): DuckDB finds blocks
    that fail their checksum or metadata it cannot read. Readers and publish refuse it, changing nothing;
    the message says how to replace it."""


@dataclass(frozen=True)
class Migration:
    """One numbered schema change. `move`, when set, runs first in the same transaction: Python that moves
    rows out of the file (into Parquet parts), so it needs a `MoveContext`; without one, `migrate` stops
    before it (readers and night records never move data; the next publish does)."""

    version: int
    name: str
    sql: str
    move: Callable[[duckdb.DuckDBPyConnection, Any], None] | None = None


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "core tables",
        """
        CREATE TABLE runs (
            run_id            VARCHAR PRIMARY KEY,
            seq               BIGINT,        -- publish order (1, 2, ...); NULL until the run completes
            status            VARCHAR NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
            started_at        TIMESTAMPTZ NOT NULL,
            finished_at       TIMESTAMPTZ,
            model             VARCHAR,
            train_run_id      VARCHAR,       -- the trained model's run folder (WORKSPACE/runs/<id>)
            config_hash       VARCHAR,       -- publish settings
            inputs_hash       VARCHAR,       -- config + ingest/enrich/train outputs: equal = nothing new
            k                 INTEGER,
            n_users           BIGINT,
            n_items           BIGINT,
            n_interactions    BIGINT,
            n_domains         INTEGER,
            n_recommendations BIGINT,
            index_path        VARCHAR,       -- folder of this run's FAISS indexes
            message           VARCHAR,       -- why a run failed
            purged_at         TIMESTAMPTZ    -- recommendations, profiles and indexes dropped by retention
        );
        CREATE TABLE recommendations (
            run_id  VARCHAR NOT NULL,
            user_id VARCHAR NOT NULL,
            domain  VARCHAR NOT NULL,
            rank    SMALLINT NOT NULL,       -- 1..k
            item_id VARCHAR NOT NULL,
            score   FLOAT NOT NULL           -- the model's fused score; non-increasing with rank
        );
        CREATE TABLE metrics (
            run_id     VARCHAR NOT NULL,
            model      VARCHAR NOT NULL,
            split      VARCHAR NOT NULL,     -- valid | test
            protocol   VARCHAR NOT NULL,     -- sampled (100 negatives) | full (whole target domain)
            domain     VARCHAR NOT NULL,     -- the target domain, or 'all'
            user_group VARCHAR NOT NULL,     -- 'all', or overlap | single | short | long
            metric     VARCHAR NOT NULL,     -- hr@k | ndcg@k
            value      DOUBLE NOT NULL,
            users      BIGINT                -- users the figure averages over
        );
        CREATE TABLE items (
            item_id        VARCHAR PRIMARY KEY,
            domain         VARCHAR NOT NULL,
            title          VARCHAR NOT NULL,
            brand          VARCHAR,
            categories     VARCHAR,
            price          VARCHAR,
            updated_run_id VARCHAR NOT NULL  -- the last run whose catalogue held the item
        );
        CREATE TABLE user_profiles (
            run_id       VARCHAR NOT NULL,
            user_id      VARCHAR NOT NULL,
            profile_text VARCHAR NOT NULL
        );
        """,
    ),
    Migration(
        2,
        "latest views",
        """
        CREATE VIEW latest_run AS
            SELECT * FROM runs WHERE status = 'completed' AND purged_at IS NULL ORDER BY seq DESC LIMIT 1;
        CREATE VIEW latest_recommendations AS
            SELECT r.run_id, r.user_id, r.domain, r.rank, r.item_id, r.score, i.title
            FROM recommendations r LEFT JOIN items i ON i.item_id = r.item_id
            WHERE r.run_id = (SELECT run_id FROM latest_run);
        CREATE VIEW latest_metrics AS
            SELECT * FROM metrics WHERE run_id = (SELECT run_id FROM latest_run);
        CREATE VIEW latest_user_profiles AS
            SELECT * FROM user_profiles WHERE run_id = (SELECT run_id FROM latest_run);
        """,
    ),
    Migration(
        3,
        "profile interests",
        """
        -- The hierarchical profile's per-interest summaries and the LLM that wrote it.
        ALTER TABLE user_profiles ADD COLUMN cluster_summaries VARCHAR[];
        ALTER TABLE user_profiles ADD COLUMN llm_model VARCHAR;
        CREATE OR REPLACE VIEW latest_user_profiles AS
            SELECT * FROM user_profiles WHERE run_id = (SELECT run_id FROM latest_run);
        """,
    ),
    Migration(
        4,
        "nights in runs",
        """
        -- One row per night of the nightly flow (kind 'night', run_id 'night-<Prefect flow run id>') beside
        -- the published runs (kind 'publish', run_id = the train run id): 'running' when the night starts,
        -- its final state when it ends, also after a Prefect retry (same flow run, same row).
        -- Joins: night.flow_run_id = Prefect's flow run id; night.train_run_id = WORKSPACE/runs/<id>;
        -- night.published_run_id = runs.run_id of the published run serving after the night.
        ALTER TABLE runs ADD COLUMN kind VARCHAR DEFAULT 'publish';
        UPDATE runs SET kind = CASE WHEN seq IS NULL AND starts_with(run_id, 'nightly-') THEN 'night'
                                    ELSE 'publish' END;
        ALTER TABLE runs ADD COLUMN flow_run_id VARCHAR;       -- the Prefect flow run of a night
        ALTER TABLE runs ADD COLUMN published_run_id VARCHAR;  -- night: the run serving after it
        ALTER TABLE runs ADD COLUMN attempts INTEGER;          -- night: starts, retries included
        -- The quality gate of a night (docs/nightly.md, "Quality gate"): passed | refused | override |
        -- first (nothing published yet) | unchanged (same train run as published) | off
        ALTER TABLE runs ADD COLUMN gate VARCHAR;
        ALTER TABLE runs ADD COLUMN gate_message VARCHAR;
        -- Full-ranking validation NDCG@10 on the night's validation split: the new run, the published run
        -- re-scored on the same split, and the popularity floor.
        ALTER TABLE runs ADD COLUMN valid_ndcg10 DOUBLE;
        ALTER TABLE runs ADD COLUMN published_valid_ndcg10 DOUBLE;
        ALTER TABLE runs ADD COLUMN popularity_valid_ndcg10 DOUBLE;
        CREATE OR REPLACE VIEW latest_run AS
            SELECT * FROM runs WHERE status = 'completed' AND purged_at IS NULL AND kind = 'publish'
            ORDER BY seq DESC LIMIT 1;
        CREATE OR REPLACE VIEW latest_recommendations AS
            SELECT r.run_id, r.user_id, r.domain, r.rank, r.item_id, r.score, i.title
            FROM recommendations r LEFT JOIN items i ON i.item_id = r.item_id
            WHERE r.run_id = (SELECT run_id FROM latest_run);
        CREATE OR REPLACE VIEW latest_metrics AS
            SELECT * FROM metrics WHERE run_id = (SELECT run_id FROM latest_run);
        CREATE OR REPLACE VIEW latest_user_profiles AS
            SELECT * FROM user_profiles WHERE run_id = (SELECT run_id FROM latest_run);
        -- The data checks of each night before training (tasks/quality/datachecks.py): per domain and
        -- entity (interactions | users | items) tonight's count against the last checked night's.
        CREATE TABLE data_checks (
            night_id   VARCHAR NOT NULL,     -- runs.run_id of the night
            checked_at TIMESTAMPTZ NOT NULL,
            entity     VARCHAR NOT NULL,
            domain     VARCHAR NOT NULL,
            count      BIGINT NOT NULL,      -- tonight
            previous   BIGINT,               -- the last checked night (NULL on the first night)
            new        BIGINT,               -- keys tonight that were not there
            gone       BIGINT,               -- keys of the last night that are not there tonight
            share_new  DOUBLE,               -- new / count
            share_gone DOUBLE,               -- gone / previous
            change     DOUBLE,               -- count / previous - 1
            passed     BOOLEAN NOT NULL      -- false: this night was stopped by the check
        );
        -- What a night published, per domain (tasks/quality/stability.py): list churn against the
        -- previously published run, catalogue coverage, concentration on the most recommended items.
        CREATE TABLE list_stability (
            night_id          VARCHAR NOT NULL,
            run_id            VARCHAR NOT NULL,  -- the published run
            previous_run_id   VARCHAR,           -- the run published before it (NULL: none)
            domain            VARCHAR NOT NULL,
            users             BIGINT NOT NULL,
            users_compared    BIGINT NOT NULL,   -- users with a list in both runs
            mean_changed      DOUBLE,            -- mean share of a user's top-k not in their previous top-k
            p10_changed       DOUBLE,
            p50_changed       DOUBLE,
            p90_changed       DOUBLE,
            distinct_items    BIGINT NOT NULL,
            catalogue_items   BIGINT,
            coverage          DOUBLE,            -- distinct_items / catalogue_items
            top_item_id       VARCHAR,
            top_item_share    DOUBLE,            -- share of users whose list holds the top item
            top10_slot_share  DOUBLE             -- share of all slots taken by the 10 most recommended items
        );
        CREATE VIEW nights AS
            SELECT run_id, flow_run_id, status, started_at, finished_at, attempts, model, train_run_id,
                   published_run_id, gate, gate_message, valid_ndcg10, published_valid_ndcg10,
                   popularity_valid_ndcg10, message
            FROM runs WHERE kind = 'night';
        """,
    ),
    Migration(
        5,
        "crashed nights",
        """
        -- A night found 'running' by a later night whose process is gone (killed with SIGKILL, a lost
        -- machine) is marked 'crashed' by that later night; a night stopped by SIGTERM or SIGINT records
        -- itself 'failed', naming the signal. `host`, `pid` and `process_started_at` name the process
        -- that ran the night, so a later night can tell whether it is still alive. DuckDB cannot change a
        -- CHECK constraint in place: the table is rebuilt (the views read it by name).
        CREATE TABLE runs_v5 (
            run_id            VARCHAR PRIMARY KEY,
            seq               BIGINT,
            status            VARCHAR NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'crashed')),
            started_at        TIMESTAMPTZ NOT NULL,
            finished_at       TIMESTAMPTZ,
            model             VARCHAR,
            train_run_id      VARCHAR,
            config_hash       VARCHAR,
            inputs_hash       VARCHAR,
            k                 INTEGER,
            n_users           BIGINT,
            n_items           BIGINT,
            n_interactions    BIGINT,
            n_domains         INTEGER,
            n_recommendations BIGINT,
            index_path        VARCHAR,
            message           VARCHAR,
            purged_at         TIMESTAMPTZ,
            kind              VARCHAR DEFAULT 'publish',
            flow_run_id       VARCHAR,
            published_run_id  VARCHAR,
            attempts          INTEGER,
            gate              VARCHAR,
            gate_message      VARCHAR,
            valid_ndcg10      DOUBLE,
            published_valid_ndcg10  DOUBLE,
            popularity_valid_ndcg10 DOUBLE,
            host              VARCHAR,       -- night: the machine whose process ran it
            pid               INTEGER,       -- night: that process
            process_started_at TIMESTAMPTZ   -- night: when that process started (a reused PID differs)
        );
        INSERT INTO runs_v5 BY NAME SELECT * FROM runs;
        DROP TABLE runs;
        ALTER TABLE runs_v5 RENAME TO runs;
        CREATE OR REPLACE VIEW nights AS
            SELECT run_id, flow_run_id, status, started_at, finished_at, attempts, model, train_run_id,
                   published_run_id, gate, gate_message, valid_ndcg10, published_valid_ndcg10,
                   popularity_valid_ndcg10, message, host, pid, process_started_at
            FROM runs WHERE kind = 'night';
        """,
    ),
    Migration(
        6,
        "parts catalogue",
        """
        -- The night's rows live in Parquet parts (storage/warehouse/parts.py), one row per file here.
        -- kind: recommendations | serving | user_profiles | items; domain NULL for the last two.
        -- root: the data root the part was written under: a folder relative to the warehouse file's
        -- folder, an absolute folder, or s3://bucket/prefix; path: the part relative to it.
        -- dropped_at: when no view points at the part any more (retention, a republish, a newer
        -- catalogue); its file is deleted once publish.retention_grace_hours have passed.
        CREATE TABLE parts (
            run_id     VARCHAR NOT NULL,
            write_id   VARCHAR NOT NULL,     -- the publish attempt that wrote it
            kind       VARCHAR NOT NULL,
            domain     VARCHAR,
            shard      INTEGER NOT NULL,
            root       VARCHAR NOT NULL,
            path       VARCHAR NOT NULL,
            rows       BIGINT NOT NULL,
            bytes      BIGINT NOT NULL,
            written_at TIMESTAMPTZ NOT NULL,
            dropped_at TIMESTAMPTZ
        );
        -- Facts about the file itself: 'catalogue_folder' = where it was last written (readers that find
        -- it elsewhere re-point the views, docs/publish.md "Moving the warehouse").
        CREATE TABLE warehouse_info (key VARCHAR PRIMARY KEY, value VARCHAR);
        ALTER TABLE runs ADD COLUMN write_id VARCHAR;       -- the publish attempt whose parts are served
        ALTER TABLE runs ADD COLUMN index_kind VARCHAR;     -- per domain: the FAISS index searched
        ALTER TABLE runs ADD COLUMN index_recall DOUBLE;    -- lowest per-domain recall@k against exact search
        ALTER TABLE runs ADD COLUMN data_bytes BIGINT;      -- bytes of the run's parts
        ALTER TABLE runs ADD COLUMN n_parts INTEGER;
        """,
    ),
    Migration(
        7,
        "rows in parquet parts",
        """
        -- The rows of the tables below were moved into parts by the migration's move step; the tables
        -- become views over the parts (storage/warehouse/views.py), rewritten at every change.
        DROP VIEW IF EXISTS latest_recommendations;
        DROP VIEW IF EXISTS latest_user_profiles;
        DROP TABLE recommendations;
        DROP TABLE user_profiles;
        DROP TABLE items;
        """,
        move=lambda con, context: context.move_legacy_rows(con),
    ),
    Migration(
        8,
        "history rows",
        """
        -- Each user's history is published beside the lists (parts of kind 'interactions', the views
        -- interactions and latest_interactions): n_history counts the run's rows there, NULL for a run
        -- published without them (publish.history off, or before this version), whose views read empty.
        ALTER TABLE runs ADD COLUMN n_history BIGINT;
        """,
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version
PARTS_VERSION = 7  # from this version on, rows live in Parquet parts and the tables are views
RUN_STATUSES = ("running", "completed", "failed", "crashed")


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The highest migration applied; 0 for an empty database."""
    has = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'"
    ).fetchall()[0][0]
    if not has:
        return 0
    return int(con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()[0][0])


def migrate(con: duckdb.DuckDBPyConnection, upto: int | None = None, context: Any = None) -> list[int]:
    """Apply the pending migrations (each in its own transaction); return the versions applied.

    A migration that moves rows (`Migration.move`) needs `context` (storage/warehouse/legacy.py's
    `MoveContext`); without one, migrating stops before it. Raises WarehouseError for a file whose schema
    is newer than this bridgerec's.
    """
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
    )
    current = schema_version(con)
    if current > SCHEMA_VERSION:
        raise WarehouseError(
            f"the warehouse is at schema version {current}, newer than this bridgerec ({SCHEMA_VERSION}): "
            "upgrade bridgerec"
        )
    applied = []
    for m in MIGRATIONS:
        if m.version <= current or (upto is not None and m.version > upto):
            continue
        if m.move is not None and context is None:
            break
        con.execute("BEGIN TRANSACTION")
        try:
            if m.move is not None:
                m.move(con, context)
            con.execute(m.sql)
            con.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?)", [m.version, m.name, datetime.now(UTC)]
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        applied.append(m.version)
    return applied

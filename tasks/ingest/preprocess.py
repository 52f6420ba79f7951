"""Checks, filters, id maps, sequences and the leave-one-out split, in DuckDB (vectorised SQL).

Every raw row ends in exactly one place: kept, quarantined (bad input, with a reason) or filtered
(valid but removed by a rule: duplicate, time window, k-core, short sequence, ...), so that
read = kept + quarantined + filtered holds for items and for interactions, by reason.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from duckdb.sqltypes import VARCHAR

from bridgerec.runtime.errors import InputError
from bridgerec.storage import schemas
from bridgerec.tasks.ingest.settings import IngestSettings, TimestampSettings
from bridgerec.tasks.ingest.sources import RawSource, input_files
from bridgerec.tasks.ingest.text import clean_text_array

# Epoch numbers: seconds per unit, and the magnitude bounds `unit: auto` uses (|x| below the bound).
_EPOCH_DIVISORS = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}
_AUTO_UNIT_SQL = (
    "CASE WHEN abs(ts_num) < 1e11 THEN 1.0 WHEN abs(ts_num) < 1e14 THEN 1e3 "
    "WHEN abs(ts_num) < 1e17 THEN 1e6 ELSE 1e9 END"
)
# Why most rows of a file were quarantined, for the error that stops the run.
_FILE_HINTS = {
    "malformed_json": "the file is not JSON lines (nor Python dict literals)",
    "too_few_fields": "wrong delimiter, or not the file this role expects?",
    "too_many_fields": "wrong delimiter, or not the file this role expects?",
    "unknown_item": "its items are not in the catalogue: check the catalogue (meta) file of the same domain",
    "item_quarantined": "their catalogue rows were quarantined: see the catalogue's reasons in quarantine.parquet",
    "unterminated_quote": 'a quote opened in a value never closes: double quotes inside quoted values ("") '
    "or remove the stray quote",
    "unknown_domain": "its domains are not in ingest.domains or the catalogue",
    "domain_mismatch": "its domains contradict the catalogue's",
    "invalid_unicode": "text with invalid escapes (lone UTF-16 surrogates) in used fields",
}


class IngestError(InputError):
    """The input cannot give a usable dataset (e.g. nothing left after filtering, a file whose rows
    are mostly rejected, a domain left without items); the message names the file or domain."""


@dataclass
class Accounting:
    read: int = 0
    kept: int = 0
    kept_without_interactions: int = 0  # of `kept`: catalogue items nobody interacted with yet
    quarantined: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)

    def check(self, table: str) -> None:
        total = self.kept + sum(self.quarantined.values()) + sum(self.filtered.values())
        if total != self.read:
            raise AssertionError(
                f"{table}: read {self.read} != kept {self.kept} + quarantined + filtered ({total})"
            )

    def as_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "kept_without_interactions": self.kept_without_interactions,
            "quarantined": sum(self.quarantined.values()),
            "quarantined_by_reason": dict(sorted(self.quarantined.items())),
            "filtered": sum(self.filtered.values()),
            "filtered_by_reason": dict(sorted(self.filtered.items())),
        }


@dataclass
class IngestTables:
    domains: pa.Table
    items: pa.Table
    users: pa.Table
    interactions: pa.Table
    sequences: pa.Table
    quarantine: pa.Table
    items_accounting: Accounting
    interactions_accounting: Accounting
    kcore_rounds: int = 0
    # Kept interactions whose place in their user's sequence only file order decides: another of the user's
    # interactions has the same time and the same position (both, where the source gives both).
    order_ties: int = 0


def _exec(con: duckdb.DuckDBPyConnection, sql: str, params: dict | list | None = None) -> list[tuple]:
    """Run a statement to completion (DuckDB 2 keeps a pending result open until it is fetched)."""
    return con.execute(sql, params).fetchall()


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: dict | list | None = None) -> int:
    return _exec(con, sql, params)[0][0]


def _counts(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in con.sql(sql).fetchall()}


def preprocess(
    raw: RawSource, settings: IngestSettings, threads: int, progress: Callable[[str], None] = lambda _: None
) -> IngestTables:
    """The kept, quarantined and filtered rows in one DuckDB session; within `settings.memory_limit`, its
    joins, sorts and aggregates (the k-core rounds, the id maps, the splits) spill to `settings.spill_dir`."""
    with tempfile.TemporaryDirectory(prefix="bridgerec-ingest-spill-") as spill:
        if settings.spill_dir is not None:
            settings.spill_dir.mkdir(parents=True, exist_ok=True)  # DuckDB creates the last level only
        config: dict[str, str | bool | int | float | list[str]] = {
            "threads": threads,
            "temp_directory": str(settings.spill_dir or spill),
        }
        if settings.memory_limit is not None:
            config["memory_limit"] = settings.memory_limit
        con = duckdb.connect(config=config)
        try:
            return _preprocess(_session(con, settings), raw, settings, progress)
        finally:
            con.close()


def _session(con: duckdb.DuckDBPyConnection, settings: IngestSettings) -> duckdb.DuckDBPyConnection:
    """The session's time zone and the text-cleaning function."""
    # Text without an offset (and dates, and naive Parquet timestamps) is read in this zone, never in
    # the machine's (DuckDB's default TimeZone is the process's local zone).
    try:
        con.execute(f"SET TimeZone = '{settings.timestamps.duckdb_zone}'")
    except duckdb.Error as exc:
        raise IngestError(
            f"ingest.timestamps.naive_zone {settings.timestamps.naive_zone!r} is not a zone DuckDB knows: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    con.create_function(  # type: ignore[call-overload]  # (an Arrow UDF: the stubs know scalar ones)
        "clean_text", clean_text_array, [VARCHAR], VARCHAR, type="arrow", null_handling="special"
    )
    return con


def _preprocess(
    con: duckdb.DuckDBPyConnection, raw: RawSource, settings: IngestSettings, progress: Callable[[str], None]
) -> IngestTables:
    """The ingest steps on one DuckDB connection, in order (each a function below, each reading the temp
    tables the one before made): check items, check interactions, filter, build the id maps and the
    leave-one-out sequences, collect the quarantine, reconcile the counts."""
    domains = settings.domains if settings.domains is not None else raw.domains_in_catalogue
    if not domains:
        raise IngestError(
            f"{_files(settings, 'items')}: no domains: none of its {raw.items.table.num_rows:,} catalogue rows "
            "names one and ingest.domains is not set"
        )
    con.register("raw_items", raw.items.table)
    con.register("raw_inter", raw.interactions.table)
    _exec(
        con,
        "CREATE TEMP TABLE domain_list AS SELECT unnest($d) AS domain, generate_subscripts($d, 1) - 1 AS domain_idx",
        {"d": domains},
    )
    _check_items(con, progress)
    _check_interactions(con, raw, settings, progress)
    rounds = _filter_interactions(con, raw, settings, progress)
    users, sequences = _build_ids_and_sequences(con, settings, progress)
    quarantine = _quarantine(con, raw, progress)
    items_acc, inter_acc = _accounting(con, raw)
    return IngestTables(
        domains=con.sql("SELECT * FROM domains_final ORDER BY domain_idx")
        .to_arrow_table()
        .cast(schemas.DOMAINS),
        items=con.sql("SELECT * FROM items_out").to_arrow_table(),
        users=users,
        interactions=con.sql("SELECT * FROM inter_out").to_arrow_table(),
        sequences=sequences,
        quarantine=quarantine,
        items_accounting=items_acc,
        interactions_accounting=inter_acc,
        kcore_rounds=rounds,
        order_ties=_order_ties(con),
    )


def _check_items(con: duckdb.DuckDBPyConnection, progress: Callable[[str], None]) -> None:
    """Items: each row checked (a quarantine reason or NULL, in `items_checked`), then de-duplicated by id,
    the first record winning (`items_ranked`, `items_valid`)."""
    progress("checking items")
    _exec(
        con,
        """
        CREATE TEMP TABLE items_checked AS
        SELECT trim(item_id) AS item_id, trim(domain) AS domain, clean_text(title) AS title,
               NULLIF(clean_text(brand), '') AS brand, NULLIF(clean_text(categories), '') AS categories,
               NULLIF(clean_text(price), '') AS price, NULLIF(clean_text(description), '') AS description,
               NULLIF(attributes, '') AS attributes, _file, _record,
               CASE WHEN item_id IS NULL OR domain IS NULL OR title IS NULL THEN 'too_few_fields'
                    WHEN trim(item_id) = '' THEN 'empty_id'
                    WHEN trim(domain) NOT IN (SELECT domain FROM domain_list) THEN 'unknown_domain'
                    WHEN clean_text(title) = '' THEN 'empty_title'
               END AS reason,
               to_json(raw_items) AS row  -- the row as read (text not cleaned)
        FROM raw_items
        """,
    )
    _exec(
        con,
        """
        CREATE TEMP TABLE items_ranked AS
        SELECT *, row_number() OVER w AS rn,
               first_value(content) OVER w AS first_content
        FROM (SELECT *, concat_ws(chr(31), domain, title, brand, categories, price, description, attributes) AS content
              FROM items_checked WHERE reason IS NULL)
        WINDOW w AS (PARTITION BY item_id ORDER BY _file, _record)
        """,
    )
    _exec(
        con,
        "CREATE TEMP TABLE items_valid AS SELECT * EXCLUDE (rn, first_content, content) FROM items_ranked WHERE rn = 1",
    )


def _instant_sql(ts: TimestampSettings, ts_min: datetime, ts_max: datetime) -> tuple[str, dict[str, Any]]:
    """The SQL of a raw row's instant (`ts` the text, `ts_num` its number, `ts_secs` that in seconds) and its
    parameters. Epoch numbers become instants only inside the plausible range (to_timestamp of a far-off
    value fails, and a wrong unit gives dates centuries away); everything else is bad_timestamp. With
    `ts.format` every value is text in that format (a time without a zone is in naive_zone: the session's
    TimeZone)."""
    if ts.format is not None:
        return "CAST(try_strptime(trim(ts), $ts_format) AS TIMESTAMPTZ)", {"ts_format": ts.format}
    sql = """CASE WHEN ts_num IS NOT NULL
                    THEN to_timestamp(CASE WHEN isfinite(ts_secs) AND ts_secs BETWEEN $min_s AND $max_s
                                           THEN ts_secs END)
                    ELSE TRY_CAST(trim(ts) AS TIMESTAMPTZ) END"""
    return sql, {"min_s": ts_min.timestamp(), "max_s": ts_max.timestamp()}


def _check_interactions(
    con: duckdb.DuckDBPyConnection, raw: RawSource, settings: IngestSettings, progress: Callable[[str], None]
) -> None:
    """Interactions: timestamps, positions and ratings parsed (`inter_parsed`), each row checked against the
    catalogue (`inter_checked`: a quarantine reason or NULL); stops with IngestError when the ids look
    mangled or a file has more quarantined rows than `max_quarantined_fraction`."""
    progress("checking interactions")
    ts = settings.timestamps
    unit = _AUTO_UNIT_SQL if ts.unit == "auto" else repr(_EPOCH_DIVISORS[ts.unit])
    ts_min = _utc(ts.min)
    ts_max = _utc(ts.max) if ts.max is not None else datetime.now(UTC) + timedelta(days=1)
    ts_check = (
        "WHEN ts_parsed IS NULL OR ts_parsed < $ts_min OR ts_parsed > $ts_max THEN 'bad_timestamp'"
        if raw.has_timestamp
        else ""
    )
    pos_check = "WHEN pos_parsed IS NULL OR pos_parsed < 0 THEN 'bad_position'" if raw.has_position else ""
    missing = (
        ["user_id", "item_id", "domain"]
        + (["ts"] if raw.has_timestamp else [])
        + (["pos"] if raw.has_position else [])
    )
    parsed, params = _instant_sql(ts, ts_min, ts_max)
    _exec(
        con,
        f"""
        CREATE TEMP TABLE inter_parsed AS
        SELECT * EXCLUDE (ts_num, ts_secs),
               {parsed} AS ts_parsed
        FROM (
            SELECT *, ts_num / ({unit}) AS ts_secs
            FROM (SELECT trim(user_id) AS user_id, trim(item_id) AS item_id, trim(domain) AS domain,
                         "timestamp" AS ts, TRY_CAST(trim("timestamp") AS DOUBLE) AS ts_num,
                         position AS pos, rating, _file, _record, to_json(raw_inter) AS row,
                         TRY_CAST(trim(position) AS BIGINT) AS pos_parsed,
                         TRY_CAST(trim(rating) AS FLOAT) AS rating_parsed
                  FROM raw_inter))
        """,
        params,
    )
    # Ids of catalogue rows that were quarantined (and have no valid row): their interactions are
    # `item_quarantined`, not `unknown_item`, so the count points at the catalogue's own reasons.
    rejected_ids = [r.get("item_id") for r in raw.items.rejects if r.get("item_id")]
    con.register("reader_rejected_ids", pa.table({"item_id": pa.array(rejected_ids, pa.string())}))
    _exec(
        con,
        """
        CREATE TEMP TABLE items_quarantined AS
        SELECT item_id FROM items_checked WHERE reason IS NOT NULL AND item_id <> ''
        UNION SELECT trim(item_id) FROM reader_rejected_ids
        EXCEPT SELECT item_id FROM items_valid
        """,
    )
    _exec(
        con,
        f"""
        CREATE TEMP TABLE inter_checked AS
        SELECT p.*, i.domain AS item_domain,
               CASE WHEN {" OR ".join(f"p.{c} IS NULL" for c in missing)} THEN 'too_few_fields'
                    WHEN p.user_id = '' OR p.item_id = '' THEN 'empty_id'
                    WHEN p.domain NOT IN (SELECT domain FROM domain_list) THEN 'unknown_domain'
                    {ts_check}
                    {pos_check}
                    WHEN i.item_id IS NULL AND p.item_id IN (SELECT item_id FROM items_quarantined)
                         THEN 'item_quarantined'
                    WHEN i.item_id IS NULL THEN 'unknown_item'
                    WHEN i.domain <> p.domain THEN 'domain_mismatch'
               END AS reason
        FROM inter_parsed p LEFT JOIN items_valid i USING (item_id)
        """,
        {"ts_min": ts_min, "ts_max": ts_max} if raw.has_timestamp else None,
    )
    _check_id_formats(con, raw)
    _check_files(con, raw, settings.max_quarantined_fraction)


def _filter_interactions(
    con: duckdb.DuckDBPyConnection, raw: RawSource, settings: IngestSettings, progress: Callable[[str], None]
) -> int:
    """The filters (`inter_rule.rule`: duplicate, time_window, k_core, short_sequence), each row removed counted
    under its rule; returns the k-core's rounds. IngestError when no interaction is left."""
    progress("filtering interactions")
    _exec(
        con,
        """
        CREATE TEMP TABLE inter_rule AS
        SELECT *, CASE WHEN row_number() OVER (
                      PARTITION BY user_id, item_id, domain, ts_parsed, pos_parsed, rating_parsed ORDER BY _file, _record) > 1
                       THEN 'duplicate' END AS rule
        FROM inter_checked WHERE reason IS NULL
        """,
    )
    if settings.time_window.active:
        if not raw.has_timestamp:
            raise IngestError("ingest.time_window is set but the interactions have no timestamp")
        conds = []
        params = {}
        if settings.time_window.start is not None:
            conds.append("ts_parsed < $start")
            params["start"] = _utc(settings.time_window.start)
        if settings.time_window.end is not None:
            conds.append("ts_parsed >= $end")
            params["end"] = _utc(settings.time_window.end)
        _exec(
            con,
            f"UPDATE inter_rule SET rule = 'time_window' WHERE rule IS NULL AND ({' OR '.join(conds)})",
            params,
        )

    rounds = 0
    if settings.kcore_enabled:
        progress("k-core")
        u, i = settings.kcore.user_min, settings.kcore.item_min
        # Ends: each round marks at least one more row or stops, so there are at most as many rounds as
        # rows; the count is in the summary (kcore_rounds).
        while True:
            rounds += 1
            changed = _scalar(
                con,
                f"""
                UPDATE inter_rule SET rule = 'k_core'
                WHERE rule IS NULL AND (
                    user_id IN (SELECT user_id FROM inter_rule WHERE rule IS NULL GROUP BY user_id HAVING count(*) < {u})
                 OR item_id IN (SELECT item_id FROM inter_rule WHERE rule IS NULL GROUP BY item_id HAVING count(*) < {i}))
                """,
            )
            if changed == 0:
                break
    _exec(
        con,
        f"""
        UPDATE inter_rule SET rule = 'short_sequence'
        WHERE rule IS NULL AND user_id IN (
            SELECT user_id FROM inter_rule WHERE rule IS NULL GROUP BY user_id HAVING count(*) < {settings.min_interactions})
        """,
    )
    n_kept = _scalar(con, "SELECT count(*) FROM inter_rule WHERE rule IS NULL")
    if n_kept == 0:
        read = raw.interactions.table.num_rows + len(raw.interactions.rejects)
        quarantined: dict[str, int] = {}
        for (table, _), reasons in _quarantine_by_file(con, raw).items():
            if table == "interactions":
                for reason, n in reasons.items():
                    quarantined[reason] = quarantined.get(reason, 0) + n
        filtered = dict(
            con.execute("SELECT rule, count(*) FROM inter_rule WHERE rule IS NOT NULL GROUP BY 1").fetchall()
        )
        raise IngestError(
            f"{_files(settings, 'interactions')}: no interactions left after checks and filters (read: {read:,}; "
            f"quarantined: {_reasons(quarantined) or 'none'}; filtered: {_reasons(filtered) or 'none'}); "
            "nothing written"
        )
    return rounds


def _build_ids_and_sequences(
    con: duckdb.DuckDBPyConnection, settings: IngestSettings, progress: Callable[[str], None]
) -> tuple[pa.Table, pa.Table]:
    """One global id space (domains in order) and one local space per domain, 0 = padding (`items_out`,
    `domains_final`); interactions in sequence order with their leave-one-out split (`inter_out`).
    Returns (users, sequences)."""
    progress("building id maps and sequences")
    _exec(
        con,
        """
        CREATE TEMP TABLE items_final AS
        WITH used AS (SELECT DISTINCT item_id FROM inter_rule WHERE rule IS NULL),
        referenced AS (SELECT DISTINCT item_id FROM inter_rule),
        local AS (
            SELECT v.*, d.domain_idx, CAST(row_number() OVER (PARTITION BY v.domain ORDER BY v.item_id) AS INTEGER) AS local_id
            FROM items_valid v JOIN domain_list d USING (domain)
            WHERE v.item_id IN (SELECT item_id FROM used)
               OR ($keep_new AND v.item_id NOT IN (SELECT item_id FROM referenced)))
        SELECT * FROM local
        """,
        {"keep_new": settings.items_without_interactions == "keep"},
    )
    _exec(
        con,
        """
        CREATE TEMP TABLE domains_final AS
        SELECT d.domain, CAST(d.domain_idx AS TINYINT) AS domain_idx, CAST(count(i.item_id) AS INTEGER) AS n_items,
               CAST(COALESCE(sum(count(i.item_id)) OVER (ORDER BY d.domain_idx ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS INTEGER) AS global_offset
        FROM domain_list d LEFT JOIN items_final i USING (domain)
        GROUP BY d.domain, d.domain_idx ORDER BY d.domain_idx
        """,
    )
    _check_domains(con)
    _exec(
        con,
        """
        CREATE TEMP TABLE items_out AS
        SELECT i.item_id, i.domain, CAST(i.domain_idx AS TINYINT) AS domain_idx, CAST(d.global_offset + i.local_id AS INTEGER) AS global_id,
               i.local_id, i.title, i.brand, i.categories, i.price, i.description, i.attributes
        FROM items_final i JOIN domains_final d USING (domain) ORDER BY global_id
        """,
    )
    # Order within a user: time, then given position, then file order; seq_pos is 0-based.
    _exec(
        con,
        """
        CREATE TEMP TABLE inter_out AS
        WITH kept AS (
            SELECT r.user_id, r.item_id, r.ts_parsed, r.pos_parsed, r.rating_parsed, r._file, r._record,
                   i.global_id, i.local_id, i.domain_idx
            FROM inter_rule r JOIN items_out i USING (item_id) WHERE r.rule IS NULL),
        users AS (SELECT user_id, CAST(row_number() OVER (ORDER BY user_id) - 1 AS INTEGER) AS user_idx FROM (SELECT DISTINCT user_id FROM kept)),
        ordered AS (
            SELECT k.*, u.user_idx,
                   CAST(row_number() OVER (PARTITION BY k.user_id ORDER BY k.ts_parsed, k.pos_parsed, k._file, k._record) - 1 AS INTEGER) AS seq_pos,
                   count(*) OVER (PARTITION BY k.user_id) AS n
            FROM kept k JOIN users u USING (user_id))
        SELECT user_id, user_idx, item_id, global_id, local_id, domain_idx, seq_pos,
               ts_parsed AS "timestamp", rating_parsed AS rating,
               CASE WHEN seq_pos = n - 1 THEN 'test' WHEN seq_pos = n - 2 THEN 'valid' ELSE 'train' END AS split
        FROM ordered ORDER BY user_idx, seq_pos
        """,
    )
    users = con.sql(
        """
        SELECT user_id, user_idx, CAST(count(*) AS INTEGER) AS n_interactions, CAST(count(DISTINCT domain_idx) AS TINYINT) AS n_domains
        FROM inter_out GROUP BY user_id, user_idx ORDER BY user_idx
        """
    ).to_arrow_table()
    sequences = con.sql(
        """
        SELECT user_id, user_idx, list(global_id ORDER BY seq_pos) AS global_ids, list(local_id ORDER BY seq_pos) AS local_ids,
               list(domain_idx ORDER BY seq_pos) AS domain_idx
        FROM inter_out GROUP BY user_id, user_idx ORDER BY user_idx
        """
    ).to_arrow_table()
    return users, sequences


def _order_ties(con: duckdb.DuckDBPyConnection) -> int:
    """Kept interactions that share their time and position with another of the same user's (missing
    ones count as equal): their order in the sequence, and so which is the test or validation target, is
    the files' order. Common with day-granular timestamps (Amazon reviews); with explicit positions, a
    sign of a faulty export."""
    return _scalar(
        con,
        """
        SELECT count(*) FROM (
            SELECT count(*) OVER (PARTITION BY r.user_id, r.ts_parsed, r.pos_parsed) AS same_place
            FROM inter_rule r JOIN items_out i USING (item_id) WHERE r.rule IS NULL)
        WHERE same_place > 1
        """,
    )


def _quarantine(con: duckdb.DuckDBPyConnection, raw: RawSource, progress: Callable[[str], None]) -> pa.Table:
    """Every quarantined row (the checks' and the readers'), sorted by table, file and record."""
    progress("accounting")
    quarantine_rows = con.sql(
        """
        SELECT 'items' AS "table", _file AS file, _record AS record, reason, row::VARCHAR AS row FROM items_checked WHERE reason IS NOT NULL
        UNION ALL
        SELECT 'items', _file, _record, 'conflicting_item', to_json(struct_pack(item_id, domain, title, brand, categories, price, description, attributes))::VARCHAR
        FROM items_ranked WHERE rn > 1 AND content <> first_content
        UNION ALL
        SELECT 'interactions', _file, _record, reason, row::VARCHAR FROM inter_checked WHERE reason IS NOT NULL
        """
    ).to_arrow_table()
    reader_rejects = [dict(r, table="items") for r in raw.items.rejects] + [
        dict(r, table="interactions") for r in raw.interactions.rejects
    ]
    quarantine = pa.concat_tables(
        [
            quarantine_rows.cast(schemas.QUARANTINE),
            pa.Table.from_pylist(reader_rejects, schema=schemas.QUARANTINE),
        ]
    ).sort_by([("table", "ascending"), ("file", "ascending"), ("record", "ascending")])
    return quarantine


def _accounting(con: duckdb.DuckDBPyConnection, raw: RawSource) -> tuple[Accounting, Accounting]:
    """Rows read = kept + quarantined + filtered, for items and for interactions (`Accounting.check` raises
    when they do not reconcile)."""
    items_acc = Accounting(read=raw.items.table.num_rows + len(raw.items.rejects))
    items_acc.kept = _scalar(con, "SELECT count(*) FROM items_out")
    items_acc.quarantined = _counts(
        con, "SELECT reason, count(*) FROM items_checked WHERE reason IS NOT NULL GROUP BY 1"
    )
    conflicting = _scalar(con, "SELECT count(*) FROM items_ranked WHERE rn > 1 AND content <> first_content")
    if conflicting:
        items_acc.quarantined["conflicting_item"] = conflicting
    dup_items = _scalar(con, "SELECT count(*) FROM items_ranked WHERE rn > 1 AND content = first_content")
    if dup_items:
        items_acc.filtered["duplicate"] = dup_items
    # Items no kept interaction uses: never interacted with (new: kept, unless the setting drops them),
    # or every interaction of theirs removed by a rule (k-core, time window, short sequence): filtered.
    items_acc.kept_without_interactions = _scalar(
        con,
        "SELECT count(*) FROM items_out WHERE item_id NOT IN "
        "(SELECT item_id FROM inter_rule WHERE rule IS NULL)",
    )
    unused = _counts(
        con,
        """
        SELECT CASE WHEN item_id IN (SELECT item_id FROM inter_rule) THEN 'no_kept_interactions'
                    ELSE 'no_interactions' END, count(*)
        FROM items_valid WHERE item_id NOT IN (SELECT item_id FROM items_out) GROUP BY 1
        """,
    )
    items_acc.filtered |= unused
    for r in raw.items.rejects:
        items_acc.quarantined[r["reason"]] = items_acc.quarantined.get(r["reason"], 0) + 1
    items_acc.check("items")

    inter_acc = Accounting(read=raw.interactions.table.num_rows + len(raw.interactions.rejects))
    inter_acc.kept = _scalar(con, "SELECT count(*) FROM inter_out")
    inter_acc.quarantined = _counts(
        con, "SELECT reason, count(*) FROM inter_checked WHERE reason IS NOT NULL GROUP BY 1"
    )
    for r in raw.interactions.rejects:
        inter_acc.quarantined[r["reason"]] = inter_acc.quarantined.get(r["reason"], 0) + 1
    inter_acc.filtered = _counts(
        con, "SELECT rule, count(*) FROM inter_rule WHERE rule IS NOT NULL GROUP BY 1"
    )
    inter_acc.check("interactions")
    return items_acc, inter_acc


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _files(settings: IngestSettings, table: str) -> str:
    """The raw files of `table` ('items' or 'interactions'), as messages name them."""
    generic, amazon = {"items": ("items", ".meta"), "interactions": ("interactions", ".reviews")}[table]
    files = input_files(settings)
    return ", ".join(str(p) for role, p in files.items() if role == generic or role.endswith(amazon))


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{r}: {n:,}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _bad_timestamp_hint(con: duckdb.DuckDBPyConnection, file: str) -> str:
    """What the file's timestamps look like and what is read: a spreadsheet's '05/11/2024 16:08' was told
    only to "see ingest.timestamps" (a new user's trial)."""
    example = con.execute(
        "SELECT ts FROM inter_checked WHERE _file = ? AND reason = 'bad_timestamp' AND ts IS NOT NULL LIMIT 1",
        [file],
    ).fetchone()
    shown = f", e.g. {example[0]!r}" if example else ""
    return (
        f"timestamps not understood{shown}: read are epoch numbers (ingest.timestamps.unit) and ISO 8601 "
        "text; give another text form as ingest.timestamps.format (e.g. '%m/%d/%Y %H:%M'); instants outside "
        "ingest.timestamps.min/max are bad too"
    )


def _quarantine_by_file(
    con: duckdb.DuckDBPyConnection, raw: RawSource
) -> dict[tuple[str, str], dict[str, int]]:
    """Quarantined rows so far per (table, file) and reason: the checks' and the readers'."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    rows = con.execute(
        """
        SELECT 'items', _file, reason, count(*) FROM items_checked WHERE reason IS NOT NULL GROUP BY ALL
        UNION ALL
        SELECT 'items', _file, 'conflicting_item', count(*) FROM items_ranked
        WHERE rn > 1 AND content <> first_content GROUP BY ALL
        UNION ALL
        SELECT 'interactions', _file, reason, count(*) FROM inter_checked WHERE reason IS NOT NULL GROUP BY ALL
        """
    ).fetchall()
    for table, file, reason, n in rows:
        by = out.setdefault((table, file), {})
        by[reason] = by.get(reason, 0) + int(n)
    for table, rejects in (("items", raw.items.rejects), ("interactions", raw.interactions.rejects)):
        for r in rejects:
            by = out.setdefault((table, r["file"]), {})
            by[r["reason"]] = by.get(r["reason"], 0) + 1
    return out


def _read_by_file(raw: RawSource) -> dict[tuple[str, str], int]:
    """Rows read per (table, file), reader rejects included."""
    out: dict[tuple[str, str], int] = {}
    for table, part in (("items", raw.items), ("interactions", raw.interactions)):
        if part.table.num_rows:
            counts = pc.value_counts(part.table["_file"]).to_pylist()
            for c in counts:
                out[(table, c["values"])] = out.get((table, c["values"]), 0) + int(c["counts"])
        for r in part.rejects:
            out[(table, r["file"])] = out.get((table, r["file"]), 0) + 1
    return out


def _check_files(con: duckdb.DuckDBPyConnection, raw: RawSource, max_fraction: float) -> None:
    """Stop when a file has more than `max_fraction` of its rows quarantined: such a file is most
    likely not what it claims to be (another format, the wrong file, a wrong unit), and a run built
    on what is left of it would silently lose a catalogue or a domain."""
    if max_fraction >= 1.0:
        return
    read = _read_by_file(raw)
    # Catalogue files first: a bad catalogue makes its interactions `unknown_item`, so it is the cause.
    by_file = sorted(_quarantine_by_file(con, raw).items(), key=lambda kv: (kv[0][0] != "items", kv[0][1]))
    for (table, file), reasons in by_file:
        n_read, n_bad = read.get((table, file), 0), sum(reasons.values())
        if n_read and n_bad / n_read > max_fraction:
            top = max(reasons, key=lambda r: (reasons[r], r))
            hint = _bad_timestamp_hint(con, file) if top == "bad_timestamp" else _FILE_HINTS.get(top)
            raise IngestError(
                f"{file}: {n_bad:,} of {n_read:,} {table} rows quarantined ({_reasons(reasons)})"
                + (f": {hint}" if hint else "")
                + f"; nothing written (the limit is ingest.max_quarantined_fraction = {max_fraction:g})"
            )


# An id as a number would write it: without leading zeros and without a trailing ".0" (digits only).
_NUMBER_FORM = """
    CASE WHEN regexp_full_match({col}, '[0-9]+(\\.0+)?')
         THEN coalesce(nullif(ltrim(regexp_replace({col}, '\\.0+$', ''), '0'), ''), '0') END"""


def _check_id_formats(con: duckdb.DuckDBPyConnection, raw: RawSource) -> None:
    """Stop when interactions name item ids that are catalogue ids once both are read as numbers
    ('105' or '105.0' for '0105'): the ids lost their leading zeros or gained a '.0' on the way (an
    integer or float column, a spreadsheet, CSV type sniffing), and the rows, or only some of them,
    would otherwise be quarantined as unknown items while their items counted as new."""
    rows = con.execute(
        f"""
        WITH unknown AS (
            SELECT _file, item_id, {_NUMBER_FORM.format(col="item_id")} AS n
            FROM inter_checked WHERE reason = 'unknown_item'),
        catalogue AS (SELECT item_id, {_NUMBER_FORM.format(col="item_id")} AS n FROM items_valid)
        SELECT u._file, count(*) AS n_rows, count(DISTINCT u.item_id) AS n_ids,
               list(DISTINCT [u.item_id, c.item_id] ORDER BY [u.item_id, c.item_id])[:3] AS examples
        FROM unknown u JOIN catalogue c ON u.n = c.n AND u.item_id <> c.item_id
        GROUP BY u._file ORDER BY u._file
        """
    ).fetchall()
    if not rows:
        return
    read = _read_by_file(raw)
    parts = []
    for file, n_rows, n_ids, examples in rows:
        shown = ", ".join(f"{a!r} for the catalogue's {b!r}" for a, b in examples)
        kind = raw.interactions.column_types.get("item_id")
        stored = f"; {file} stores item_id as {kind}" if kind and kind != "VARCHAR" else ""
        parts.append(
            f"{file}: {n_rows} of {read.get(('interactions', file), 0)} interactions rows name {n_ids} item "
            f"ids that are catalogue ids without their leading zeros or with a '.0' ({shown}{stored})"
        )
    raise IngestError(
        "; ".join(parts) + ": the ids were read or written as numbers (an integer or float column, a "
        "spreadsheet); write item ids as text in both files (pandas: astype(str) before saving, "
        "dtype=str when reading) and ingest again; nothing written"
    )


def _check_domains(con: duckdb.DuckDBPyConnection) -> None:
    """Stop when a configured domain is left without items (and so without users): the stages after
    ingest cannot train or publish it, and would fail far from the cause."""
    empty = [
        r[0]
        for r in con.execute(
            "SELECT domain FROM domains_final WHERE n_items = 0 ORDER BY domain_idx"
        ).fetchall()
    ]
    if not empty:
        return
    parts = []
    for domain in empty:
        files = [
            r[0]
            for r in con.execute(
                """
                SELECT DISTINCT _file FROM (
                    SELECT _file FROM items_checked WHERE domain = $d
                    UNION ALL SELECT _file FROM inter_checked WHERE domain = $d)
                ORDER BY 1
                """,
                {"d": domain},
            ).fetchall()
        ]
        inter = dict(
            con.execute(
                """
                SELECT coalesce(c.reason, r.rule, 'kept'), count(*) FROM inter_checked c
                LEFT JOIN inter_rule r USING (_file, _record) WHERE c.domain = $d GROUP BY 1
                """,
                {"d": domain},
            ).fetchall()
        )
        where = f"in {', '.join(files)}" if files else "no row names it"
        parts.append(
            f"domain {domain!r} has no items or users left ({where}; its interactions: "
            f"{_reasons(inter) if inter else 'none'})"
        )
    raise IngestError("; ".join(parts) + "; nothing written")

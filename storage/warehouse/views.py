"""The views analysts query, written from the `parts` table: each lists its Parquet files by full path.

DuckDB resolves a relative path in a view against the *reader's* working directory, not the database
file's folder, so a view over 'warehouse.parts/...' would read nothing (or another folder's files) from
anywhere else. The views therefore hold absolute paths (or s3:// URIs), rewritten by every change of the
file (`refresh_views`), which also records the folder it was written in. A reader that finds the file in
another folder (the workspace was moved, or is mounted elsewhere) re-points the views for its own
connection with temporary views of the same names (`prepare_reader`, used by `connect`); plain DuckDB
clients see the moved warehouse once any bridgerec write (a publish, a night's record, `bridgerec
warehouse relink`) has rewritten the file where it now is.

Views list files explicitly, never by glob: a file a view names must exist (DuckDB fails loudly if
not), so a reader is never shown a night with a part silently missing, and files of an attempt that
was not registered never appear.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from bridgerec.storage.warehouse.parts import PART_SCHEMAS, full_path, register_filesystems, resolve_root
from bridgerec.storage.warehouse.schema import PARTS_VERSION, WarehouseError, schema_version

# The views over parts (written by `view_statements`, in this order).
PART_VIEWS = (
    "items",
    "recommendations",
    "user_profiles",
    "serving",
    "latest_recommendations",
    "latest_user_profiles",
    "latest_serving",
    "interactions",
    "latest_interactions",
)
_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}


def _sql_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return _sql_type(t.value_type) + "[]"
    return _DUCKDB_TYPES[t]


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# `items.price_amount`: the catalogue's `price` text as a number where it is one amount: a leading
# currency sign ($, US$, EUR sign, pound sign) and thousands separators (commas between groups of three
# digits) dropped, so "$1,299.00" is 1299.0 and "3.5" is 3.5. Anything else is NULL rather than a guess:
# a range ("$5.99 - $10.99"), a decimal comma ("12,99"), words. `price` keeps the text as ingested.
_PRICE_TEXT = "regexp_replace(trim(price), '^(US[$]|[$€£]) *', '')"
PRICE_AMOUNT = (
    f"CASE WHEN regexp_full_match({_PRICE_TEXT}, '([0-9]+|[0-9]{{1,3}}(,[0-9]{{3}})+)([.][0-9]+)?') "
    f"THEN CAST(replace({_PRICE_TEXT}, ',', '') AS DOUBLE) END"
)


def typed_empty(kind: str) -> str:
    """An empty SELECT with every column of `kind`'s parts (PART_SCHEMAS), typed."""
    cols = ", ".join(f"NULL::{_sql_type(f.type)} AS {f.name}" for f in PART_SCHEMAS[kind])
    return f"SELECT {cols} WHERE false"


def scan_parts(kind: str, files: list[str]) -> str:
    """A SELECT over the parts `files` of `kind` with every column of PART_SCHEMAS[kind], in its order:
    a column that parts written before it was added lack reads as NULL (the empty typed SELECT unioned
    by name supplies it, also when no listed part has it)."""
    if not files:
        return typed_empty(kind)
    paths = ", ".join(sql_literal(f) for f in files)
    return (
        f"{typed_empty(kind)} UNION ALL BY NAME SELECT * FROM read_parquet([{paths}], union_by_name = true)"
    )


def served_files(con: duckdb.DuckDBPyConnection, catalogue_folder: Path) -> dict[tuple[str, str], list[str]]:
    """{(kind, run_id): full paths} of every part a view serves (not dropped), in shard order."""
    rows = con.execute(
        "SELECT kind, run_id, root, path FROM parts WHERE dropped_at IS NULL ORDER BY kind, run_id, domain, shard"
    ).fetchall()
    out: dict[tuple[str, str], list[str]] = {}
    for kind, run_id, root, path in rows:
        out.setdefault((kind, run_id), []).append(full_path(resolve_root(root, catalogue_folder), path))
    return out


def view_statements(con: duckdb.DuckDBPyConnection, catalogue_folder: Path, temp: bool = False) -> list[str]:
    """CREATE OR REPLACE [TEMP] VIEW statements of every view over parts, for the file in
    `catalogue_folder`."""
    files = served_files(con, catalogue_folder)
    latest = con.execute("SELECT run_id FROM latest_run").fetchall()
    latest_id = latest[0][0] if latest else None
    newest_items = con.execute(
        "SELECT p.run_id FROM parts p JOIN runs r USING (run_id) WHERE p.kind = 'items' AND p.dropped_at IS NULL "
        "ORDER BY r.seq DESC NULLS LAST LIMIT 1"
    ).fetchall()
    items_run = newest_items[0][0] if newest_items else None

    def every(kind: str) -> list[str]:
        return [f for (k, _), paths in sorted(files.items()) if k == kind for f in paths]

    def of_run(kind: str, run_id: str | None) -> list[str]:
        return files.get((kind, run_id), []) if run_id is not None else []

    create = "CREATE OR REPLACE TEMP VIEW" if temp else "CREATE OR REPLACE VIEW"
    items = scan_parts("items", of_run("items", items_run))
    return [
        f"{create} items AS SELECT item_id, domain, title, brand, categories, price, "
        f"{PRICE_AMOUNT} AS price_amount, updated_run_id FROM ({items})",
        f"{create} recommendations AS {scan_parts('recommendations', every('recommendations'))}",
        f"{create} user_profiles AS {scan_parts('user_profiles', every('user_profiles'))}",
        f"{create} serving AS {scan_parts('serving', every('serving'))}",
        f"{create} latest_recommendations AS SELECT r.*, i.title "
        f"FROM ({scan_parts('recommendations', of_run('recommendations', latest_id))}) r "
        "LEFT JOIN items i ON i.item_id = r.item_id",
        f"{create} latest_user_profiles AS {scan_parts('user_profiles', of_run('user_profiles', latest_id))}",
        f"{create} latest_serving AS {scan_parts('serving', of_run('serving', latest_id))}",
        f"{create} interactions AS {scan_parts('interactions', every('interactions'))}",
        f"{create} latest_interactions AS {scan_parts('interactions', of_run('interactions', latest_id))}",
    ]


def refresh_views(con: duckdb.DuckDBPyConnection, catalogue_folder: Path) -> None:
    """Rewrite the views over parts for the file's (new) folder; a no-op before the parts layout."""
    if schema_version(con) < PARTS_VERSION:
        return
    register_filesystems(con, remote_roots(con, catalogue_folder))
    try:
        for sql in view_statements(con, catalogue_folder):
            con.execute(sql)
    except duckdb.IOException as exc:
        raise WarehouseError(
            f"warehouse in {catalogue_folder}: a part its views read is missing or unreadable "
            f"({str(exc).strip().splitlines()[0]}); was the warehouse file moved without its parts folder?"
        ) from None
    con.execute(
        "INSERT INTO warehouse_info VALUES ('catalogue_folder', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [str(catalogue_folder)],
    )


def remote_roots(con: duckdb.DuckDBPyConnection, catalogue_folder: Path) -> set[str]:
    roots = {r[0] for r in con.execute("SELECT DISTINCT root FROM parts WHERE dropped_at IS NULL").fetchall()}
    return {resolve_root(r, catalogue_folder) for r in roots if "://" in r}


def prepare_reader(con: duckdb.DuckDBPyConnection, catalogue_folder: Path) -> bool:
    """Make a read-only connection's views right where the file is now: register remote roots'
    filesystems and, when the file was written in another folder and its parts are there too, re-point
    the views with temporary views of the same names. Returns whether the views were re-pointed."""
    if schema_version(con) < PARTS_VERSION:
        return False
    register_filesystems(con, remote_roots(con, catalogue_folder))
    recorded = con.execute("SELECT value FROM warehouse_info WHERE key = 'catalogue_folder'").fetchall()
    if recorded and recorded[0][0] == str(catalogue_folder):
        return False
    try:
        for sql in view_statements(con, catalogue_folder, temp=True):
            con.execute(sql)
    except duckdb.IOException:
        # The parts are not beside the file here (the file alone was copied): keep the views it has,
        # which name the parts where they were written (immutable files: the same rows, or a loud error).
        for name in PART_VIEWS:
            con.execute(f"DROP VIEW IF EXISTS temp.{name}")
        return False
    return True

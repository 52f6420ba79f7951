"""Readers for the raw formats. Each turns files into two Arrow tables of plain strings with
standard column names, plus the rows the reader itself could not parse.

Standard item columns: item_id, domain, title, brand, categories, price, description, attributes.
Standard interaction columns: user_id, item_id, domain, timestamp, position, rating.
Every row carries `_file` (its source path) and `_record` (1-based record number in that file), so a
quarantined row can be found again. Values are left as strings; parsing and checks happen in SQL
(see preprocess.py), where they are vectorised.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from bridgerec.tasks.ingest.settings import IngestSettings

ITEM_COLUMNS = ["item_id", "domain", "title", "brand", "categories", "price", "description", "attributes"]
INTERACTION_COLUMNS = ["user_id", "item_id", "domain", "timestamp", "position", "rating"]
TimestampUnit = Literal["auto", "s", "ms"]


class SourceError(ValueError):
    """A file is not what it claims to be; the message names the file and the problem."""


@dataclass
class RawTable:
    """Rows read from one or more files, all values as strings, plus reader-level rejects."""

    table: pa.Table
    rejects: list[dict] = field(default_factory=list)  # {file, record, reason, row}


@dataclass
class RawSource:
    items: RawTable
    interactions: RawTable
    timestamp_unit: TimestampUnit
    has_timestamp: bool
    has_position: bool
    domains_in_catalogue: list[str]


def input_files(settings: IngestSettings) -> dict[str, Path]:
    """The raw files a source reads, by role; their content hashes key the ingest manifest."""
    if settings.source == "generic":
        if settings.items is None or settings.interactions is None:
            raise SourceError(
                "source 'generic' needs ingest.items and ingest.interactions (or --items/--interactions)"
            )
        return {"items": settings.items, "interactions": settings.interactions}
    if not settings.amazon:
        raise SourceError(f"source {settings.source!r} needs ingest.amazon.<domain>.reviews and .meta")
    files: dict[str, Path] = {}
    for domain, pair in sorted(settings.amazon.items()):
        files[f"{domain}.meta"] = pair.meta
        files[f"{domain}.reviews"] = pair.reviews
    return files


def read_source(settings: IngestSettings) -> RawSource:
    files = input_files(settings)
    for role, path in files.items():
        if not Path(path).is_file():
            raise SourceError(f"{path}: file not found (ingest {role})")
    if settings.source == "generic":
        return _read_generic(files["items"], files["interactions"])
    return _read_amazon(settings)


# ---------------------------------------------------------------- generic


def _read_generic(items_path: Path, inter_path: Path) -> RawSource:
    items = _read_tabular(items_path, required=["item_id", "domain", "title"])
    inter = _read_tabular(inter_path, required=["user_id", "item_id", "domain"])
    names = set(inter.table.column_names)
    has_ts, has_pos = "timestamp" in names, "position" in names
    if not (has_ts or has_pos):
        raise SourceError(
            f"{inter_path}: needs a 'timestamp' or a 'position' column; found {sorted(names - {'_file', '_record'})}"
        )
    items.table = _standardise(items.table, ITEM_COLUMNS, pack_extra_into="attributes")
    inter.table = _standardise(inter.table, INTERACTION_COLUMNS)
    domains = sorted(set(pc.unique(items.table["domain"]).to_pylist()) - {None, ""})
    return RawSource(items, inter, "auto", has_ts, has_pos, [d.strip() for d in domains])


def _standardise(table: pa.Table, columns: list[str], pack_extra_into: str | None = None) -> pa.Table:
    """Select the standard columns (missing optional ones as nulls); pack other columns as JSON."""
    n = table.num_rows
    extra = [c for c in table.column_names if c not in columns and not c.startswith("_")]
    out = {}
    for c in columns:
        if c in table.column_names:
            out[c] = table[c]
        elif c == pack_extra_into and extra:
            # Optional text attributes (e.g. store, features) travel as one JSON object per item.
            con = duckdb.connect()
            con.register("extra", table.select(extra))
            pairs = ", ".join(f"'{e}', NULLIF(\"{e}\", '')" for e in extra)
            out[c] = con.sql(f"SELECT json_object({pairs})::VARCHAR AS a FROM extra").to_arrow_table()["a"]
            con.close()
        else:
            out[c] = pa.nulls(n, pa.string())
    out["_file"] = table["_file"]
    out["_record"] = table["_record"]
    return pa.table(out)


def _read_tabular(path: Path, required: list[str]) -> RawTable:
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        raw = _read_csv(path, delimiter="\t" if ".tsv" in name else ",")
    elif name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")):
        raw = _read_jsonl_flat(path)
    elif name.endswith(".parquet"):
        raw = _read_parquet(path)
    else:
        raise SourceError(f"{path}: unknown format (expected .csv, .csv.gz, .jsonl, .jsonl.gz or .parquet)")
    missing = [c for c in required if c not in raw.table.column_names]
    if missing:
        found = [c for c in raw.table.column_names if not c.startswith("_")]
        raise SourceError(f"{path}: missing required column(s) {missing}; found {found}")
    return raw


def _check_gzip(path: Path) -> None:
    """Read a gzip file through once so a corrupt or truncated one fails with its name."""
    if not path.name.lower().endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{path}: not a valid gzip file ({exc})") from None


def _read_csv(path: Path, delimiter: str) -> RawTable:
    _check_gzip(path)
    rejects: list[dict] = []
    header: list[str] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        reason = "too_few_fields" if row.actual_columns < row.expected_columns else "too_many_fields"
        rejects.append({"file": str(path), "record": row.number, "reason": reason, "row": row.text})
        return "skip"

    try:
        with pacsv.open_csv(
            path, parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=lambda _: "skip")
        ) as reader:
            header = reader.schema.names
    except pa.ArrowInvalid as exc:
        raise SourceError(f"{path}: cannot read the CSV header ({exc})") from None
    if len(set(header)) != len(header):
        raise SourceError(f"{path}: duplicate column names in header {header}")
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        msg = str(exc)
        hint = " (not UTF-8: wrong encoding?)" if "UTF8" in msg or "utf-8" in msg.lower() else ""
        raise SourceError(f"{path}: cannot parse as CSV{hint}: {msg.splitlines()[0]}") from None
    return RawTable(_with_provenance(table, path), rejects)


def _read_parquet(path: Path) -> RawTable:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(f"{path}: not a readable Parquet file ({exc})") from None
    table = table.cast(pa.schema([pa.field(c, pa.string()) for c in table.column_names]))
    return RawTable(_with_provenance(table, path))


def _with_provenance(table: pa.Table, path: Path) -> pa.Table:
    n = table.num_rows
    table = table.append_column(
        "_file", pa.array([str(path)] * n, pa.string()) if n else pa.array([], pa.string())
    )
    return table.append_column("_record", pa.array(range(1, n + 1), pa.int64()))


def _read_lines(path: Path) -> pa.Table:
    """A text file as one string column `line` (+ provenance); validates gzip and UTF-8."""
    _check_gzip(path)
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["line"], use_threads=False, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(
                delimiter="\x1f", quote_char=False, escape_char=False, newlines_in_values=False
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={"line": pa.string()}, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as exc:
        msg = str(exc)
        hint = " (not UTF-8: wrong encoding?)" if "UTF8" in msg else ""
        raise SourceError(f"{path}: cannot read as JSON lines{hint}: {msg.splitlines()[0]}") from None
    return _with_provenance(table, path)


def _json_fields(lines: pa.Table, path: Path, fields: dict[str, str]) -> RawTable:
    """Extract string fields from JSON lines with DuckDB; bad JSON lines become rejects.

    `fields` maps output column -> SQL expression over the JSON value `j` (a missing key gives NULL).
    """
    con = duckdb.connect()
    con.register("lines", lines)
    select = ", ".join(f"{expr} AS {col}" for col, expr in fields.items())
    table = con.sql(
        f"""
        WITH parsed AS (SELECT _file, _record, TRY_CAST(line AS JSON) AS j FROM lines)
        SELECT {select}, _file, _record FROM parsed WHERE json_type(j) = 'OBJECT' ORDER BY _record
        """
    ).to_arrow_table()
    bad = con.execute(
        "SELECT _record, line FROM lines WHERE json_type(TRY_CAST(line AS JSON)) IS DISTINCT FROM 'OBJECT'"
    ).fetchall()
    con.close()
    rejects = [{"file": str(path), "record": r, "reason": "malformed_json", "row": line} for r, line in bad]
    return RawTable(table, rejects)


def _read_jsonl_flat(path: Path) -> RawTable:
    """Generic JSON lines: every top-level key becomes a string column (nested values as JSON)."""
    lines = _read_lines(path)
    con = duckdb.connect()
    con.register("lines", lines)
    keys = [
        r[0]
        for r in con.sql(
            "SELECT DISTINCT unnest(json_keys(j)) FROM (SELECT TRY_CAST(line AS JSON) AS j FROM lines) WHERE json_type(j) = 'OBJECT'"
        ).fetchall()
    ]
    con.close()
    fields = {k: f"json_extract_string(j, '$.\"{k}\"')" for k in sorted(keys) if k.isidentifier()}
    if not fields:
        raise SourceError(f"{path}: no JSON objects found")
    return _json_fields(lines, path, fields)


# ---------------------------------------------------------------- amazon


def _list_text(key: str, sep: str) -> str:
    """A JSON list of strings joined by `sep`, or the plain string if it is one."""
    return (
        f"COALESCE(array_to_string(TRY_CAST(json_extract(j, '$.{key}') AS VARCHAR[]), '{sep}'),"
        f" json_extract_string(j, '$.{key}'))"
    )


AMAZON_FIELDS: dict[str, dict[str, dict[str, str]]] = {
    "amazon2018": {
        "reviews": {
            "user_id": "json_extract_string(j, '$.reviewerID')",
            "item_id": "json_extract_string(j, '$.asin')",
            "timestamp": "json_extract_string(j, '$.unixReviewTime')",
            "rating": "json_extract_string(j, '$.overall')",
        },
        "meta": {
            "item_id": "json_extract_string(j, '$.asin')",
            "title": "json_extract_string(j, '$.title')",
            "brand": "json_extract_string(j, '$.brand')",
            "categories": _list_text("category", " > "),
            "price": "json_extract_string(j, '$.price')",
            "description": _list_text("description", " "),
        },
    },
    "amazon2023": {
        "reviews": {
            "user_id": "json_extract_string(j, '$.user_id')",
            "item_id": "json_extract_string(j, '$.parent_asin')",
            "timestamp": "json_extract_string(j, '$.timestamp')",
            "rating": "json_extract_string(j, '$.rating')",
        },
        "meta": {
            "item_id": "json_extract_string(j, '$.parent_asin')",
            "title": "json_extract_string(j, '$.title')",
            "brand": "json_extract_string(j, '$.store')",
            "categories": _list_text("categories", " > "),
            "price": "json_extract_string(j, '$.price')",
            "description": _list_text("description", " "),
            "attributes": "CASE WHEN json_extract(j, '$.features') IS NOT NULL THEN json_object('features', json_extract(j, '$.features'))::VARCHAR END",
        },
    },
}


def _read_amazon(settings: IngestSettings) -> RawSource:
    spec = AMAZON_FIELDS[settings.source]
    item_parts, inter_parts, item_rejects, inter_rejects = [], [], [], []
    for domain, pair in sorted(settings.amazon.items()):
        for kind, path, parts, rejects, columns in (
            ("meta", pair.meta, item_parts, item_rejects, ITEM_COLUMNS),
            ("reviews", pair.reviews, inter_parts, inter_rejects, INTERACTION_COLUMNS),
        ):
            path = Path(path)
            if path.name.lower().endswith(".parquet"):
                raw = _read_parquet(path)
                raw.table = _rename_amazon_parquet(raw.table, spec[kind], path)
            else:
                raw = _json_fields(_read_lines(path), path, spec[kind])
            table = raw.table.append_column("domain", pa.array([domain] * raw.table.num_rows, pa.string()))
            parts.append(_standardise(table, columns))
            rejects.extend(raw.rejects)
    items = RawTable(pa.concat_tables(item_parts), item_rejects)
    inter = RawTable(pa.concat_tables(inter_parts), inter_rejects)
    unit: TimestampUnit = "s" if settings.source == "amazon2018" else "ms"
    return RawSource(items, inter, unit, True, False, sorted(settings.amazon))


def _rename_amazon_parquet(table: pa.Table, fields: dict[str, str], path: Path) -> pa.Table:
    """Amazon data as Parquet: map its raw column names to the standard ones."""
    out = {}
    for col, expr in fields.items():
        raw_key = expr.split("'$.")[1].split("'")[0] if "'$." in expr else None
        if raw_key and raw_key in table.column_names:
            out[col] = table[raw_key]
    for col in ("item_id",):
        if col not in out:
            raise SourceError(f"{path}: missing the column that maps to {col!r}")
    out["_file"], out["_record"] = table["_file"], table["_record"]
    return pa.table(out)

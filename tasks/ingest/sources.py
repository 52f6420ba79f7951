"""Readers for the raw formats. Each turns files into two Arrow tables of plain strings with
standard column names, plus the rows the reader itself could not parse.

Standard item columns: item_id, domain, title, brand, categories, price, description, attributes.
Standard interaction columns: user_id, item_id, domain, timestamp, position, rating.
Every row carries `_file` (its source path) and `_record` (where it is in that file: the line a CSV
record starts on, the header being line 1; the line of a JSON line; the row of a Parquet file, from 1),
so a quarantined row can be found again. Values are left as strings; parsing and checks happen in SQL
(see preprocess.py), where they are vectorised.

JSON lines and Parquet go through one path: a Parquet row is serialised to a JSON object (only the
columns the source maps are read) and both are then read by the same field expressions, so a list
column is joined the same way whichever format it came in. A line DuckDB cannot parse as a JSON object
gets a second chance in Python: `json.loads` (which accepts escapes of lone UTF-16 surrogates) and then
`ast.literal_eval` (Amazon's older metadata files are Python dict literals, not JSON; never `eval`).
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from bridgerec.runtime.errors import InputError
from bridgerec.runtime.logs import get_logger
from bridgerec.tasks.ingest import csvlines
from bridgerec.tasks.ingest.settings import ColumnMap, IngestSettings

ITEM_COLUMNS = ["item_id", "domain", "title", "brand", "categories", "price", "description", "attributes"]
INTERACTION_COLUMNS = ["user_id", "item_id", "domain", "timestamp", "position", "rating"]
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_LITERAL_CHARS = 1 << 20  # longer lines are not offered to ast.literal_eval (its parser recurses)


class SourceError(InputError):
    """A file is not what it claims to be; the message names the file (and column) and the problem."""


@dataclass
class RawTable:
    """Rows read from one or more files, all values as strings, plus reader-level rejects."""

    table: pa.Table
    # {file, record, reason, row, item_id}: item_id where the reader can tell it (a CSV catalogue row)
    rejects: list[dict] = field(default_factory=list)
    # The id columns' types where the file has types (Parquet: e.g. {"item_id": "BIGINT"}), for messages.
    column_types: dict[str, str] = field(default_factory=dict)


@dataclass
class RawSource:
    items: RawTable
    interactions: RawTable
    has_timestamp: bool
    has_position: bool
    domains_in_catalogue: list[str]


def input_files(settings: IngestSettings) -> dict[str, Path]:
    """The raw files a source reads, by role; their content hashes key the ingest manifest."""
    if settings.source == "generic":
        if settings.items is None or settings.interactions is None:
            raise SourceError(
                "source 'generic' needs ingest.items and ingest.interactions (in the config, --set "
                "ingest.items=FILE, or `bridgerec ingest --items/--interactions`)"
            )
        return {"items": settings.items, "interactions": settings.interactions}
    if not settings.amazon:
        raise SourceError(f"source {settings.source!r} needs ingest.amazon.<domain>.reviews and .meta")
    files: dict[str, Path] = {}
    for domain, pair in sorted(settings.amazon.items()):
        files[f"{domain}.meta"] = pair.meta
        files[f"{domain}.reviews"] = pair.reviews
    return files


def check_input_files(settings: IngestSettings) -> dict[str, Path]:
    """The configured input files by role; `SourceError` (exit 2, no traceback) naming a missing one."""
    files = input_files(settings)
    for role, path in files.items():
        if not Path(path).is_file():
            # A relative path is read from the working directory, which a cron job or a worker may not share.
            where = (
                ""
                if Path(path).is_absolute()
                else f"; relative paths are read from the working directory, {Path.cwd()}"
            )
            raise SourceError(f"{path}: file not found (ingest {role}{where})")
    return files


def read_source(settings: IngestSettings) -> RawSource:
    files = check_input_files(settings)
    if settings.source == "generic":
        return _read_generic(files["items"], files["interactions"], settings.columns)
    return _read_amazon(settings)


def _unexpected(path: Path, exc: Exception) -> SourceError:
    """A reader error no check foresaw, as one line naming the file."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SourceError(f"{path}: cannot read ({type(exc).__name__}: {first})")


# ---------------------------------------------------------------- generic


REQUIRED = {"items": ["item_id", "domain", "title"], "interactions": ["user_id", "item_id", "domain"]}


def check_columns(settings: IngestSettings) -> None:
    """The generic source's columns from its files' headers alone (CSV, TSV, Parquet), with the errors
    reading them gives: in a second, before the stage's engines and Prefect start (a missing column took
    15 to 19 s to report in a new user's trial). Best effort: a file whose header cannot be read here
    (JSON lines, a broken file) is left to the stage, which names its fault."""
    if settings.source != "generic":
        return
    files = check_input_files(settings)
    for role, required in REQUIRED.items():
        path = Path(files[role])
        name = path.name.lower()
        try:
            if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
                delimiter = "\t" if ".tsv" in name else ","
                with pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter)) as reader:
                    found = reader.schema.names
            elif name.endswith(".parquet"):
                found = list(_parquet_schema(path))
            else:
                continue
        except Exception:  # the stage reads the file again and names what is wrong
            continue
        rename = Rename(role, getattr(settings.columns, role))
        _check_mapping(path, found, rename)
        names = list(rename.names(found).values())
        missing = [c for c in required if c not in names]
        if missing:
            raise SourceError(_missing_columns(path, missing, found, rename))
        if role == "interactions":
            _check_order_column(path, names)


def _check_order_column(path: Path, names: list[str]) -> tuple[bool, bool]:
    """(has a timestamp, has a position) of an interactions file's columns (the source's names); one of
    them orders a user's sequence."""
    has_ts, has_pos = "timestamp" in names, "position" in names
    if not (has_ts or has_pos):
        raise SourceError(
            f"{path}: needs a 'timestamp' or a 'position' column; found "
            f"{sorted(n for n in names if not n.startswith('_'))}; name the file's own in "
            "ingest.columns.interactions (timestamp: <the file's column>)"
        )
    return has_ts, has_pos


def _read_generic(items_path: Path, inter_path: Path, columns: ColumnMap) -> RawSource:
    # Items: every column is used (extra text columns travel in `attributes`); interactions: only theirs.
    items = _read_tabular(
        items_path,
        required=REQUIRED["items"],
        wanted=None,
        rename=Rename("items", columns.items),
    )
    inter = _read_tabular(
        inter_path,
        required=REQUIRED["interactions"],
        wanted=INTERACTION_COLUMNS,
        rename=Rename("interactions", columns.interactions),
    )
    has_ts, has_pos = _check_order_column(inter_path, inter.table.column_names)
    items.table = _standardise(items.table, ITEM_COLUMNS, pack_extra_into="attributes")
    inter.table = _standardise(inter.table, INTERACTION_COLUMNS)
    domains = sorted(set(pc.unique(items.table["domain"]).to_pylist()) - {None, ""})
    return RawSource(items, inter, has_ts, has_pos, [d.strip() for d in domains])


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


@dataclass(frozen=True)
class Rename:
    """`ingest.columns.<kind>`: the file's own column for a column of the source (`columns`)."""

    kind: str  # items | interactions
    columns: Mapping[str, str]

    def name(self, file_column: str) -> str | None:
        """The source's name of a file column: its own, or the one it is mapped to; None for a file column
        whose name another column is mapped to (that one is read in its place)."""
        for source, own in self.columns.items():
            if own == file_column:
                return source
        return None if file_column in self.columns else file_column

    def names(self, file_columns: list[str]) -> dict[str, str]:
        """{file column: the source's name} of the columns read (see `name`)."""
        out = {}
        for c in file_columns:
            name = self.name(c)
            if name is not None:
                out[c] = name
        return out


def _read_tabular(path: Path, required: list[str], wanted: list[str] | None, rename: Rename) -> RawTable:
    """A generic file; `wanted` = the columns used by the source's names (None = all), the others are not
    read; `rename` gives the file's own names where they differ."""
    name = path.name.lower()
    try:
        if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
            raw, found = _read_csv(path, delimiter="\t" if ".tsv" in name else ",", rename=rename)
        elif name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")):
            raw, found = _read_jsonl_flat(path, wanted, rename)
        elif name.endswith(".parquet"):
            types = _parquet_schema(path)
            found = list(types)
            _check_mapping(path, found, rename)
            names = {k: v for k, v in rename.names(found).items() if wanted is None or v in wanted}
            missing = [c for c in required if c not in names.values()]
            if missing:
                raise SourceError(_missing_columns(path, missing, found, rename))
            keys = list(names)
            raw = _json_fields(_parquet_lines(path, keys), path, _generic_fields(names), set(keys))
            raw.column_types = {v: types[k] for k, v in names.items() if v in ID_COLUMNS}
            _note_numeric_ids(path, raw.column_types)
        else:
            raise SourceError(
                f"{path}: unknown format (expected .csv, .csv.gz, .jsonl, .jsonl.gz or .parquet)"
            )
    except (duckdb.Error, pa.ArrowException, RecursionError, MemoryError) as exc:
        raise _unexpected(path, exc) from exc
    _check_mapping(path, found, rename)
    missing = [c for c in required if c not in raw.table.column_names]
    if missing:
        raise SourceError(_missing_columns(path, missing, found, rename))
    return raw


def _check_mapping(path: Path, found: list[str], rename: Rename) -> None:
    """Every file column `ingest.columns` names is in the file (a misspelt optional one would otherwise
    read as an empty column)."""
    absent = {c: own for c, own in rename.columns.items() if own not in found}
    if absent:
        named = ", ".join(f"{c} -> {own!r}" for c, own in absent.items())
        raise SourceError(
            f"{path}: ingest.columns.{rename.kind} maps {named}, which the file does not have; found {found}"
        )


def _missing_columns(path: Path, missing: list[str], found: list[str], rename: Rename) -> str:
    """The error of a generic file without a required column: which, what the file has, and what to do
    (map the file's own names with `ingest.columns`: a new user's trial looked for a mapping)."""
    example = f"{missing[0]}: <the file's column>"
    return (
        f"{path}: missing required column(s) {missing}; found {found}; name the file's own columns in "
        f'ingest.columns.{rename.kind} ({example}; docs/ingest.md, "Sources")'
    )


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


TEXT_SNIFF = 1 << 16  # bytes of a file's start looked at before it is read as text
BINARY_SHARE = 0.3  # more than this share of those bytes not text: the file is not text
CONTROL = frozenset(range(32)) - {9, 10, 12, 13}  # control bytes text does not hold (tab, LF, FF, CR do)


def _check_text(path: Path) -> None:
    """Stop on a file that is not text at all (an image, a spreadsheet, random bytes, UTF-16) with one
    line that says so, instead of a parser's message that echoes its bytes. Not text: more than 30 % of
    the first 64 KiB are control bytes (NUL included) or bytes that are not UTF-8 (random bytes: ~60 %;
    UTF-16 English: ~50 % NULs). A stray control byte in a title, or Latin-1 text (a few bytes in a
    hundred), passes: the one is cleaned per row, the other gets its own message from the parser."""
    with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb") as fh:
        head = fh.read(TEXT_SNIFF)
    if not head:
        return
    control = sum(b in CONTROL for b in head)
    not_utf8 = head.decode("utf-8", errors="replace").count("\ufffd") - head.count("\ufffd".encode())
    share = (control + not_utf8) / len(head)
    if share > BINARY_SHARE:
        utf16 = head[:2] in (b"\xff\xfe", b"\xfe\xff") or head.count(0) > len(head) / 4
        what = "UTF-16 text? save it as UTF-8" if utf16 else "binary data?"
        raise SourceError(
            f"{path}: not a text file ({share:.0%} of its first {len(head):,} bytes are control bytes or "
            f"not UTF-8: {what})"
        )


def _read_csv(path: Path, delimiter: str, rename: Rename) -> tuple[RawTable, list[str]]:
    """(the records, the file's own column names); columns by the source's names (`rename`)."""
    _check_gzip(path)
    _check_text(path)
    rejects: list[dict] = []
    header: list[str] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        reason = "too_few_fields" if row.actual_columns < row.expected_columns else "too_many_fields"
        item_id = csvlines.field_of(row.text, delimiter, header, "item_id")
        rejects.append(
            {"file": str(path), "record": row.number, "reason": reason, "row": row.text, "item_id": item_id}
        )
        return "skip"

    try:
        with pacsv.open_csv(
            path, parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=lambda _: "skip")
        ) as reader:
            header = reader.schema.names
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: cannot read the CSV header (not UTF-8: wrong encoding?): {exc}") from None
    except pa.ArrowInvalid as exc:
        said = str(exc).splitlines()[0]
        raise SourceError(
            f"{path}: cannot read the CSV header ({said[:160]}{'...' if len(said) > 160 else ''})"
        ) from None
    if len(set(header)) != len(header):
        raise SourceError(f"{path}: duplicate column names in header {header}")
    found = list(header)
    # The source's names (a file column whose name another column is mapped to is set aside: `_unmapped_`)
    header = [rename.name(c) or f"_unmapped_{c}" for c in found]
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in found},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        msg = str(exc)
        hint = " (not UTF-8: wrong encoding?)" if "UTF8" in msg or "utf-8" in msg.lower() else ""
        raise SourceError(f"{path}: cannot parse as CSV{hint}: {msg.splitlines()[0]}") from None
    table = table.rename_columns(header)
    lines = csvlines.count_lines(path)
    if lines == 1 + table.num_rows + len(rejects):
        # One record per line: number the records by line (the rejects already are: pyarrow's row number).
        taken = np.array([r["record"] for r in rejects], np.int64)
        numbers = np.setdiff1d(np.arange(2, lines + 1, dtype=np.int64), taken)
        return RawTable(_with_provenance(table, path, numbers), rejects), found
    # Fewer records than lines: quoted values span lines (or blank lines sit between rows). Read it by
    # lines, so an unterminated quote cannot swallow the rows after it (tasks/ingest/csvlines.py).
    one_line = pc.invert(_any_line_break(table, header))
    known = (
        set(pc.utf8_trim_whitespace(table.filter(one_line)["domain"]).to_pylist())
        if "domain" in header
        else set()
    )
    try:
        table, rejects = csvlines.read_by_lines(path, delimiter, header, known)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: cannot parse as CSV (not UTF-8: wrong encoding?): {exc}") from None
    return RawTable(table, rejects), found


def _any_line_break(table: pa.Table, columns: list[str]) -> pa.ChunkedArray:
    """[rows] bool: whether any of the row's values holds a line break (a value that spanned lines)."""
    found = pa.chunked_array([pa.array([False] * table.num_rows, pa.bool_())])
    for c in columns:
        found = pc.or_(found, pc.match_substring_regex(table[c], "[\\r\\n]"))
    return found


def _parquet_columns(path: Path) -> list[str]:
    """The top-level column names of a Parquet file (its schema only)."""
    return list(_parquet_schema(path))


def _parquet_schema(path: Path) -> dict[str, str]:
    """The top-level columns of a Parquet file and their DuckDB types (its schema only)."""
    con = duckdb.connect()
    try:
        described = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
        return {str(r[0]): str(r[1]) for r in described}
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0]
        raise SourceError(f"{path}: not a readable Parquet file ({first})") from None
    finally:
        con.close()


def _parquet_lines(path: Path, keys: list[str]) -> pa.Table:
    """The `keys` columns of a Parquet file, each row as one JSON object text (`line`) + provenance.

    Only these columns are read. Lists, structs and maps become JSON arrays and objects, numbers JSON
    numbers, timestamps and dates strings, so the JSON-lines field expressions read them unchanged. A
    column that cannot be turned into JSON is named in the error.
    """
    con = duckdb.connect()
    try:
        pairs = ", ".join(f"{_ident(k)} := {_ident(k)}" for k in keys) or "none := NULL"
        sql = (
            f"SELECT to_json(struct_pack({pairs}))::VARCHAR AS line, ? AS _file, "
            "CAST(file_row_number + 1 AS BIGINT) AS _record "
            "FROM read_parquet(?, file_row_number = true) ORDER BY file_row_number"
        )
        try:
            return con.sql(sql, params=[str(path), str(path)]).to_arrow_table()
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0]
            for k in keys:  # name the column that fails, where one does
                try:
                    con.execute(
                        f"SELECT to_json({_ident(k)})::VARCHAR FROM read_parquet(?)", [str(path)]
                    ).fetchall()
                except duckdb.Error as col_exc:
                    col_first = str(col_exc).strip().splitlines()[0]
                    raise SourceError(f"{path}: column {k!r} cannot be read ({col_first})") from None
            raise SourceError(f"{path}: not a readable Parquet file ({first})") from None
    finally:
        con.close()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _with_provenance(table: pa.Table, path: Path, records: np.ndarray | None = None) -> pa.Table:
    """`_file` and `_record` columns: the record numbers given (a CSV's line numbers), else 1..n."""
    n = table.num_rows
    table = table.append_column(
        "_file", pa.array([str(path)] * n, pa.string()) if n else pa.array([], pa.string())
    )
    numbers = pa.array(records if records is not None else range(1, n + 1), pa.int64())
    return table.append_column("_record", numbers)


def _read_lines(path: Path) -> pa.Table:
    """A text file as one string column `line` (+ provenance); validates gzip and UTF-8."""
    _check_gzip(path)
    _check_text(path)
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
        raise SourceError(f"{path}: cannot read as JSON lines{hint}: {msg.splitlines()[0][:160]}") from None
    return _with_provenance(table, path)


def _parse_object(line: str) -> tuple[dict | None, str]:
    """Python's second opinion on a line DuckDB could not read as a JSON object: the object and how it
    was read ('json' or 'python_literal'), or (None, '') when it is neither."""
    try:
        value = json.loads(line)
        if isinstance(value, dict):
            return value, "json"
    except (ValueError, RecursionError):
        pass
    text = line.strip()
    if text.startswith("{") and len(text) <= _MAX_LITERAL_CHARS:
        try:
            value = ast.literal_eval(text)  # literals only: no names, calls or attribute access
            if isinstance(value, dict):
                return value, "python_literal"
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return None, ""


def _scrub(value: Any) -> tuple[Any, bool]:
    """`value` with lone UTF-16 surrogates replaced by U+FFFD, and whether there were any."""
    if isinstance(value, str):
        if _LONE_SURROGATE.search(value):
            return _LONE_SURROGATE.sub("\ufffd", value), True
        return value, False
    if isinstance(value, dict):
        out, bad = {}, False
        for k, v in value.items():
            v2, b = _scrub(v)
            out[str(k)], bad = v2, bad or b
        return out, bad
    if isinstance(value, list | tuple | set | frozenset):
        items = [_scrub(v) for v in value]
        return [v for v, _ in items], any(b for _, b in items)
    return value, False


def _repair_lines(lines: pa.Table, path: Path, used_keys: set[str] | None) -> tuple[pa.Table, list[dict]]:
    """Give the lines DuckDB cannot read as a JSON object a second chance in Python.

    A Python dict literal is read with `ast.literal_eval`. Text with a lone surrogate escape (valid
    JSON that Python and DuckDB cannot encode) costs the row only when it is in a key the source uses
    (`used_keys`; None = every key): then the row is quarantined as `invalid_unicode`; elsewhere it is
    replaced by U+FFFD. Lines that are neither become `malformed_json` rejects.
    """
    con = duckdb.connect()
    con.register("lines", lines)
    bad = con.execute(
        "SELECT _record, line FROM lines WHERE json_type(TRY_CAST(line AS JSON)) IS DISTINCT FROM 'OBJECT'"
    ).fetchall()
    if not bad:
        con.close()
        return lines, []
    fixed_records: list[int] = []
    fixed_lines: list[str] = []
    rejects: list[dict] = []
    for record, line in bad:
        obj, _ = _parse_object(line)
        reason = "malformed_json"
        if obj is not None:
            bad_keys = {str(k) for k, v in obj.items() if _scrub(v)[1]}
            if bad_keys and (used_keys is None or bad_keys & used_keys):
                reason = "invalid_unicode"
            else:
                try:
                    clean = {str(k): _scrub(v)[0] for k, v in obj.items()}
                    fixed_lines.append(json.dumps(clean, ensure_ascii=False, allow_nan=False, default=str))
                    fixed_records.append(record)
                    continue
                except (ValueError, TypeError, RecursionError):
                    pass
        shown = _LONE_SURROGATE.sub("\ufffd", line)
        rejects.append({"file": str(path), "record": record, "reason": reason, "row": shown})
    con.register("fixed", pa.table({"_record": pa.array(fixed_records, pa.int64()), "fixed": fixed_lines}))
    rejected = pa.table({"_record": pa.array([r["record"] for r in rejects], pa.int64())})
    con.register("rejected", rejected)
    repaired = con.sql(
        """
        SELECT COALESCE(f.fixed, l.line) AS line, l._file, l._record
        FROM lines l LEFT JOIN fixed f USING (_record)
        WHERE l._record NOT IN (SELECT _record FROM rejected) ORDER BY l._record
        """
    ).to_arrow_table()
    con.close()
    return repaired, rejects


def _json_fields(lines: pa.Table, path: Path, fields: dict[str, str], used_keys: set[str] | None) -> RawTable:
    """Extract string fields from JSON lines with DuckDB; unreadable lines become rejects.

    `fields` maps output column -> SQL expression over the JSON value `j` (a missing key gives NULL);
    `used_keys` are the raw keys those expressions read (None = all).
    """
    lines, rejects = _repair_lines(lines, path, used_keys)
    con = duckdb.connect()
    con.register("lines", lines)
    select = ", ".join(f"{expr} AS {_ident(col)}" for col, expr in fields.items())
    table = con.sql(
        f"""
        WITH parsed AS (SELECT _file, _record, TRY_CAST(line AS JSON) AS j FROM lines)
        SELECT {select}, _file, _record FROM parsed WHERE json_type(j) = 'OBJECT' ORDER BY _record
        """
    ).to_arrow_table()
    con.close()
    return RawTable(table, rejects)


def _note_numeric_ids(path: Path, types: dict[str, str]) -> None:
    """Log an id column stored as numbers: ids that had leading zeros lost them when they were written
    (preprocess names them when the catalogue still has them); float ids are read as integers."""
    for column, kind in types.items():
        if kind in _FLOAT_TYPES:
            get_logger().warning(
                "ingest: %s stores %s as %s: integral values are read as integers (105.0 -> '105'); "
                "ids are safer written as text",
                path, column, kind,
            )  # fmt: skip
        elif kind != "VARCHAR":
            get_logger().info("ingest: %s stores %s as %s (read as text)", path, column, kind)


ID_COLUMNS = ("user_id", "item_id")
_FLOAT_TYPES = {"FLOAT", "DOUBLE", "REAL"}
_MAX_EXACT_FLOAT_ID = 2**53  # integers above it are not all exact in a float64


def _id_text(key: str) -> str:
    """An id as text: a JSON number that is an integral float (105.0, what a float column or pandas'
    NaN-promoted int column writes) as the integer it stands for ('105'); anything else as written."""
    path = _sql_string(_json_path(key))
    value = f"TRY_CAST(json_extract(j, {path}) AS DOUBLE)"
    return (
        f"CASE WHEN json_type(j, {path}) = 'DOUBLE' AND {value} = round({value}) "
        f"AND abs({value}) < {_MAX_EXACT_FLOAT_ID} THEN CAST(CAST({value} AS BIGINT) AS VARCHAR) "
        f"ELSE json_extract_string(j, {path}) END"
    )


def _generic_fields(names: dict[str, str]) -> dict[str, str]:
    """Field expressions of a generic JSON object, by the source's name of each key read (`names`: key
    -> name): each as text (ids: `_id_text`); `categories` and `description` lists joined as the Amazon
    readers join them, other nested values kept as JSON text."""
    out = {}
    for k, name in names.items():
        if name in ID_COLUMNS:
            out[name] = _id_text(k)
        elif name == "categories":
            out[name] = _list_text(k, " > ")
        elif name == "description":
            out[name] = _list_text(k, " ")
        else:
            out[name] = f"json_extract_string(j, {_sql_string(_json_path(k))})"
    return out


def _json_path(key: str) -> str:
    return '$."' + key.replace('"', '\\"') + '"'


def _read_jsonl_flat(path: Path, wanted: list[str] | None, rename: Rename) -> tuple[RawTable, list[str]]:
    """Generic JSON lines: every top-level key (or those of the `wanted` names) becomes a string column,
    by the source's name (`rename`); with the keys found."""
    used = None if wanted is None else {rename.columns.get(w, w) for w in wanted}
    lines, rejects = _repair_lines(_read_lines(path), path, used)
    con = duckdb.connect()
    con.register("lines", lines)
    keys = [
        r[0]
        for r in con.sql(
            "SELECT DISTINCT unnest(json_keys(j)) FROM (SELECT TRY_CAST(line AS JSON) AS j FROM lines) WHERE json_type(j) = 'OBJECT'"
        ).fetchall()
    ]
    con.close()
    found = sorted(keys)
    names = {
        k: v
        for k, v in rename.names(found).items()
        if (k.isidentifier() or k in rename.columns.values()) and (wanted is None or v in wanted)
    }
    if not keys:
        raise SourceError(f"{path}: no JSON objects found")
    raw = _json_fields(lines, path, _generic_fields(names), set(names))
    raw.rejects = rejects + raw.rejects
    return raw, found


# ---------------------------------------------------------------- amazon


def _list_text(key: str, sep: str) -> str:
    """A JSON list of strings joined by `sep`, or the plain string if it is one."""
    path = _sql_string(_json_path(key))
    return (
        f"COALESCE(array_to_string(TRY_CAST(json_extract(j, {path}) AS VARCHAR[]), '{sep}'),"
        f" json_extract_string(j, {path}))"
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
            # 2018 files: `category` (a list); the older (2014) files: `categories` (a list of lists)
            "categories": f"COALESCE({_list_text('category', ' > ')}, "
            "array_to_string(TRY_CAST(json_extract(j, '$.categories[0]') AS VARCHAR[]), ' > '))",
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


def mapped_keys(fields: dict[str, str]) -> set[str]:
    """The raw keys a set of field expressions reads ('$.key' or '$."key"')."""
    return {
        m[0] or m[1]
        for m in re.findall(r"'\$\.(?:\"([^\"]+)\"|([A-Za-z_][A-Za-z0-9_]*))", " ".join(fields.values()))
    }


def _read_amazon(settings: IngestSettings) -> RawSource:
    spec = AMAZON_FIELDS[settings.source]
    item_parts: list[pa.Table] = []
    inter_parts: list[pa.Table] = []
    item_rejects: list[dict[str, Any]] = []
    inter_rejects: list[dict[str, Any]] = []
    for domain, pair in sorted(settings.amazon.items()):
        for kind, path, parts, rejects, columns in (
            ("meta", pair.meta, item_parts, item_rejects, ITEM_COLUMNS),
            ("reviews", pair.reviews, inter_parts, inter_rejects, INTERACTION_COLUMNS),
        ):
            path = Path(path)
            keys = mapped_keys(spec[kind])
            try:
                if path.name.lower().endswith(".parquet"):
                    found = _parquet_columns(path)
                    id_key = mapped_keys({"item_id": spec[kind]["item_id"]})
                    if not id_key & set(found):
                        raise SourceError(
                            f"{path}: missing the column that maps to 'item_id' ({sorted(id_key)[0]}); found {found}"
                        )
                    lines = _parquet_lines(path, [c for c in found if c in keys])
                else:
                    lines = _read_lines(path)
                raw = _json_fields(lines, path, spec[kind], keys)
            except (duckdb.Error, pa.ArrowException, RecursionError, MemoryError) as exc:
                raise _unexpected(path, exc) from exc
            table = raw.table.append_column("domain", pa.array([domain] * raw.table.num_rows, pa.string()))
            parts.append(_standardise(table, columns))
            rejects.extend(raw.rejects)
    items = RawTable(pa.concat_tables(item_parts), item_rejects)
    inter = RawTable(pa.concat_tables(inter_parts), inter_rejects)
    return RawSource(items, inter, True, False, sorted(settings.amazon))

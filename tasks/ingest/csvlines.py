"""A CSV file's records by physical line, for the files whose quoted values span lines.

pyarrow (the fast reader, sources.py) follows RFC 4180: a quoted value may hold line breaks, so one
unterminated quote (`"Wok 14`, or inner quotes not doubled) makes the rest of the file, or everything up
to the next stray quote, one value: the rows it swallows are neither kept nor quarantined. When a file
has fewer records than lines, `read_by_lines` reads it again here, line by line, and decides for each
quoted value that spans lines whether it is a real multi-line value (a description with line breaks) or
a quote that never closed on its line:

- a line inside the open value that reads, on its own, as a complete record (the header's number of
  fields, every quote closed, and a `domain` value that the file's one-line records use) is a record:
  the quote that opened the value is unterminated. Its record (the line that opened it, and any lines
  before this one) is quarantined as `unterminated_quote`, and reading starts afresh at this line;
- a quote still open at the end of the file is unterminated too;
- otherwise the value is a multi-line value, read as RFC 4180 reads it.

Every record is numbered by the physical line it starts on (the header is line 1), so a quarantined row
names the line a user opens the file at.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import pyarrow as pa

QUOTE = '"'


@contextmanager
def open_text(path: Path) -> Iterator[TextIO]:
    """The file as UTF-8 text (a BOM dropped), gzip or not; line endings kept (\\n, \\r\\n, \\r)."""
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as fh:
            yield fh
    else:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            yield fh


def count_lines(path: Path) -> int:
    """Physical lines of a file up to its last non-blank one (blank lines at the end, which no reader
    counts as records, are left out), read in 16 MiB chunks. A file with CR-only line breaks counts
    as one line (so it is read by lines)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    n, tail = 0, b""
    with opener(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            n += chunk.count(b"\n")
            tail = (tail + chunk)[-4096:]
    content = tail.rstrip(b"\r\n")
    if not content:
        return 0 if n == tail.count(b"\n") else n  # an empty file, or blank lines beyond the tail
    return n - tail[len(content) :].count(b"\n") + 1


def quote_open_after(line: str, delimiter: str, inside: bool) -> bool:
    """Whether a quoted value is still open at the end of `line` (RFC 4180, leniently: a quote that
    does not start a field is a literal; `""` inside a quoted value is one quote; text after a closing
    quote belongs to the field). `inside`: the line starts inside an open quoted value."""
    at_start = not inside
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if inside:
            if c == QUOTE:
                if i + 1 < n and line[i + 1] == QUOTE:
                    i += 1  # an escaped quote
                else:
                    inside = False
        elif c == delimiter:
            at_start = True
            i += 1
            continue
        elif c == QUOTE and at_start:
            inside = True
        at_start = False
        i += 1
    return inside


def _fields(text: str, delimiter: str) -> list[str]:
    """One record's fields (the text may hold line breaks inside quoted values)."""
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=False))
    return [f for row in rows for f in row] if len(rows) != 1 else rows[0]


def field_of(text: str, delimiter: str, header: list[str], column: str) -> str | None:
    """The value of `column` in a rejected row's text, where the row reaches that far (a catalogue
    row's item id, so that its interactions can be told apart from ones naming unknown items)."""
    if column not in header:
        return None
    fields = _fields(_strip_eol(text), delimiter)
    i = header.index(column)
    return fields[i].strip() if i < len(fields) and fields[i].strip() else None


def _strip_eol(line: str) -> str:
    return line.rstrip("\r\n")


def read_by_lines(
    path: Path, delimiter: str, header: list[str], known_domains: set[str]
) -> tuple[pa.Table, list[dict]]:
    """(the records as a table of string columns plus `_file` and `_record` = their first line,
    the rejects: {file, record, reason, row, item_id}) of a CSV file whose header is `header`."""
    n = len(header)
    domain_col = header.index("domain") if "domain" in header else None
    columns: list[list[str]] = [[] for _ in range(n)]
    records: list[int] = []
    rejects: list[dict] = []

    def looks_like_a_record(line: str) -> bool:
        text = _strip_eol(line)
        if not text or quote_open_after(text, delimiter, inside=False):
            return False
        fields = _fields(text, delimiter)
        return len(fields) == n and (domain_col is None or fields[domain_col].strip() in known_domains)

    def reject(first: int, lines: list[str], reason: str) -> None:
        row, item_id = _strip_eol("".join(lines)), field_of(lines[0], delimiter, header, "item_id")
        rejects.append({"file": str(path), "record": first, "reason": reason, "row": row, "item_id": item_id})

    def emit(first: int, lines: list[str]) -> None:
        fields = _fields(_strip_eol("".join(lines)), delimiter)
        if len(fields) != n:
            reject(first, lines, "too_few_fields" if len(fields) < n else "too_many_fields")
            return
        for col, value in zip(columns, fields, strict=True):
            col.append(value)
        records.append(first)

    pending: list[str] = []  # the lines of a record whose quoted value is open
    first = 0
    with open_text(path) as fh:
        for number, line in enumerate(fh, start=1):
            if number == 1:
                continue  # the header (read by pyarrow)
            if pending:
                if looks_like_a_record(line):
                    reject(first, pending, "unterminated_quote")
                    pending = []
                else:
                    pending.append(line)
                    if not quote_open_after(_strip_eol(line), delimiter, inside=True):
                        emit(first, pending)
                        pending = []
                    continue
            if not _strip_eol(line):
                continue  # a blank line is no record (as pyarrow reads it)
            if quote_open_after(_strip_eol(line), delimiter, inside=False):
                first, pending = number, [line]
            else:
                emit(number, [line])
    if pending:
        reject(first, pending, "unterminated_quote")
    table = pa.table({name: pa.array(col, pa.string()) for name, col in zip(header, columns, strict=True)})
    table = table.append_column("_file", pa.array([str(path)] * len(records), pa.string()))
    return table.append_column("_record", pa.array(records, pa.int64())), rejects

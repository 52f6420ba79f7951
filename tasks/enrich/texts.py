"""Item texts from per-domain templates, and their hashes (the key of the embedding cache)."""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

from bridgerec.tasks.enrich.settings import TEMPLATE_FIELDS, EnrichSettings

_SPACE = re.compile(r"\s+")


def clean_field(value: str | None, cap: int | None, missing: str) -> str:
    """One field as it goes into a text: whitespace collapsed, cut at a word boundary to `cap`
    characters, `missing` when empty. The text is the catalogue's as ingest cleaned it (HTML entities
    decoded, markup removed: tasks/ingest/text.py), the same the warehouse and `bridgerec recs` show;
    it is not decoded again here."""
    if value is None:
        return missing
    text = _SPACE.sub(" ", str(value)).strip()
    if not text:
        return missing
    if cap is not None and len(text) > cap:
        cut = text[:cap]
        space = cut.rfind(" ")
        text = (cut[:space] if space > cap // 2 else cut).rstrip(" ,;:-")
    return text


def item_texts(items: pa.Table, settings: EnrichSettings) -> list[str]:
    """The embedding text of every item (rows of ingest items.parquet), in row order."""
    columns = {
        f: items[f].to_pylist() if f in items.column_names else [None] * items.num_rows
        for f in TEMPLATE_FIELDS
    }
    domains = items["domain"].to_pylist()
    templates = settings.templates
    out = []
    for row, domain in enumerate(domains):
        template = templates.get(domain, templates["*"])
        fields = {
            f: clean_field(columns[f][row], settings.field_caps.get(f), settings.missing)
            for f in TEMPLATE_FIELDS
        }
        out.append(template.format(domain=domain, **fields))
    return out


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

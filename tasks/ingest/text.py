"""Catalogue text cleaned once, at ingest: HTML entities decoded, markup removed, whitespace collapsed.

Every later reader (the embedding texts, the LLM prompts, the warehouse `items` table, the
`latest_recommendations` view, `bridgerec recs`) sees this text. Entities are decoded with the standard
library's `html.unescape`; markup is removed by the standard library's HTML parser (`html.parser`),
which knows tags, comments and character references, not by a regular expression. The raw rows of
quarantined records keep the text as read.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pyarrow as pa

CLEANED_COLUMNS = ("title", "brand", "categories", "price", "description")

_SPACE = re.compile(r"\s+")
_TAG_START = re.compile(r"<[A-Za-z/!?]")
# Tags that separate words; inline ones (b, i, span, a, ...) join their text to the neighbours'.
_BREAKS = frozenset(
    [
        "br",
        "p",
        "div",
        "li",
        "ul",
        "ol",
        "tr",
        "td",
        "th",
        "table",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "dd",
        "dt",
        "dl",
        "section",
        "article",
        "header",
        "footer",
    ]
)
_SKIP = frozenset({"script", "style"})
_MAX_UNESCAPE_PASSES = 2  # Amazon text is often encoded twice ("&amp;quot;"); a third pass is rare


class _TextOnly(HTMLParser):
    """Collects the text of an HTML fragment (character references decoded by the parser)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self._skipping += 1
        elif tag in _BREAKS:
            self.parts.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BREAKS:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in _BREAKS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def clean_text(value: str | None) -> str | None:
    """`value` as readers should see it: markup removed, entities decoded (at most twice, for
    double-encoded text), whitespace collapsed and trimmed. None stays None; text that is only markup
    becomes ''."""
    if value is None:
        return None
    text = value
    if _TAG_START.search(text):
        parser = _TextOnly()
        parser.feed(text)
        parser.close()
        text = "".join(parser.parts)
        passes = 1  # the parser decoded one level of references
    else:
        passes = 0
    while passes < _MAX_UNESCAPE_PASSES and "&" in text:
        decoded = html.unescape(text)
        if decoded == text:
            break
        text, passes = decoded, passes + 1
    return _SPACE.sub(" ", text).strip()


def clean_text_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`clean_text` over a string column (used as a vectorised DuckDB function)."""
    return pa.array([clean_text(v) for v in values.to_pylist()], pa.string())

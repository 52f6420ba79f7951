"""Catalogue text cleaned once, at ingest: terminal escape sequences and control characters removed,
HTML entities decoded, markup removed, whitespace collapsed.

Every later reader (the embedding texts, the LLM prompts, the warehouse `items` table, the
`latest_recommendations` view, `bridgerec recs`) sees this text. Entities are decoded with the standard
library's `html.unescape`; markup is removed by the standard library's HTML parser (`html.parser`),
which knows tags, comments and character references, not by a regular expression. The raw rows of
quarantined records keep the text as read.

Control characters are data no reader wants and a terminal obeys: escape sequences (ECMA-48: CSI
`ESC [ ... final`, such as colours; OSC `ESC ] ... BEL` or `ESC ] ... ESC \\`, such as setting the window
title; string commands DCS, SOS, PM, APC; two-character `ESC x` sequences) are removed whole, in their
7-bit and 8-bit (C1) forms; every other C0 or C1 control character (NUL, BEL, backspace, CR, ...), DEL
and the bidirectional overrides and isolates (U+202A..U+202E, U+2066..U+2069, which reorder what a
terminal shows) becomes a space, then collapsed with the other whitespace. Entities are decoded before
this step (`html.unescape` itself drops references to control characters, such as `&#27;`).
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
# ECMA-48 escape sequences, 7-bit (ESC + letter) and 8-bit (C1) introducers: string commands (OSC, DCS,
# SOS, PM, APC) up to their terminator (BEL or ST) or the end of the text; CSI with its parameter and
# intermediate bytes up to the final byte; any other ESC with its intermediates and final character.
_ESCAPES = re.compile(
    r"(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c|$)"
    r"|(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]?"
)
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
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


def strip_controls(text: str) -> str:
    """`text` without escape sequences (removed whole) and control characters (each becomes a space)."""
    if _CONTROLS.search(text) is None:
        return text
    return _CONTROLS.sub(" ", _ESCAPES.sub("", text))


def clean_text(value: str | None) -> str | None:
    """`value` as readers should see it: markup removed, entities decoded (at most twice, for
    double-encoded text), escape sequences and control characters removed (`strip_controls`),
    whitespace collapsed and trimmed. None stays None; text that is only markup or controls becomes
    ''."""
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
    return _SPACE.sub(" ", strip_controls(text)).strip()


def clean_text_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`clean_text` over a string column (used as a vectorised DuckDB function)."""
    return pa.array([clean_text(v) for v in values.to_pylist()], pa.string())

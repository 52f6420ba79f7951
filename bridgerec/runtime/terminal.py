"""Text from the data, made safe to print on a terminal.

Titles, ids, profiles and messages come from users' files and from an LLM. Ingest removes control
characters from catalogue text (tasks/ingest/text.py), but a warehouse published before that, an id, or
a generated profile can still hold some, and a terminal obeys them: `ESC [31m` colours the rest of the
screen, `ESC ] 0 ; ... BEL` sets the window title, a backspace or CR overwrites what was printed, NUL
and bidirectional overrides garble the table. `shown` escapes every such character visibly
(`\\x1b`, `\\u202e`) and escapes rich's markup brackets, so the table prints the text as it is stored.
"""

from __future__ import annotations

import re

from rich.markup import escape

# Every C0 control but tab and newline (which only lay text out), DEL, C1, bidirectional overrides.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with control characters (but tab and newline), DEL and bidirectional controls written as
    escapes (`\\x1b`)."""
    return _CONTROLS.sub(_visible, text)


def shown(text: str | None, default: str = "") -> str:
    """Data text for a rich table or line: `printable`, with rich markup escaped; None -> `default`."""
    return escape(printable(text)) if text is not None else default

"""storage of bridgerec (see docs/design.md)."""

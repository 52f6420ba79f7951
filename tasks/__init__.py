"""tasks of bridgerec (see docs/design.md)."""

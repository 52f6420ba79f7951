"""models of bridgerec (see docs/design.md)."""

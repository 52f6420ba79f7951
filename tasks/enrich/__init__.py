"""The enrich stage."""

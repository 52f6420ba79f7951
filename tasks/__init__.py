"""The pipeline's stages (see docs/design.md): one package each (ingest, enrich, train, publish) seen from
outside through its face, the nightly quality checks, and `StageRun`, what every stage's run function
receives."""

from bridgerec.tasks.context import StageRun

__all__ = ["StageRun"]

"""Flow: the nightly pipeline, one subflow per stage. Stages are added here as they are built."""

from __future__ import annotations

from prefect import flow

from bridgerec.config import Settings
from flows.ingest import ingest_flow


@flow(name="nightly")
def nightly_flow(settings: Settings) -> dict:
    threads = settings.runtime.resolved_threads()
    summary = ingest_flow(settings.ingest, str(settings.workspace), threads)
    return {"ingest": summary.model_dump(exclude={"accounting"})}

"""The ingest stage: raw logs and catalogues to clean, typed Parquet (WORKSPACE/ingest/).

Its face: `IngestSettings`, `run_ingest` -> `IngestSummary`, the errors a bad input raises
(`SourceError`, `IngestError`), `input_files` (the raw files a config names), `check_input_files`
(the same, a missing one an error) and `IngestOutputs`, the
reader later stages use. Nothing outside this package imports its other modules.
"""

from bridgerec.tasks.ingest.outputs import IngestMissing, IngestOutputs
from bridgerec.tasks.ingest.preprocess import IngestError
from bridgerec.tasks.ingest.settings import IngestSettings
from bridgerec.tasks.ingest.sources import SourceError, check_input_files, input_files
from bridgerec.tasks.ingest.stage import IngestSummary, run_ingest

__all__ = [
    "IngestError",
    "IngestMissing",
    "IngestOutputs",
    "IngestSettings",
    "IngestSummary",
    "SourceError",
    "check_input_files",
    "input_files",
    "run_ingest",
]

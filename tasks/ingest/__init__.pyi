from .outputs import IngestMissing, IngestOutputs
from .preprocess import IngestError
from .settings import IngestSettings
from .sources import SourceError, check_columns, check_input_files, input_files
from .stage import IngestSummary, run_ingest

__all__ = [
    "IngestError",
    "IngestMissing",
    "IngestOutputs",
    "IngestSettings",
    "IngestSummary",
    "SourceError",
    "check_columns",
    "check_input_files",
    "input_files",
    "run_ingest",
]

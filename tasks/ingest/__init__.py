"""The ingest stage: raw logs and catalogues to clean, typed Parquet (WORKSPACE/ingest/).

Its face: `IngestSettings`, `run_ingest` -> `IngestSummary`, the errors a bad input raises
(`SourceError`, `IngestError`), `input_files` (the raw files a config names), `check_input_files`
(the same, a missing one an error), `check_columns` (their headers' columns, before the stage reads
them) and `IngestOutputs`, the
reader later stages use. Nothing outside this package imports its other modules.
"""

# The face loads lazily (SPEC 1, `lazy_loader`): a name's module is imported on first use, so that
# `import bridgerec.config` (every command, `--help` included) reads the settings without torch, faiss,
# vLLM or matplotlib. The names and their modules are in __init__.pyi, which type checkers read.
import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)

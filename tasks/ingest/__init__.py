"""The ingest stage: raw logs and catalogues to clean, typed Parquet."""

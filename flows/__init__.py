"""Prefect flows: which tasks run in which order, with retries, caching and artifacts. Thin by design."""

import bridgerec.runtime.prefect_env  # noqa: F401  (Prefect settings must be in the env before prefect loads)

"""Logging that goes through Prefect's run logger inside a flow or task run, and stdlib logging outside."""

from __future__ import annotations

import logging


def get_logger(name: str = "bridgerec") -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            return get_run_logger()
    except ImportError:  # pragma: no cover - prefect is a hard dependency, but keep tasks importable
        pass
    return logging.getLogger(name)

"""Logging that goes through Prefect's run logger inside a flow or task run, and stdlib logging outside;
in a quiet console session (runtime/console.py) bridgerec's own records are also echoed on the terminal.

Write log messages as sentences with figures (`ingest: 8,896 interactions read, 8,896 kept`), and pass
`extra=DETAIL` for lines that belong in the log but not on the terminal (per-epoch figures, periodic
progress lines that a progress bar already shows, timings the summary repeats).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bridgerec.runtime import console
from bridgerec.runtime.errors import input_error_in

DETAIL: Mapping[str, Any] = {"bridgerec_detail": True}  # extra= of records kept off the terminal


class BridgerecLogger(logging.LoggerAdapter[Any]):
    """A logger (or Prefect's run-logger adapter) whose records are also shown by `console.show_record`."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs  # the wrapped logger's own `extra` handling applies

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if level < logging.getLogger("bridgerec").level:  # `runtime.log_level`, set by the command's session
            return
        self.logger.log(level, msg, *args, **kwargs)
        if console.quiet():
            extra = kwargs.get("extra") or {}
            try:
                text = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                text = f"{msg} {args}"
            console.show_record(level, text, bool(extra.get("bridgerec_detail")))


def get_logger(name: str = "bridgerec") -> BridgerecLogger:
    logger: logging.Logger | logging.LoggerAdapter[Any] = logging.getLogger(name)
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            logger = get_run_logger()
    except ImportError:  # pragma: no cover - prefect is a hard dependency, but keep tasks importable
        pass
    return BridgerecLogger(logger, {})


class _HideInputErrorTracebacks(logging.Filter):
    """Drops the traceback from records about an `InputError`: its message already names the file and
    what to do, and a user who caused it should see that line, not Prefect's engine frames."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and input_error_in(record.exc_info[1]) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


def hide_input_error_tracebacks() -> None:
    """Attach the filter to every configured log handler (Prefect's console and API handlers included).
    The command line calls this before it runs a flow; workers keep full tracebacks."""
    import prefect  # noqa: F401  (its first import configures the console and API handlers)

    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, _HideInputErrorTracebacks) for f in handler.filters):
                handler.addFilter(_HideInputErrorTracebacks())

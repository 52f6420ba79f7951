"""Logging that goes through Prefect's run logger inside a flow or task run, and stdlib logging outside."""

from __future__ import annotations

import logging

from bridgerec.runtime.errors import input_error_in


def get_logger(name: str = "bridgerec") -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            return get_run_logger()
    except ImportError:  # pragma: no cover - prefect is a hard dependency, but keep tasks importable
        pass
    return logging.getLogger(name)


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

"""Thin Prefect flows over the pipeline library.

Importing this package routes the library's loggers (``pipeline.*``: epochs, failed relaxations, rejected
records) to the Prefect run logs, whatever the import order, through one API handler that passes run records
only. PREFECT_LOGGING_EXTRA_LOGGERS is deliberately not set by the library: it would also give ``pipeline.*``
Prefect's console handler, bound to whatever stderr was when Prefect first configured logging, so plain CLI
commands (``mfhull import``) would print through Prefect's formatter. Deployments may still set it.
"""

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler


class _InRunOnly(logging.Filter):
    """Pass a record only inside a flow/task run (outside one Prefect would warn for every record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, "flow_run_id", None) or FlowRunContext.get() or TaskRunContext.get())


def route_library_logs(name: str = "pipeline") -> logging.Logger:
    """Attach one Prefect API log handler (run records only) to the logger ``name`` and let INFO through."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        handler = APILogHandler()
        handler.addFilter(_InRunOnly())
        logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return logger


route_library_logs()

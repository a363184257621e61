"""Thin Prefect flows over the pipeline library.

Importing this package routes the library's loggers (``pipeline.*``: epochs, failed relaxations, rejected
records) to the Prefect run logs, whatever the import order (PREFECT_LOGGING_EXTRA_LOGGERS only acts when it is
set before Prefect configures logging).
"""

import logging
import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")

from prefect.logging.configuration import setup_logging  # noqa: F401 - configures Prefect's handlers


def route_library_logs(name: str = "pipeline") -> logging.Logger:
    """Attach Prefect's API log handler (the handlers of its ``prefect.extra`` logger) to ``name``, once; records
    logged inside a flow or task run then appear in that run's logs."""
    logger = logging.getLogger(name)
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return logger


route_library_logs()

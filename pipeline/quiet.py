"""Library warnings (pymatgen's CIF parser, spglib, ASE...) summarised in one log line instead of a screenful.

A context manager records every warning raised inside it and logs one line per block: how many, how many
kinds, and the most frequent message (truncated). Written by hand: the standard library records warnings
(``warnings.catch_warnings(record=True)``) but has no summary.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def summarised_warnings(logger: logging.Logger, what: str, max_chars: int = 160) -> Iterator[list]:
    """Record warnings raised inside the block and log ``"<what>: N warnings (K kinds), most frequent ..."``
    once at WARNING level; yields the recorded list (``warnings.WarningMessage``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield caught
    if not caught:
        return
    kinds = Counter(f"{w.category.__name__}: {str(w.message).splitlines()[0] if str(w.message) else ''}"
                    for w in caught)
    top, count = kinds.most_common(1)[0]
    logger.warning("%s: %d warnings (%d kinds), most frequent (%dx): %s", what, len(caught), len(kinds), count,
                   top[:max_chars])


class RunNameFilter(logging.Filter):
    """Prefix a record with the flow/task run name that Prefect attaches to it (``task_run_name`` /
    ``flow_run_name`` extras), so that a plain handler prints "Task run 'screen-r2scan': Finished in state
    Completed()" instead of a nameless "Finished in state Completed()"."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if name and not getattr(record, "_run_named", False):
            kind = "Task run" if getattr(record, "task_run_name", None) else "Flow run"
            record.msg = f"{kind} {name!r}: {record.msg}"
            record._run_named = True
        return True


class NoTracebackFormatter(logging.Formatter):
    """A console formatter that prints a record's message without its traceback. Prefect logs a failed task or
    flow run with the full traceback; the CLI prints that error as one line itself, so without ``-v`` its
    console shows the one-line records only. The record is left as it was, so other handlers (Prefect's API
    handler: the run's logs in the UI) still get the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved

"""The library's log lines in the Prefect UI: records of the ``mergeflow`` loggers emitted inside a
flow or task run go to the run's logs on the Prefect API, beside Prefect's own (the effect of
``PREFECT_LOGGING_EXTRA_LOGGERS=mergeflow``, without asking every user, worker and Dask process to
set it). Outside a run (the CLI before the flow starts, plain library use) nothing is sent.
"""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

LIBRARY_LOGGER = "mergeflow"


class RunLogHandler(APILogHandler):
    """Prefect's API log handler, for records emitted inside a flow or task run only."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            super().emit(record)


def send_library_logs_to_prefect() -> None:
    """Attach :class:`RunLogHandler` to the library's logger (once per process). Unless the process
    chose a level for that logger (the CLI does: INFO, WARNING with ``-q``), it logs INFO and above
    (a Prefect worker's root logger is at WARNING)."""
    library = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(handler, RunLogHandler) for handler in library.handlers):
        library.addHandler(RunLogHandler())
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)

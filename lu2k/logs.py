"""Logging for lu2kd and the tools: one format end to end, key=value lines or JSON, on stderr.

lu2k logs through structlog; libraries (aioquic's ``quic`` logger, asyncio, the shim
server's standard-library logger) and Python warnings go through the standard ``logging``
module.  Both are rendered by the same processors, so with ``json_output`` every line on
stderr is one JSON object with ``timestamp``, ``level``, ``event`` (and ``logger`` for
library lines, ``exception`` when there is a traceback) — nothing plain slips in.  An
exception that escapes everything is logged the same way before the process exits.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import Any

import structlog


def configure(level: str = "info", json_output: bool = False) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    tracebacks: Any = structlog.processors.dict_tracebacks if json_output else structlog.processors.format_exc_info
    structlog.configure(
        processors=[structlog.processors.add_log_level, timestamper, tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # The standard library's records (aioquic, asyncio, the shim server, warnings) through the same renderer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.stdlib.add_log_level, timestamper,
                           structlog.stdlib.PositionalArgumentsFormatter()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, tracebacks, renderer],
    ))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # captureWarnings(True) does nothing while an earlier capture is still on record, even if
    # warnings.showwarning was put back since (warnings.catch_warnings does that): release
    # the old capture first, so warnings reach this configuration's handler every time.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    if json_output:
        sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("lu2k").critical("uncaught exception", exc_info=(kind, value, tb))

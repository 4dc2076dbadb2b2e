"""structlog set-up shared by lu2kd and the tools: key=value lines on stderr, or JSON."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", json_output: bool = False) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Modules that log through the standard library (the shim server) go to the same place.
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(asctime)s [%(levelname)-7s] %(name)s: %(message)s", force=True)

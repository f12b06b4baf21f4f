"""Structured logging with structlog: JSON when not on a terminal, readable when on one.

PII is never logged: log calls pass identifiers and counts, never names, e-mails,
phone numbers or free text a customer typed.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    global _configured
    json_output = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_output
        # Plain tracebacks: a rich one would print local variables, which may hold PII.
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([structlog.processors.format_exc_info] if json_output else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str) -> Any:
    """A logger for `name`. It is lazy: created on its first use, so a module-level logger
    follows the configuration the process sets at start-up (level, format)."""
    if not _configured:
        configure_logging()
    return structlog.wrap_logger(None, logger_factory_args=(), logger_name=name)

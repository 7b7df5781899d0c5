"""Structured logging for corral: one structlog setup, loggers bound to context.

Every log line is an event name with key-value context (`log.info("actor.restarted",
actor=path, attempt=n)`), rendered as JSON or for a console as `LoggingConfig` says.
Context bound with `bind_request` follows the trio task and the tasks it starts. This
module configures structlog only when `configure_logging` is called: importing corral
never changes a host application's logging, and nothing here formats messages.
"""

from __future__ import annotations

import logging
import sys
from contextlib import AbstractContextManager
from typing import Any, Final, TextIO

import structlog
from structlog.typing import FilteringBoundLogger, Processor

from corral.config import LoggingConfig

__all__ = ["bind_request", "configure_logging", "get_logger"]

_LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure_logging(cfg: LoggingConfig, *, stream: TextIO | None = None,
                      default_level: str = "info") -> None:
    """Set up structlog for the whole process, replacing any earlier setup.

    Safe to call again (tests do, with a new stream each time): loggers obtained from
    `get_logger` before the call use the new setup from their next event on.

    Args:
        cfg: the output format and the minimum level emitted.
        stream: where lines go; standard error when None.
        default_level: the level when `cfg.level` is None.
    """
    output = sys.stderr if stream is None else stream
    renderer: Processor
    if cfg.format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        isatty = getattr(output, "isatty", None)
        renderer = structlog.dev.ConsoleRenderer(colors=bool(isatty and isatty()))
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if cfg.format == "json":
        # The console renderer prints tracebacks itself; JSON needs them as data.
        processors.append(structlog.processors.dict_tracebacks)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            _LEVELS[cfg.level or default_level]),
        logger_factory=structlog.PrintLoggerFactory(file=output),
        # Cached loggers would keep the first setup; reconfiguring must reach them all.
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> FilteringBoundLogger:
    """A logger whose every event carries `context` (e.g. `actor="/root/generation"`)."""
    logger: FilteringBoundLogger = structlog.get_logger(**context)
    return logger


def bind_request(request_id: str) -> AbstractContextManager[None]:
    """A `with` block in which every event logged carries `request_id`.

    The binding lives in a context variable: it applies to the current trio task and to
    tasks started from it inside the block, and is undone on leaving the block.
    """
    return structlog.contextvars.bound_contextvars(request_id=request_id)

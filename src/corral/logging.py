"""Structured logging for corral: one structlog setup, loggers bound to context.

Every log line is an event name with key-value context (`log.info("actor.restarted",
actor=path, attempt=n)`), rendered as JSON or for a console as `LoggingConfig` says.
Context bound with `bind_request` follows the trio task and the tasks it starts. This
module configures structlog only when `configure_logging` is called (`corral serve` and
`open_runtime` do): importing corral never changes a host application's logging. Until
structlog is configured, by corral or by the host, corral's events go to the standard
`logging` module under `corral.*` logger names, so the toolkit used alone (a breaker,
a retry) is as quiet as any library unless the host configures logging.
"""

from __future__ import annotations

import logging
import sys
from contextlib import AbstractContextManager
from typing import Any, Final, TextIO, cast, final

import structlog
from structlog.typing import Processor

from corral.config import LoggingConfig

__all__ = ["Logger", "bind_request", "configure_logging", "get_logger"]

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
    output = cast(TextIO, _CurrentStderr()) if stream is None else stream
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


@final
class _CurrentStderr:
    """Standard error as it is when a line is written, not when logging was set up: a
    host (or pytest's capture) may replace `sys.stderr` and close the old one."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


@final
class Logger:
    """A corral logger: structlog's setup once there is one, the standard `logging`
    module before that.

    Decided at each event, so configuring either at any time reaches loggers made
    earlier. Through `logging`, the record's message is the event and its context as
    `key=value` pairs, and the record carries them as data too: `record.event` (the
    name) and `record.fields` (a dict). Standard error never sees an info line unless the
    host asked for it: with no handler configured, Python prints warnings and errors only.
    """

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: dict[str, Any]) -> None:
        self._name = name
        self._context = context

    def bind(self, **context: Any) -> Logger:
        """This logger with `context` added to every event."""
        return Logger(self._name, {**self._context, **context})

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", logging.ERROR, event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._emit("critical", logging.CRITICAL, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error event with the exception being handled."""
        fields.setdefault("exc_info", True)
        self._emit("error", logging.ERROR, event, fields)

    def _emit(self, method: str, level: int, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            bound = structlog.get_logger(self._name, **self._context)
            getattr(bound, method)(event, **fields)
            return
        logger = logging.getLogger(self._name)
        if not logger.isEnabledFor(level):
            return
        exc_info = fields.pop("exc_info", None)
        merged = {**structlog.contextvars.get_contextvars(), **self._context, **fields}
        logger.log(level, _render(event, merged), exc_info=exc_info,
                   extra={"event": event, "fields": merged}, stacklevel=3)


def _render(event: str, fields: dict[str, Any]) -> str:
    pairs = (f"{key}={value if isinstance(value, str) and ' ' not in value else repr(value)}"
             for key, value in fields.items())
    return " ".join((event, *pairs))


def get_logger(name: str = "corral", /, **context: Any) -> Logger:
    """A logger named `name` whose every event carries `context` (e.g.
    `actor="/root/generation"`); see `Logger` for where its events go."""
    return Logger(name, context)


def bind_request(request_id: str) -> AbstractContextManager[None]:
    """A `with` block in which every event logged carries `request_id`.

    The binding lives in a context variable: it applies to the current trio task and to
    tasks started from it inside the block, and is undone on leaving the block.
    """
    return structlog.contextvars.bound_contextvars(request_id=request_id)

"""Keep-alive durations as Ollama writes them: a number of seconds, or a Go duration
string ("5m", "1h30m", "250ms", "-1s").

One convention everywhere past the edge: a float of seconds, where 0 means "unload
right after the request" and any negative value means "keep loaded for good". Data
and a parser only; the runtime's `keep_alive` part applies the seconds.
"""

from __future__ import annotations

import re
from typing import Final

from corral.protocol.errors import Code, EngineClientError

__all__ = ["DURATION_PATTERN", "KEEP_FOREVER", "MAX_KEEP_ALIVE_S", "keep_alive_seconds",
           "parse_duration"]

KEEP_FOREVER: Final = -1.0
"""The keep-alive of a model that is never unloaded for being idle."""
MAX_KEEP_ALIVE_S: Final = 10 * 365 * 24 * 3600.0
"""The longest finite keep-alive (ten years): longer ones are taken as forever."""

_NUMBER_UNIT: Final = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)"
DURATION_PATTERN: Final = rf"^[-+]?(?:0|(?:{_NUMBER_UNIT})+)\Z"
"""Go's `time.ParseDuration` syntax: an optional sign, then number-unit pairs
(``1h30m``, ``250ms``, ``-1s``), or ``0``."""

_UNITS: Final[dict[str, float]] = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6,
                                   "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART: Final = re.compile(_NUMBER_UNIT)


def parse_duration(text: str) -> float:
    """A duration string (`DURATION_PATTERN`) in seconds.

    Raises:
        ValueError: `text` is not such a string.
    """
    if re.match(DURATION_PATTERN, text) is None:
        raise ValueError(f"{text!r} is not a duration like '5m', '1h30m' or '300ms'")
    sign = -1.0 if text.startswith("-") else 1.0
    return sign * sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(text))


def keep_alive_seconds(value: str | float, field: str = "keep_alive") -> float:
    """An Ollama `keep_alive` (seconds, or a duration string) as seconds: negative
    values are `KEEP_FOREVER`, and so are finite ones past `MAX_KEEP_ALIVE_S`.

    Raises:
        EngineClientError: InvalidParams naming `field`, for a string that is not a
            duration.
    """
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise EngineClientError(Code.INVALID_PARAMS, f"{field}: {exc}",
                                    {"field": field}) from None
    else:
        seconds = float(value)
    if not 0.0 <= seconds <= MAX_KEEP_ALIVE_S:  # negative, too long, or nan
        return KEEP_FOREVER
    return seconds

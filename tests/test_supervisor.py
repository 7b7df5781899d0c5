"""Supervision: strategies, restart types, intensity, escalation, shutdown, backoff, dynamic.

Children record what happens to them in a shared journal (start and graceful stop, in
order), and every test reads lifecycle events with their MockClock times, so order and
timing are asserted exactly, with no real sleep.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from corral.actors.actor import Actor
from corral.actors.child_spec import Backoff, ChildSpec, Intensity, Restart, Strategy
from corral.actors.context import Context
from corral.actors.root import open_supervisor
from corral.actors.supervisor import Supervisor, supervisor_spec
from corral.actors.system import ActorSystem
from corral.protocol.errors import (
    ActorExitedError,
    ChildStartError,
    Code,
    EngineClientError,
    EscalationError,
)
from corral.protocol.lifecycle import Ping, Pong

Journal = list[tuple[str, str]]
NO_BACKOFF = Backoff(min=0.0, max=0.0, random_factor=0.0)
GENEROUS = Intensity(max_restarts=100, period=1000.0)


class Crash(msgspec.Struct, frozen=True, tag=True):
    pass


class Worker(Actor[Ping | Crash]):
    """Answers pings, crashes on request, journals its starts and graceful stops."""

    Message = Ping | Crash

    def __init__(self, name: str, journal: Journal, fail_start: Callable[[], bool]) -> None:
        self.name = name
        self.journal = journal
        self.fail_start = fail_start

    async def on_start(self) -> None:
        if self.fail_start():
            raise ValueError(f"{self.name} cannot start")
        self.journal.append(("start", self.name))

    async def handle(self, message: Ping | Crash) -> Pong:
        if isinstance(message, Crash):
            raise RuntimeError(f"{self.name} crashed")
        return Pong(message.seq)

    async def on_stop(self) -> None:
        self.journal.append(("stop", self.name))


def worker(name: str, journal: Journal, *, fail_start: Callable[[], bool] = lambda: False,
           **spec: Any) -> ChildSpec:
    return ChildSpec(name=name, factory=lambda: Worker(name, journal, fail_start), **spec)


class Task:
    """A plain task child: `script` says what each incarnation does after it starts."""

    def __init__(self, name: str, journal: Journal, script: Callable[[int], str],
                 incarnations: list[int]) -> None:
        self.name, self.journal, self.script = name, journal, script
        incarnations[0] += 1
        self.incarnation = incarnations[0]

    async def run(self, ctx: Context, *, task_status: trio.TaskStatus[None]) -> None:
        self.journal.append(("start", self.name))
        task_status.started()
        action = self.script(self.incarnation)
        if action == "return":
            return
        if action == "crash":
            raise RuntimeError(f"{self.name} crashed")
        try:
            await ctx.wait_stop_requested()
        finally:
            self.journal.append(("stop", self.name))


def task(name: str, journal: Journal, script: Callable[[int], str], **spec: Any) -> ChildSpec:
    incarnations = [0]
    return ChildSpec(name=name, factory=lambda: Task(name, journal, script, incarnations),
                     **spec)


def first_then_serve(action: str) -> Callable[[int], str]:
    """The first incarnation does `action`; later ones serve until stopped."""
    return lambda incarnation: action if incarnation == 1 else "serve"


async def pong(sup: Supervisor, name: str, seq: int = 1) -> bool:
    return await sup.ref(name).ask(Ping(seq), timeout=5.0) == Pong(seq)


# -- strategies --------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "stopped", "started"), [
    (Strategy.ONE_FOR_ONE, [], ["b"]),
    (Strategy.ONE_FOR_ALL, ["d", "c", "a"], ["a", "b", "c", "d"]),
    (Strategy.REST_FOR_ONE, ["d", "c"], ["b", "c", "d"]),
])
async def test_strategy_restarts_its_group_in_order(
        autojump_clock: trio.testing.MockClock, record_events: Any, strategy: Strategy,
        stopped: list[str], started: list[str]) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    names = ["a", "b", "c", "d"]
    supervisor = Supervisor([worker(n, journal) for n in names], strategy=strategy,
                            backoff=NO_BACKOFF)
    async with open_supervisor(supervisor, system=system) as sup:
        before = {n: sup.child(n) for n in names}
        assert journal == [("start", n) for n in names]
        journal.clear()
        await sup.ref("b").tell(Crash())
        await events.wait("restarted", f"root/{started[-1]}")
        # Others are stopped in reverse start order, then the group starts in order.
        assert journal == [("stop", n) for n in stopped] + [("start", n) for n in started]
        for n in names:
            assert (sup.child(n) is before[n]) == (n not in started)
            assert await pong(sup, n)
        restarted = {info.name: info.restarts for info in sup.which_children()}
        assert restarted == {n: int(n in started) for n in names}
        assert sup.statistics().total_restarts == len(started)
        assert sup.statistics().restarts_in_window == 1  # one crash, one count


async def test_a_temporary_sibling_is_stopped_with_its_group_but_not_restarted(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    supervisor = Supervisor(
        [worker("a", journal), worker("t", journal, restart=Restart.TEMPORARY),
         worker("c", journal)],
        strategy=Strategy.ONE_FOR_ALL, backoff=NO_BACKOFF)
    async with open_supervisor(supervisor, system=system) as sup:
        t_ref = sup.ref("t")
        journal.clear()
        await sup.ref("a").tell(Crash())
        await events.wait("restarted", "root/c")
        assert journal == [("stop", "c"), ("stop", "t"), ("start", "a"), ("start", "c")]
        assert [info.name for info in sup.which_children()] == ["a", "c"]
        with pytest.raises(ActorExitedError) as info:
            await t_ref.ask(Ping(1))
        assert info.value.reason == "shutdown"
        assert await pong(sup, "a") and await pong(sup, "c")


# -- restart types -----------------------------------------------------------------------


async def test_a_permanent_child_that_returns_is_restarted(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    supervisor = Supervisor([task("p", journal, first_then_serve("return"))],
                            backoff=Backoff(min=1.0, max=1.0, random_factor=0.0))
    async with open_supervisor(supervisor, system=system) as sup:
        await events.wait("restarting", "root/p")
        # While the backoff passes, the returned incarnation is not reported running.
        assert [i.state for i in sup.which_children()] == ["restarting"]
        assert sup.child("p") is None
        await events.wait("restarted", "root/p")
        assert events.of("exited", "root/p")[0].reason.kind == "normal"
        assert [(i.state, i.restarts) for i in sup.which_children()] == [("running", 1)]
        assert trio.current_time() == 1.0
    assert journal == [("start", "p"), ("start", "p"), ("stop", "p")]


async def test_a_transient_child_that_returns_is_not_restarted(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    ref = system.ref("root/t")  # a reference taken before the child runs
    supervisor = Supervisor([task("t", journal, lambda _: "return", restart=Restart.TRANSIENT),
                             worker("w", journal)], backoff=NO_BACKOFF)
    async with open_supervisor(supervisor, system=system) as sup:
        await events.wait("exited", "root/t")
        await trio.testing.wait_all_tasks_blocked()
        assert [i.name for i in sup.which_children()] == ["w"]
        assert events.of("restarting") == []
        assert ref.statistics().state == "stopped"
        with pytest.raises(ActorExitedError) as info:
            await ref.ask(Ping(1))
        assert (info.value.path, info.value.reason) == ("root/t", "normal")
        assert await pong(sup, "w")


async def test_a_transient_child_that_crashes_is_restarted(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    supervisor = Supervisor([task("t", journal, first_then_serve("crash"),
                                  restart=Restart.TRANSIENT)], backoff=NO_BACKOFF)
    async with open_supervisor(supervisor, system=system) as sup:
        await events.wait("restarted", "root/t")
        assert events.of("exited", "root/t")[0].reason.describe() == "RuntimeError: t crashed"
        assert [(i.state, i.restarts) for i in sup.which_children()] == [("running", 1)]
    assert journal == [("start", "t"), ("start", "t"), ("stop", "t")]


@pytest.mark.parametrize("action", ["return", "crash"])
async def test_a_temporary_child_is_never_restarted(
        autojump_clock: trio.testing.MockClock, record_events: Any, action: str) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    supervisor = Supervisor([task("tmp", journal, lambda _: action, restart=Restart.TEMPORARY),
                             worker("w", journal)], backoff=NO_BACKOFF)
    async with open_supervisor(supervisor, system=system) as sup:
        await events.wait("exited", "root/tmp")
        await trio.sleep(10.0)
        assert [i.name for i in sup.which_children()] == ["w"]
        assert events.of("restarting") == [] and events.of("restarted") == []
        assert sup.statistics().restarts_in_window == 0  # not counted against intensity
        assert await pong(sup, "w")
    assert journal.count(("start", "tmp")) == 1


# -- intensity and escalation ------------------------------------------------------------


async def test_intensity_is_counted_per_supervisor(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    supervisor = Supervisor([worker("a", journal), worker("b", journal)],
                            intensity=Intensity(max_restarts=3, period=100.0),
                            backoff=NO_BACKOFF)
    refs = {}
    with pytest.raises(EscalationError) as info:
        async with open_supervisor(supervisor, system=system) as sup:
            refs = {n: sup.ref(n) for n in "ab"}
            for count, name in enumerate("aba", start=1):
                await refs[name].tell(Crash())
                await events.wait("restarted", f"root/{name}", count=(count + 1) // 2)
                assert await pong(sup, name)  # each crash alone is within the budget
            assert sup.statistics().restarts_in_window == 3
            await refs["b"].tell(Crash())  # the 4th crash across both children
            await trio.sleep(3600.0)  # the escalation cancels this
    assert info.value.path == "root"
    assert info.value.chain == ("root exceeded 3 restarts in 100.0s",
                                "root/b exited: RuntimeError: b crashed")
    assert [e.path for e in events.of("intensity_exceeded")] == ["root"]
    # The live child was stopped gracefully (b had crashed), and both paths fail fast.
    assert journal[-1] == ("stop", "a") and ("stop", "b") not in journal
    for ref in refs.values():
        with pytest.raises(ActorExitedError):
            await ref.ask(Ping(1), timeout=10.0)
    assert trio.current_time() == 0.0


async def test_restarts_outside_the_period_do_not_count(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    supervisor = Supervisor([worker("a", journal)],
                            intensity=Intensity(max_restarts=1, period=5.0),
                            backoff=NO_BACKOFF)
    async with open_supervisor(supervisor, system=system) as sup:
        for count in range(1, 5):
            await sup.ref("a").tell(Crash())
            await events.wait("restarted", "root/a", count=count)
            assert sup.statistics().restarts_in_window == 1
            await trio.sleep(5.0)
        assert await pong(sup, "a")
        assert sup.statistics().total_restarts == 4


async def test_escalation_through_two_levels(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)

    def mid() -> Supervisor:
        return Supervisor([worker("leaf", journal)],
                          intensity=Intensity(max_restarts=1, period=10.0),
                          backoff=NO_BACKOFF)

    root = Supervisor([worker("first", journal), supervisor_spec("mid", mid),
                       worker("last", journal)],
                      intensity=Intensity(max_restarts=0, period=10.0), backoff=NO_BACKOFF)
    leaf = system.ref("root/mid/leaf")
    with pytest.raises(EscalationError) as info:
        async with open_supervisor(root, system=system):
            await leaf.tell(Crash())
            await events.wait("restarted", "root/mid/leaf")
            await leaf.tell(Crash())
            await trio.sleep(3600.0)  # the escalation cancels this
    error = info.value
    assert error.path == "root"
    assert error.chain == ("root exceeded 0 restarts in 10.0s",
                           "root/mid exceeded 1 restarts in 10.0s",
                           "root/mid/leaf exited: RuntimeError: leaf crashed")
    assert " <- ".join(error.chain) == error.message
    assert error.details["chain"] == list(error.chain)
    assert [e.path for e in events.of("intensity_exceeded")] == ["root/mid", "root"]
    # The whole tree stopped: the root's own children in reverse start order.
    assert journal[-2:] == [("stop", "last"), ("stop", "first")]
    with pytest.raises(ActorExitedError):
        await leaf.ask(Ping(1), timeout=10.0)
    assert trio.current_time() == 0.0


async def test_a_restart_that_fails_to_start_counts_as_a_crash(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    starts = [0]

    def second_start_fails() -> bool:
        starts[0] += 1
        return starts[0] == 2

    supervisor = Supervisor([worker("w", journal, fail_start=second_start_fails)],
                            intensity=Intensity(max_restarts=5, period=100.0),
                            backoff=NO_BACKOFF)
    async with open_supervisor(supervisor, system=system) as sup:
        await sup.ref("w").tell(Crash())
        await events.wait("restarted", "root/w")
        failed = events.of("start_failed", "root/w")
        assert [e.reason.describe() for e in failed] == ["ValueError: w cannot start"]
        assert sup.statistics().restarts_in_window == 2
        assert [(i.state, i.restarts) for i in sup.which_children()] == [("running", 2)]
        assert await pong(sup, "w")


async def test_a_failing_restart_can_exceed_the_intensity(
        autojump_clock: trio.testing.MockClock) -> None:
    journal: Journal = []
    starts = [0]

    def later_starts_fail() -> bool:
        starts[0] += 1
        return starts[0] > 1

    supervisor = Supervisor([worker("w", journal, fail_start=later_starts_fail)],
                            intensity=Intensity(max_restarts=1, period=100.0),
                            backoff=NO_BACKOFF)
    with pytest.raises(EscalationError) as info:
        async with open_supervisor(supervisor) as sup:
            await sup.ref("w").tell(Crash())
            await trio.sleep(3600.0)  # the escalation cancels this
    assert info.value.chain[-1] == "root/w exited: ValueError: w cannot start"


async def test_backoff_grows_over_failed_restarts_after_a_long_run(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    starts = [0]

    def middle_starts_fail() -> bool:
        starts[0] += 1
        return 2 <= starts[0] <= 4

    supervisor = Supervisor([worker("w", journal, fail_start=middle_starts_fail)],
                            intensity=GENEROUS,
                            backoff=Backoff(min=1.0, max=100.0, random_factor=0.0,
                                            reset_after=30.0))
    async with open_supervisor(supervisor, system=system) as sup:
        await trio.sleep(60.0)  # a long healthy run resets the backoff once...
        await sup.ref("w").tell(Crash())
        await events.wait("restarted", "root/w")  # after three restarts failed to start
        assert len(events.of("start_failed")) == 3
        # ...but a restart that fails to start ran for no time, so the delay grows.
        assert [e.delay_s for e in events.of("restarting")] == [1.0, 2.0, 4.0, 8.0]
        assert await pong(sup, "w")


# -- starting --------------------------------------------------------------------------


async def test_an_initial_start_failure_fails_open_supervisor(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    supervisor = Supervisor([worker("a", journal), worker("b", journal),
                             worker("bad", journal, fail_start=lambda: True),
                             worker("never", journal)])
    with pytest.raises(ChildStartError) as info:
        async with open_supervisor(supervisor, system=system):
            pytest.fail("the body must not run")
    assert info.value.path == "root/bad"
    assert isinstance(info.value.__cause__, ValueError)
    assert journal == [("start", "a"), ("start", "b"), ("stop", "b"), ("stop", "a")]
    assert [e.path for e in events.of("start_failed")] == ["root/bad"]
    with pytest.raises(ActorExitedError):
        await system.ref("root/a").ask(Ping(1), timeout=5.0)


async def test_a_child_that_returns_before_it_started_is_a_start_failure(
        autojump_clock: trio.testing.MockClock) -> None:
    class Quitter:
        async def run(self, ctx: Context, *, task_status: trio.TaskStatus[None]) -> None:
            return

    with pytest.raises(ChildStartError, match="returned before it started"):
        async with open_supervisor(Supervisor([ChildSpec(name="q", factory=Quitter)])):
            pass


# -- shutdown --------------------------------------------------------------------------


async def test_shutdown_stops_children_in_reverse_start_order(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    supervisor = Supervisor([worker("a", journal), task("b", journal, lambda _: "serve"),
                             supervisor_spec("sub", lambda: Supervisor(
                                 [worker("c1", journal), worker("c2", journal)])),
                             worker("d", journal)])
    async with open_supervisor(supervisor, system=system) as sup:
        assert await pong(sup, "d")
        journal.clear()
    assert journal == [("stop", "d"), ("stop", "c2"), ("stop", "c1"), ("stop", "b"),
                       ("stop", "a")]
    assert {e.path for e in events.of("stopped")} == {
        "root/a", "root/b", "root/sub", "root/sub/c1", "root/sub/c2", "root/d"}
    assert all(e.reason is not None and e.reason.kind == "shutdown"
               for e in events.of("stopped"))


class Stubborn:
    """Ignores stop requests; records when it is cancelled, or leaves when released."""

    def __init__(self, cancelled_at: list[float], release: trio.Event) -> None:
        self.cancelled_at = cancelled_at
        self.release = release

    async def run(self, ctx: Context, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled_at.append(trio.current_time())
            raise


@pytest.mark.parametrize(("shutdown", "after"), [(250, 0.25), ("brutal", 0.0)])
async def test_a_child_that_ignores_stop_is_cancelled_after_its_timeout(
        autojump_clock: trio.testing.MockClock, shutdown: int | str, after: float) -> None:
    journal: Journal = []
    cancelled_at: list[float] = []
    supervisor = Supervisor([
        worker("w", journal),
        ChildSpec(name="s", factory=lambda: Stubborn(cancelled_at, trio.Event()),
                  shutdown=shutdown)])  # type: ignore[arg-type]
    async with open_supervisor(supervisor) as sup:
        await trio.sleep(3.0)
        await sup.terminate_child("s")
        assert cancelled_at == [3.0 + after]
        assert trio.current_time() == 3.0 + after
        assert [i.name for i in sup.which_children()] == ["w"]
        assert await pong(sup, "w")


async def test_a_polite_child_is_not_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    journal: Journal = []
    supervisor = Supervisor([worker("w", journal, shutdown=250)])
    async with open_supervisor(supervisor) as sup:
        await sup.terminate_child("w")
        assert journal == [("start", "w"), ("stop", "w")]  # on_stop ran: a graceful stop
        assert trio.current_time() == 0.0


async def test_an_infinity_shutdown_waits_for_the_child(
        autojump_clock: trio.testing.MockClock) -> None:
    cancelled_at: list[float] = []
    release = trio.Event()
    supervisor = Supervisor([ChildSpec(name="s", factory=lambda: Stubborn(cancelled_at, release),
                                       shutdown="infinity")])

    async def release_later() -> None:
        await trio.sleep(1000.0)
        release.set()

    async with trio.open_nursery() as nursery:
        async with open_supervisor(supervisor):
            nursery.start_soon(release_later)
    assert cancelled_at == []
    assert trio.current_time() == 1000.0


# -- backoff ---------------------------------------------------------------------------


async def test_backoff_delays_grow_within_their_jitter_bounds(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    backoff = Backoff(min=0.1, max=1.0, random_factor=0.5, reset_after=1000.0)
    supervisor = Supervisor([worker("w", journal)], intensity=GENEROUS, backoff=backoff,
                            rng=random.Random(7))
    crashes = 7
    async with open_supervisor(supervisor, system=system) as sup:
        for count in range(1, crashes + 1):
            await sup.ref("w").tell(Crash())
            await events.wait("restarted", "root/w", count=count)
        assert await pong(sup, "w")
    restarting = events.of("restarting", "root/w")
    exited = events.of("exited", "root/w")
    restarted = events.of("restarted", "root/w")
    assert [e.attempt for e in restarting] == list(range(1, crashes + 1))
    bases = [min(1.0, 0.1 * 2 ** n) for n in range(crashes)]
    assert bases == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    for base, event, down, up in zip(bases, restarting, exited, restarted, strict=True):
        centre = min(base, 1.0 / 1.5)  # lowered near the cap: jitter never passes max
        assert centre * 0.5 <= event.delay_s <= min(1.0, centre * 1.5)
        assert up.time - down.time == pytest.approx(event.delay_s)  # slept exactly that
    assert any(e.delay_s > base for base, e in zip(bases, restarting, strict=True))
    assert any(e.delay_s < base for base, e in zip(bases, restarting, strict=True))


async def test_reset_after_resets_the_backoff(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    supervisor = Supervisor([worker("w", journal)], intensity=GENEROUS,
                            backoff=Backoff(min=1.0, max=100.0, random_factor=0.0,
                                            reset_after=10.0))
    async with open_supervisor(supervisor, system=system) as sup:
        for count, pause in enumerate([0.0, 0.0, 10.0, 0.0], start=1):
            await trio.sleep(pause)
            await sup.ref("w").tell(Crash())
            await events.wait("restarted", "root/w", count=count)
        assert await pong(sup, "w")
    assert [e.delay_s for e in events.of("restarting")] == [1.0, 2.0, 1.0, 2.0]


# -- dynamic children ------------------------------------------------------------------


async def test_dynamic_children(autojump_clock: trio.testing.MockClock,
                                record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    supervisor = Supervisor(strategy=Strategy.DYNAMIC, backoff=NO_BACKOFF)
    async with open_supervisor(supervisor, system=system) as sup:
        a = await sup.start_child(worker("a", journal))
        b = await sup.start_child(worker("b", journal, restart=Restart.TEMPORARY))
        assert a.path == "root/a" and await a.ask(Ping(1)) == Pong(1)
        assert [i.name for i in sup.which_children()] == ["a", "b"]

        with pytest.raises(EngineClientError) as info:
            await sup.start_child(worker("a", journal))
        assert info.value.code is Code.INVALID_PARAMS

        await a.tell(Crash())  # one_for_one over dynamic children
        await events.wait("restarted", "root/a")
        assert await a.ask(Ping(2)) == Pong(2)

        await sup.terminate_child("a")
        assert [i.name for i in sup.which_children()] == ["b"]
        with pytest.raises(ActorExitedError) as exited:
            await a.ask(Ping(3))
        assert exited.value.reason == "shutdown"  # not the reason of the earlier crash
        with pytest.raises(EngineClientError) as info:
            await sup.terminate_child("a")
        assert info.value.code is Code.INVALID_PARAMS

        again = await sup.start_child(worker("a", journal))  # the name can be reused
        assert await again.ask(Ping(4)) == Pong(4)
        assert await b.ask(Ping(5)) == Pong(5)


async def test_a_dynamic_child_that_fails_to_start_is_not_added(
        autojump_clock: trio.testing.MockClock) -> None:
    journal: Journal = []
    system = ActorSystem()
    async with open_supervisor(Supervisor(strategy=Strategy.DYNAMIC), system=system) as sup:
        with pytest.raises(ChildStartError) as info:
            await sup.start_child(worker("bad", journal, fail_start=lambda: True))
        assert isinstance(info.value.__cause__, ValueError)
        assert sup.which_children() == []
        assert "root/bad" not in system.paths()
        ok = await sup.start_child(worker("ok", journal))
        assert await ok.ask(Ping(1)) == Pong(1)


async def test_control_calls_on_a_stopped_supervisor_fail_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    journal: Journal = []
    async with open_supervisor(Supervisor(strategy=Strategy.DYNAMIC)) as sup:
        await sup.start_child(worker("a", journal))
    with trio.fail_after(60.0):
        with pytest.raises(ActorExitedError):
            await sup.start_child(worker("b", journal))
        with pytest.raises(ActorExitedError):
            await sup.terminate_child("a")
    assert journal == [("start", "a"), ("stop", "a")]
    assert trio.current_time() == 0.0


# -- significant children --------------------------------------------------------------


async def test_a_significant_child_ends_its_supervisor(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)

    def session() -> Supervisor:
        return Supervisor([worker("helper", journal),
                           task("job", journal, lambda _: "return", restart=Restart.TRANSIENT,
                                significant=True)],
                          auto_shutdown="any_significant")

    root = Supervisor([supervisor_spec("session", session, restart=Restart.TRANSIENT),
                       worker("other", journal)])
    async with open_supervisor(root, system=system) as sup:
        await events.wait("exited", "root/session")
        await trio.testing.wait_all_tasks_blocked()
        assert [i.name for i in sup.which_children()] == ["other"]
        assert ("stop", "helper") in journal
        assert events.of("exited", "root/session")[0].reason.kind == "normal"
        assert events.of("restarting") == []
        assert await pong(sup, "other")


async def test_all_significant_waits_for_the_last_one(
        autojump_clock: trio.testing.MockClock, record_events: Any) -> None:
    journal: Journal = []
    system = ActorSystem()
    events = record_events(system)
    done = {"j1": trio.Event(), "j2": trio.Event()}

    class Job:
        def __init__(self, name: str) -> None:
            self.name = name

        async def run(self, ctx: Context, *, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            await done[self.name].wait()

    def session() -> Supervisor:
        return Supervisor([ChildSpec(name=n, factory=lambda n=n: Job(n),
                                     restart=Restart.TRANSIENT, significant=True)
                           for n in done] + [worker("helper", journal)],
                          auto_shutdown="all_significant")

    root = Supervisor([supervisor_spec("session", session, restart=Restart.TRANSIENT)])
    async with open_supervisor(root, system=system) as sup:
        done["j1"].set()
        await events.wait("exited", "root/session/j1")
        await trio.testing.wait_all_tasks_blocked()
        assert [i.name for i in sup.which_children()] == ["session"]
        done["j2"].set()
        await events.wait("exited", "root/session")
        assert sup.which_children() == []
        assert journal[-1] == ("stop", "helper")

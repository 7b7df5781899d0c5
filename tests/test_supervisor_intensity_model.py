"""Restart intensity against a reference model, on sequences hypothesis generates.

Each example drives a real Supervisor inside one `trio.run` on a MockClock: actions
crash a child or advance the clock, and after each one the supervisor's observable state
(alive or escalated, restarts per child, total restarts, restarts in the window) must
equal a small model's: a list of restart times with the sliding-window rule "escalate
when more than max_restarts restarts happened less than `period` seconds ago".
"""

from __future__ import annotations

import random
from typing import Literal

import msgspec
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from corral.actors.actor import Actor
from corral.actors.child_spec import Backoff, ChildSpec, Intensity, Strategy
from corral.actors.root import open_supervisor
from corral.actors.supervisor import Supervisor
from corral.actors.system import ActorSystem
from corral.protocol.errors import EscalationError

Action = tuple[Literal["crash"], int] | tuple[Literal["wait"], float]
# (restarts per child, total restarts, restarts in the window), or the escalation.
Observation = tuple[tuple[int, ...], int, int] | Literal["escalated"]

# Dyadic steps and periods keep clock sums exact, so window edges are hit exactly.
STEPS = [0.0, 0.25, 0.5, 1.0, 2.0, 5.0]
PERIODS = [0.5, 1.0, 2.5, 5.0]


class Crash(msgspec.Struct, frozen=True, tag=True):
    pass


class Crashy(Actor[Crash]):
    Message = Crash

    async def handle(self, message: Crash) -> None:
        raise RuntimeError("crash requested")


class IntensityModel:
    """What the supervisor should do, without trio, time or tasks."""

    def __init__(self, children: int, strategy: Strategy, intensity: Intensity) -> None:
        self.children = children
        self.strategy = strategy
        self.intensity = intensity
        self.now = 0.0
        self.window: list[float] = []
        self.restarts = [0] * children

    def step(self, action: Action) -> Observation:
        kind, arg = action
        if kind == "wait":
            self.now += arg
            return self.observe()
        crashed = int(arg) % self.children
        self.window.append(self.now)
        self.window = [t for t in self.window if t > self.now - self.intensity.period]
        if len(self.window) > self.intensity.max_restarts:
            return "escalated"
        group = {Strategy.ONE_FOR_ONE: range(crashed, crashed + 1),
                 Strategy.ONE_FOR_ALL: range(self.children),
                 Strategy.REST_FOR_ONE: range(crashed, self.children)}[self.strategy]
        for child in group:
            self.restarts[child] += 1
        return self.observe()

    def observe(self) -> Observation:
        return tuple(self.restarts), sum(self.restarts), len(self.window)

    def run(self, actions: list[Action]) -> list[Observation]:
        observations = []
        for action in actions:
            observations.append(self.step(action))
            if observations[-1] == "escalated":
                break
        return observations


async def drive(children: int, strategy: Strategy, intensity: Intensity,
                actions: list[Action]) -> list[Observation]:
    """Apply `actions` to a real supervisor; observe it after each settles."""
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    supervisor = Supervisor(
        [ChildSpec(name=f"c{i}", factory=Crashy) for i in range(children)],
        strategy=strategy, intensity=intensity,
        backoff=Backoff(min=0.0, max=0.0, random_factor=0.0), rng=random.Random(0))
    observations: list[Observation] = []
    try:
        async with open_supervisor(supervisor, system=ActorSystem()) as sup:
            for kind, arg in actions:
                if kind == "crash":
                    await sup.ref(f"c{int(arg) % children}").tell(Crash())
                else:
                    clock.jump(arg)
                await trio.testing.wait_all_tasks_blocked()
                infos = sup.which_children()
                assert [info.state for info in infos] == ["running"] * children
                stats = sup.statistics()
                observations.append((tuple(info.restarts for info in infos),
                                     stats.total_restarts, stats.restarts_in_window))
    except EscalationError as exc:
        assert exc.chain[0] == (f"root exceeded {intensity.max_restarts} restarts in "
                                f"{intensity.period}s")
        observations.append("escalated")
    return observations


actions = st.lists(
    st.one_of(st.tuples(st.just("crash"), st.integers(0, 2)),
              st.tuples(st.just("wait"), st.sampled_from(STEPS))),
    max_size=20)


@settings(max_examples=80, deadline=None)
@given(children=st.integers(1, 3),
       strategy=st.sampled_from([Strategy.ONE_FOR_ONE, Strategy.ONE_FOR_ALL,
                                 Strategy.REST_FOR_ONE]),
       max_restarts=st.integers(0, 4), period=st.sampled_from(PERIODS), actions=actions)
# A restart exactly `period` ago has left the window.
@example(children=1, strategy=Strategy.ONE_FOR_ONE, max_restarts=1, period=1.0,
         actions=[("crash", 0), ("wait", 1.0), ("crash", 0), ("wait", 0.5), ("crash", 0)])
# Two children share one budget.
@example(children=2, strategy=Strategy.ONE_FOR_ONE, max_restarts=3, period=5.0,
         actions=[("crash", 0), ("crash", 1), ("crash", 0), ("crash", 1), ("crash", 0)])
def test_supervisor_matches_the_intensity_model(
        children: int, strategy: Strategy, max_restarts: int, period: float,
        actions: list[Action]) -> None:
    intensity = Intensity(max_restarts=max_restarts, period=period)
    expected = IntensityModel(children, strategy, intensity).run(actions)
    observed = trio.run(drive, children, strategy, intensity, actions,
                        clock=trio.testing.MockClock())
    assert observed == expected


def test_the_model_escalates_on_the_crash_past_the_budget() -> None:
    # The model itself, on the case the issue names: max_restarts=3, the 4th crash.
    model = IntensityModel(2, Strategy.ONE_FOR_ONE, Intensity(max_restarts=3, period=5.0))
    steps = [("crash", 0), ("crash", 1), ("wait", 4.75), ("crash", 0), ("crash", 1)]
    assert model.run(steps) == [((1, 0), 1, 1), ((1, 1), 2, 2), ((1, 1), 2, 2),
                                ((2, 1), 3, 3), "escalated"]

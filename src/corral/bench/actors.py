"""`corral bench actors`: the kernel against raw trio channels, side by side in one run.

Three figures (benchmarks/README.md):
- tell throughput, as a ratio to a raw trio memory channel moving the same encoded bytes
  on the same nowait fast path (both sides encode and decode, so the ratio is the cost of
  the actor machinery alone; goal >= 0.7);
- ask round trip, as a ratio to a raw two-channel ping-pong that also encodes and decodes
  (goal <= 1.5);
- restart latency of a crashing child, crash to restarted, p50/p99 (goal p50 <= 1 ms),
  with zero backoff so the figure is the mechanism, not the configured delay.
Rounds alternate between corral and the baseline so drift hits both.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import msgspec
import trio
from rich.progress import Progress

from corral.actors.actor import Actor
from corral.actors.child_spec import Backoff, ChildSpec, Intensity
from corral.actors.root import open_supervisor
from corral.actors.supervisor import Supervisor
from corral.actors.system import ActorSystem
from corral.bench.report import goal, percentile, print_table, write_result
from corral.protocol.codec import Decoder, encode
from corral.protocol.lifecycle import LifecycleEvent, Ping, Pong


class Count(msgspec.Struct, frozen=True, tag=True):
    n: int


class Crash(msgspec.Struct, frozen=True, tag=True):
    pass


class _Sink(Actor[Count | Ping | Crash]):
    """Counts tells; answers pings; crashes on request. A plain-def handler."""

    Message = Count | Ping | Crash
    target = 0
    done: trio.Event | None = None

    def __init__(self) -> None:
        self.seen = 0

    def handle(self, message: Count | Ping | Crash) -> Any:
        if type(message) is Count:
            self.seen += 1
            if self.seen == self.target:
                self.done.set()  # type: ignore[union-attr]
            return None
        if type(message) is Ping:
            return Pong(message.seq)
        raise RuntimeError("crash requested by the benchmark")


class _AsyncSink(_Sink):
    """The same sink with an `async def` handler, which costs a coroutine per message."""

    async def handle(self, message: Count | Ping | Crash) -> Any:
        return _Sink.handle(self, message)


async def _raw_tell(n: int) -> float:
    send, recv = trio.open_memory_channel[bytes](1024)
    decode = Decoder(Count | Ping | Crash).decode_unchecked
    done = trio.Event()

    async def consume() -> None:
        seen = 0
        burst = 0
        while seen < n:
            try:
                payload = recv.receive_nowait()
                burst += 1
                if burst >= 64:
                    burst = 0
                    await trio.lowlevel.checkpoint()
            except trio.WouldBlock:
                payload = await recv.receive()
                burst = 0
            decode(payload)
            seen += 1
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        start = time.perf_counter()
        for i in range(n):
            payload = encode(Count(i))
            try:
                send.send_nowait(payload)
            except trio.WouldBlock:
                await send.send(payload)
        await done.wait()
        return time.perf_counter() - start


async def _actor_tell(sink: _Sink, n: int) -> float:
    _Sink.target = n
    _Sink.done = trio.Event()
    sink.seen = 0
    ref = sink.ctx.ref
    start = time.perf_counter()
    for i in range(n):
        await ref.tell(Count(i))
    await _Sink.done.wait()
    return time.perf_counter() - start


async def _raw_ping_pong(n: int) -> float:
    req_send, req_recv = trio.open_memory_channel[bytes](0)
    rep_send, rep_recv = trio.open_memory_channel[bytes](0)
    ping_decoder = Decoder(Count | Ping | Crash)
    pong_decoder: Decoder[Pong] = Decoder(Pong)

    async def responder() -> None:
        async for payload in req_recv:
            message = ping_decoder.decode(payload)
            await rep_send.send(encode(Pong(message.seq)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        start = time.perf_counter()
        for i in range(n):
            await req_send.send(encode(Ping(i)))
            pong_decoder.decode(await rep_recv.receive())
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed


async def _actor_ask(ref: Any, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        await ref.ask(Ping(i), timeout=10.0)
    return time.perf_counter() - start


async def _restart_latencies(count: int, progress: Progress | None) -> list[float]:
    """Crash a child `count` times; time from the crash to its restarted incarnation."""
    system = ActorSystem()
    latencies: list[float] = []
    restarted = trio.Event()
    crash_at = [0.0]

    def on_event(event: LifecycleEvent) -> None:
        if event.kind == "restarted":
            latencies.append(time.perf_counter() - crash_at[0])
            restarted.set()

    system.add_listener(on_event)
    supervisor = Supervisor(
        [ChildSpec(name="victim", factory=_Sink)],
        intensity=Intensity(max_restarts=count + 1, period=math.inf),
        backoff=Backoff(min=0.0, max=0.0, random_factor=0.0))
    task = progress.add_task("restart latency", total=count) if progress else None
    async with open_supervisor(supervisor, system=system) as sup:
        ref = sup.ref("victim")
        for _ in range(count):
            restarted = trio.Event()
            crash_at[0] = time.perf_counter()
            await ref.tell(Crash())
            await restarted.wait()
            if progress is not None and task is not None:
                progress.advance(task)
    return latencies


async def _run(messages: int, asks: int, rounds: int, restarts: int) -> dict[str, Any]:
    supervisor = Supervisor([ChildSpec(name="sink", factory=_Sink),
                             ChildSpec(name="async_sink", factory=_AsyncSink)])
    tell_raw, tell_sync, tell_async, ask_raw, ask_actor = [], [], [], [], []
    with Progress(transient=True) as progress:
        task = progress.add_task("tell / ask rounds", total=rounds)
        async with open_supervisor(supervisor) as sup:
            ref = sup.ref("sink")
            sink, async_sink = sup.child("sink"), sup.child("async_sink")
            assert isinstance(sink, _Sink) and isinstance(async_sink, _AsyncSink)
            for _ in range(rounds):
                tell_raw.append(messages / await _raw_tell(messages))
                tell_sync.append(messages / await _actor_tell(sink, messages))
                tell_async.append(messages / await _actor_tell(async_sink, messages))
                ask_raw.append(await _raw_ping_pong(asks) / asks)
                ask_actor.append(await _actor_ask(ref, asks) / asks)
                progress.advance(task)
        latencies = await _restart_latencies(restarts, progress)

    def ratio(corral: list[float], raw: list[float]) -> float:
        return statistics.median(c / r for c, r in zip(corral, raw, strict=True))

    return {
        "tell_msgs_per_s": statistics.median(tell_sync),
        "tell_async_handler_msgs_per_s": statistics.median(tell_async),
        "tell_raw_msgs_per_s": statistics.median(tell_raw),
        "tell_ratio": ratio(tell_sync, tell_raw),
        "tell_async_handler_ratio": ratio(tell_async, tell_raw),
        "ask_round_trip_us": statistics.median(ask_actor) * 1e6,
        "ask_raw_round_trip_us": statistics.median(ask_raw) * 1e6,
        "ask_ratio": ratio(ask_actor, ask_raw),
        "restart_p50_ms": percentile(latencies, 50) * 1e3,
        "restart_p99_ms": percentile(latencies, 99) * 1e3,
        "restarts_measured": len(latencies),
    }


def main(smoke: bool = False, output_dir: Path | None = None) -> dict[str, Any]:
    """Run the actor benchmark, print its table and write ``actors.json``."""
    parameters = ({"messages": 2_000, "asks": 200, "rounds": 2, "restarts": 20} if smoke else
                  {"messages": 200_000, "asks": 20_000, "rounds": 7, "restarts": 1_000})
    results = trio.run(lambda: _run(**parameters))
    goals = [goal("tell_ratio", results["tell_ratio"], ">=", 0.7),
             goal("ask_ratio", results["ask_ratio"], "<=", 1.5),
             goal("restart_p50_ms", results["restart_p50_ms"], "<=", 1.0)]
    print_table("corral bench actors", ["figure", "corral", "raw trio", "ratio"], [
        ("tell msgs/s (def handler)", results["tell_msgs_per_s"],
         results["tell_raw_msgs_per_s"], results["tell_ratio"]),
        ("tell msgs/s (async def handler)", results["tell_async_handler_msgs_per_s"],
         results["tell_raw_msgs_per_s"], results["tell_async_handler_ratio"]),
        ("ask round trip µs", results["ask_round_trip_us"], results["ask_raw_round_trip_us"],
         results["ask_ratio"]),
        ("restart p50 / p99 ms", results["restart_p50_ms"], results["restart_p99_ms"], "-"),
    ], goals)
    write_result("actors", {**parameters, "smoke": smoke}, results, goals,
                 directory=output_dir, smoke=smoke)
    return results

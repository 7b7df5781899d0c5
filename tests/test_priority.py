"""Priority (issue 23 part 6): a request's `priority` (vLLM's: lower is admitted
first) orders the stream registry's queue, over HTTP, JSON-RPC and embedded; within one
priority admission stays fair between clients, as before.

The registry's order is checked on the registry alone (admissions counted, never
timed); end to end, one slot (`max_active_streams: 1`) is held by an embedded stream
while requests of every interface queue, and they then run one at a time in the order
of their priority. Every client runs in the test's trio loop (the official `openai`
client's async one included), so the order they finish in is the order they ran in.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import openai
import pytest
import trio

from corral.config import config_from_mapping
from corral.protocol.errors import OverloadedError
from corral.protocol.messages import SamplingParams
from corral.protocol.serving_messages import Admit, CloseStream, GetRegistryState
from corral.runtime import open_runtime
from corral.server.jsonrpc import JsonRpcListener
from corral.tiny import make_tiny_model
from test_fairness_timeouts import registry, until
from test_http import serve_http
from test_jsonrpc_server import Client

PROMPT = "The quick brown fox"


async def _admit(ref: Any, client: str, stream_id: int, priority: int) -> Any:
    return await ref.ask(Admit(stream_id=stream_id, model="m", timeout_s=60.0, prompt=[1],
                               sampling=SamplingParams(max_tokens=1), client=client,
                               priority=priority))


async def test_the_registry_admits_by_priority_then_fairly_within_one() -> None:
    with trio.fail_after(10):
        async with registry(max_active=1, max_queued=5) as ref, \
                trio.open_nursery() as nursery:
            admitted: list[int] = []
            refused: dict[int, OverloadedError] = {}

            async def waiter(client: str, stream_id: int, priority: int) -> None:
                try:
                    await _admit(ref, client, stream_id, priority)
                except OverloadedError as exc:
                    refused[stream_id] = exc
                else:
                    admitted.append(stream_id)

            async def queued(count: int) -> bool:
                return int((await ref.ask(GetRegistryState())).queued) == count

            await _admit(ref, "a", 1, 0)
            arrivals = [("a", 2, 5), ("a", 3, 0), ("b", 4, 0), ("c", 5, -1), ("a", 6, 0)]
            for waiting, (client, stream_id, priority) in enumerate(arrivals):
                nursery.start_soon(waiter, client, stream_id, priority)
                await until(functools.partial(queued, waiting + 1))
            # The queue is full: a more urgent newcomer takes the place of the newest
            # waiter of the lowest priority; an equal one is refused as before.
            nursery.start_soon(waiter, "d", 7, 1)
            await until(lambda: 2 in refused)
            assert "higher priority" in refused[2].message
            with pytest.raises(OverloadedError):
                await _admit(ref, "e", 8, 1)
            # One slot: priority -1 first, then priority 0 in arrival order, then 1.
            expected = [5, 3, 4, 6, 7]
            for index, closed in enumerate([1, *expected[:-1]]):
                await ref.tell(CloseStream(closed, "stop"))
                await until(lambda: len(admitted) == index + 1)  # noqa: B023 - awaited here
            assert admitted == expected


async def test_fairness_between_clients_holds_within_one_priority() -> None:
    with trio.fail_after(10):
        async with registry(max_active=2, max_queued=4) as ref, \
                trio.open_nursery() as nursery:
            admitted: list[int] = []

            async def waiter(client: str, stream_id: int, priority: int) -> None:
                await _admit(ref, client, stream_id, priority)
                admitted.append(stream_id)

            async def queued(count: int) -> bool:
                return int((await ref.ask(GetRegistryState())).queued) == count

            await _admit(ref, "hog", 1, 0)
            await _admit(ref, "b", 2, 0)
            arrivals = [("hog", 3, 0), ("b", 4, 0), ("c", 5, 0), ("hog", 6, -1)]
            for waiting, (client, stream_id, priority) in enumerate(arrivals):
                nursery.start_soon(waiter, client, stream_id, priority)
                await until(functools.partial(queued, waiting + 1))
            # The hog's urgent request goes first; then, at priority 0, the clients with
            # no stream running before the hog (running its urgent one), earliest first.
            for index, closed in enumerate([1, 2, 4]):
                await ref.tell(CloseStream(closed, "stop"))
                await until(lambda: len(admitted) == index + 1)  # noqa: B023 - awaited here
            assert admitted == [6, 4, 5]
            nursery.cancel_scope.cancel()  # the hog's waiter 3 still waits


@pytest.mark.slow
async def test_queued_requests_of_every_interface_run_by_priority(
        tmp_path: pathlib.Path) -> None:
    # A context long enough that the stream holding the one slot never ends by itself.
    model = str(make_tiny_model(tmp_path / "long", context=1_000_000))
    config = config_from_mapping({
        "stream_registry": {"max_active_streams": 1, "max_queued": 8},
        "supervision": {"backoff": {"min_ms": 1, "max_ms": 10}}})
    async with open_runtime(config, models={"tiny": model}) as rt:
        served = await serve_http(rt)
        listener = JsonRpcListener(rt, "tcp://127.0.0.1:0")
        await rt.start_transport(listener.spec("jsonrpc"))
        jsonrpc = await Client.connect(listener)
        http = served.async_client()
        finished: list[str] = []

        async def over_http(label: str, priority: int) -> None:
            reply = await http.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"priority": priority})
            assert reply.usage is not None and reply.usage.completion_tokens == 2
            finished.append(label)

        async def over_jsonrpc(label: str, priority: int) -> None:
            result = await jsonrpc.result("complete", {"prompt": PROMPT, "max_tokens": 2,
                                                       "priority": priority})
            assert result["usage"]["completion_tokens"] == 2
            finished.append(label)

        async def embedded(label: str, priority: int) -> None:
            reply = await rt.complete("tiny", PROMPT, max_tokens=2, priority=priority)
            assert reply.usage.completion_tokens == 2
            finished.append(label)

        async def queued(count: int) -> bool:
            return (await rt.statistics()).registry.queued == count

        release = trio.Event()

        async def hold(task_status: trio.TaskStatus[None]) -> None:
            async with rt.generate("tiny", PROMPT, max_tokens=900_000, ignore_eos=True,
                                   timeout_ms=600_000) as held:
                task_status.started()
                async for _ in held:  # read, so the reader is never idle
                    if release.is_set():
                        break

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                await nursery.start(hold)
                waiters = [(over_http, "http 3", 3), (embedded, "embedded 1", 1),
                           (over_jsonrpc, "jsonrpc -2", -2), (over_http, "http 1", 1)]
                for index, (run, label, priority) in enumerate(waiters):
                    nursery.start_soon(run, label, priority)
                    await until(functools.partial(queued, index + 1))
                release.set()
        assert finished == ["jsonrpc -2", "embedded 1", "http 1", "http 3"]
        with pytest.raises(openai.BadRequestError) as refused:
            await http.completions.create(model="tiny", prompt=PROMPT, max_tokens=1,
                                          extra_body={"priority": 2**31})
        assert "priority" in str(refused.value)
        await http.close()
        await jsonrpc.aclose()
        served.metrics.close()

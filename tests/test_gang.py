"""One model across processes (mlx.distributed, ring backend over loopback), supervised
as one gang: real ranks, real signals, resumed streams.

Real processes run in real time, so waits are bounded with trio.fail_after and tokens
or restarts are counted instead of asserting durations.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from tests.test_isolation import alive

from corral.config import ConfigError, RuntimeConfig, config_from_mapping
from corral.engine.spawn import worker_command
from corral.protocol.errors import Code, CorralError
from corral.protocol.gang import DistributedSettings
from corral.runtime import Runtime, open_runtime

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "A B C D E F"]
GREEDY: dict[str, Any] = {"max_tokens": 40}
SEEDED: dict[str, Any] = {"max_tokens": 40, "temperature": 0.9, "top_p": 0.95, "seed": 7}

pytestmark = pytest.mark.slow


def _config(path: str, ranks: int = 2, *, single: bool = True) -> RuntimeConfig:
    models: list[dict[str, Any]] = [
        {"alias": "gang", "path": path, "distributed": {"ranks": ranks}}]
    if single:
        models.append({"alias": "single", "path": path})
    return config_from_mapping({
        "generation": {"isolation": "process", "models": models,
                       "stall_timeout_ms": 3000},
        "python_runtime": {"max_restarts": 10, "restart_period_ms": 60000,
                           "restart_delay_base_ms": 10, "restart_delay_max_ms": 100,
                           "heartbeat_interval_ms": 200},
        "stream_registry": {"max_active_streams": 16, "max_queued": 256},
    })


@pytest.fixture
async def rt(model_path: str) -> AsyncIterator[Runtime]:
    async with open_runtime(_config(model_path)) as runtime:
        yield runtime


def gang_ranks() -> dict[int, int]:
    """The live gang ranks among this process's children: rank -> pid."""
    ranks: dict[int, int] = {}
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as listing:
                children = [int(pid) for pid in listing.read().split()]
        except OSError:
            continue
        for pid in children:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    argv = cmdline.read().split(b"\0")
            except OSError:
                continue
            if b"--gang-rank" in argv and alive(pid):
                ranks[int(argv[argv.index(b"--gang-rank") + 1])] = pid
    return ranks


async def wait_for_new_gang(rt: Runtime, old: dict[int, int], ranks: int = 2) -> dict[int, int]:
    """Wait until the gang runs again on other processes than `old`, and serves."""
    with trio.fail_after(60):
        while True:
            now = gang_ranks()
            model = {m.alias: m for m in rt.list_models()}["gang"]
            if (len(now) == ranks and not set(now.values()) & set(old.values())
                    and model.state == "ready"):
                return now
            await trio.sleep(0.05)


async def test_a_two_rank_gang_answers_the_single_process_text(rt: Runtime) -> None:
    ranks = gang_ranks()
    assert sorted(ranks) == [0, 1]
    for params in (GREEDY, SEEDED):
        for prompt in PROMPTS:
            single = await rt.complete("single", prompt, **params)
            gang = await rt.complete("gang", prompt, **params)
            assert gang.text == single.text
            assert gang.usage == single.usage
    # Batched: eight at once, with a shared prefix, give the same texts again.
    texts: dict[int, str] = {}

    async def one(index: int) -> None:
        prompt = PROMPTS[index % len(PROMPTS)] + " and more" * (index // len(PROMPTS))
        gang = await rt.complete("gang", prompt, **GREEDY)
        texts[index] = gang.text
        assert gang.text == (await rt.complete("single", prompt, **GREEDY)).text

    async with trio.open_nursery() as nursery:
        for index in range(8):
            nursery.start_soon(one, index)
    assert len(texts) == 8
    assert gang_ranks() == ranks  # nothing restarted


async def _streams_through_a_fault(rt: Runtime, fault: Any) -> list[str]:
    """Eight streams on the gang; `fault()` runs once every stream has had tokens."""
    texts: list[str] = [""] * 8
    started = [trio.Event() for _ in range(8)]

    async def stream(index: int) -> None:
        params = GREEDY if index % 2 else SEEDED
        async with rt.generate("gang", PROMPTS[index % 4], **params) as tokens:
            async for _ in tokens:
                if len(tokens.token_ids) >= 4:
                    started[index].set()
        texts[index] = tokens.text

    async def inject() -> None:
        for event in started:
            await event.wait()
        fault()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for index in range(8):
                nursery.start_soon(stream, index)
            nursery.start_soon(inject)
    return texts


@pytest.mark.parametrize(("rank", "signum"), [
    (1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
    ids=["kill-9-rank-1", "kill-9-rank-0", "sigstop-rank-1"])
async def test_a_rank_lost_under_8_streams_restarts_the_gang_and_loses_none(
        rt: Runtime, rank: int, signum: signal.Signals) -> None:
    fault_free = [(await rt.complete("single", PROMPTS[i % 4],
                                     **(GREEDY if i % 2 else SEEDED))).text for i in range(8)]
    before = gang_ranks()
    texts = await _streams_through_a_fault(rt, lambda: os.kill(before[rank], signum))
    assert texts == fault_free
    after = await wait_for_new_gang(rt, before)
    # Every old rank is gone, the stopped one too: no rank was left inside a collective.
    with trio.fail_after(30):
        while any(alive(pid) for pid in before.values()):
            await trio.sleep(0.05)
    assert sorted(after) == [0, 1]
    assert {m.alias: m.restarts for m in rt.list_models()}["gang"] >= 1
    assert (await rt.complete("gang", PROMPTS[1], **GREEDY)).text == fault_free[1]


async def test_heads_that_do_not_divide_among_the_ranks_are_refused_by_name(
        model_path: str) -> None:
    # The tiny model has 4 attention heads: 3 ranks cannot share them.
    async with open_runtime(_config(model_path, single=True)) as rt:
        with pytest.raises(CorralError) as caught:
            await rt.load_model(model_path, alias="three",
                                distributed=DistributedSettings(ranks=3))
        assert caught.value.code is Code.MODEL_LOAD_ERROR
        assert "num_attention_heads = 4 does not divide among 3 ranks" in str(caught.value)
        assert not caught.value.retryable
        assert "three" not in {m.alias for m in rt.list_models()}
        assert (await rt.complete("gang", PROMPTS[0], max_tokens=4)).finish_reason == "length"
        assert sorted(gang_ranks()) == [0, 1]


async def test_unloading_a_gang_leaves_no_rank(model_path: str) -> None:
    async with open_runtime(_config(model_path, single=False)) as rt:
        ranks = gang_ranks()
        assert sorted(ranks) == [0, 1]
        await rt.unload_model("gang")
        assert not any(alive(pid) for pid in ranks.values())
    assert gang_ranks() == {}


async def test_smollm2_on_three_ranks_answers_the_single_process_text(
        smollm2_cache: Path) -> None:
    # SmolLM2-135M has 9 attention heads and 3 key-value heads: 3 ranks share them.
    path = str(next((smollm2_cache / "gguf").iterdir()))
    async with open_runtime(_config(path, ranks=3)) as rt:
        assert sorted(gang_ranks()) == [0, 1, 2]
        for question in ("What is the capital of France?", "Name three colours."):
            chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 24}
            single = await rt.complete("single", **chat)
            gang = await rt.complete("gang", **chat)
            assert gang.text == single.text
        assert "Paris" in (await rt.complete("gang", messages=[
            {"role": "user", "content": "What is the capital of France?"}])).text


@pytest.mark.parametrize(("distributed", "message"), [
    ({"ranks": 2, "hosts": ["127.0.0.1"]}, "hosts: expected one host per rank (2), got 1"),
    ({"ranks": 2, "hosts": ["127.0.0.1", "10.0.0.2"]}, "port: expected a fixed port"),
    ({"ranks": 1}, "ranks: expected >= 2"),
    ({"ranks": 2, "backend": "mpi"}, "backend: expected one of 'ring'"),
])
def test_a_bad_distributed_setting_is_named_by_its_path(
        distributed: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"generation": {"models": [
            {"alias": "gang", "path": "/m", "distributed": distributed}]}})
    assert f"generation.models[0].distributed.{message}" in str(caught.value)


def test_a_rank_on_another_host_starts_there_over_ssh() -> None:
    command = worker_command(None, 500)
    addresses = ["10.0.0.1:5000", "10.0.0.2:5001"]
    local = command.for_rank(0, addresses, "127.0.0.1")
    assert local.argv[-4:] == ("--gang-rank", "0", "--gang-addresses", ",".join(addresses))
    remote = command.for_rank(1, addresses, "10.0.0.2")
    assert remote.argv[:2] == ("ssh", "10.0.0.2")
    assert "--gang-rank 1 --gang-addresses 10.0.0.1:5000,10.0.0.2:5001" in remote.argv[2]
    # Its parent there is the ssh session, not this process.
    assert "--parent-pid" not in remote.argv[2]

"""Issue 21, item 8: load and unload of one alias race with each other and with
requests under process isolation. Loads and unloads of one alias are serialized; every
outcome a caller sees is a typed error, never a 500 (a request its model's unload ends
gets ModelNotLoaded, 404); and no worker process leaks: at most two per loaded model
(the worker and its standby), none once it is unloaded.

Before the fix, such a storm left 4-5 workers for one alias and requests got
RuntimeError (HTTP 500).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest
import trio

from conftest import wait_until
from corral.config import RuntimeConfig, config_from_mapping
from corral.protocol.errors import Code, CorralError
from corral.runtime import Runtime, open_runtime

pytestmark = pytest.mark.slow

ALIAS = "m"


def worker_pids() -> set[int]:
    """The `corral.engine.worker` processes descended from this test process (read
    from /proc: their command line and parent)."""
    parents: dict[int, int] = {}
    workers: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # it exited meanwhile
        state_and_rest = stat[stat.rindex(")") + 2:].split()
        if state_and_rest[0] == "Z":
            continue  # exited; its parent reaps it
        parents[int(entry.name)] = int(state_and_rest[1])
        if b"corral.engine.worker" in cmdline:
            workers.add(int(entry.name))
    ours = set()
    for pid in workers:
        seen = pid
        while seen in parents and seen > 1:
            seen = parents[seen]
            if seen == os.getpid():
                ours.add(pid)
                break
    return ours


def _config() -> RuntimeConfig:
    return config_from_mapping({
        "generation": {"isolation": "process"},
        "python_runtime": {"restart_delay_base_ms": 10, "restart_delay_max_ms": 100,
                           "heartbeat_interval_ms": 200},
    })


async def _storm(rt: Runtime, model_path: str, seed: int) -> Counter[str]:
    """Loaders, unloaders and generators on one alias at once; what each saw."""
    seen: Counter[str] = Counter()
    rng = random.Random(seed)

    async def act(kind: str) -> None:
        for _ in range(6):
            await trio.sleep(rng.random() * 0.05)
            try:
                with trio.fail_after(120):  # a hang fails the test, not the suite
                    if kind == "load":
                        await rt.load_model(model_path, alias=ALIAS)
                    elif kind == "unload":
                        await rt.unload_model(ALIAS)
                    else:
                        await rt.complete(ALIAS, prompt="Hi", max_tokens=8,
                                          timeout_ms=60000)
                seen[f"{kind}:ok"] += 1
            except CorralError as exc:
                seen[f"{kind}:{exc.code.value}"] += 1
                assert exc.spec.http < 500 or exc.code is Code.CIRCUIT_OPEN, (
                    kind, exc.code, exc.message)

    async with trio.open_nursery() as nursery:
        for kind in ("load", "load", "unload", "unload", "generate", "generate", "generate"):
            nursery.start_soon(act, kind)
    return seen


async def test_a_load_unload_generate_storm_leaks_no_worker_and_answers_no_500(
        model_path: str) -> None:
    async with open_runtime(_config()) as rt:
        seen = await _storm(rt, model_path, seed=21)
        assert seen["load:ok"] >= 1 and seen["unload:ok"] >= 1, seen
        if not rt.list_models():
            await rt.load_model(model_path, alias=ALIAS)
        await wait_until(lambda: 1 <= len(worker_pids()) <= 2, timeout=60)
        served = await rt.complete(ALIAS, prompt="Hi", max_tokens=2)
        assert served.choices[0].finish_reason in ("stop", "length")
        await rt.unload_model(ALIAS)
        await wait_until(lambda: not worker_pids(), timeout=60)
    assert not worker_pids()


async def test_a_request_its_model_unload_ends_gets_model_not_loaded(
        model_path: str) -> None:
    async with open_runtime(_config(), models={ALIAS: model_path}) as rt:
        async with rt.generate(ALIAS, prompt="Hi", max_tokens=1800,
                               logit_bias={0: -100, 1: -100, 2: -100}) as stream:
            with pytest.raises(CorralError) as ended:
                async for chunk in stream:
                    if chunk.text:
                        await rt.unload_model(ALIAS)
        assert ended.value.code is Code.MODEL_NOT_LOADED
        assert ended.value.spec.http == 404
        await rt.load_model(model_path, alias=ALIAS)
        served = await rt.complete(ALIAS, prompt="Hi", max_tokens=2)
        assert served.choices[0].finish_reason in ("stop", "length")

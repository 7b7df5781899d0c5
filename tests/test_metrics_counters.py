"""The prefix cache's Prometheus counters, as a scraper sees them: a scrape changes
nothing (two scrapes with no traffic between them read the same), and a counter never
goes down, not even when a worker process is killed and replaced.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from corral.config import config_from_mapping
from corral.runtime import Runtime, open_runtime
from test_http import Served, serve_http

COUNTERS = ("corral_prefix_cache_queries", "corral_prefix_cache_hits",
            "corral_prefix_cache_disk_loads")
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 4


@asynccontextmanager
async def _serve(model_path: str, isolation: str) -> AsyncIterator[Served]:
    config = config_from_mapping({"generation": {"isolation": isolation},
                                  "logging": {"level": "error"}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        server = await serve_http(rt)
        yield server
        server.metrics.close()


async def _chat(served: Served, turns: int) -> None:
    for turn in range(turns):
        reply = await served.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Question number {turn}?"}]})
        assert reply.status_code == 200, reply.text


async def _counters(served: Served) -> dict[str, float]:
    reply = await served.get("/metrics")
    assert reply.status_code == 200
    found = {}
    for family in text_string_to_metric_families(reply.text):
        if family.name in COUNTERS:
            [sample] = [s for s in family.samples if s.name.endswith("_total")]
            assert sample.labels == {"model": "tiny"}
            found[family.name] = sample.value
    assert set(found) == set(COUNTERS), found
    return found


def _pid(rt: Runtime) -> Any:
    return getattr(rt.engine_statistics("tiny"), "pid", None)


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_two_scrapes_without_traffic_read_the_same(model_path: str,
                                                          isolation: str) -> None:
    async with _serve(model_path, isolation) as served:
        await _chat(served, 3)
        first = await _counters(served)
        second = await _counters(served)
        assert first == second
        # The traffic is all there: every prompt was looked up, the later turns hit.
        assert first["corral_prefix_cache_queries"] > 0
        assert first["corral_prefix_cache_hits"] > 0


@pytest.mark.slow
async def test_counters_never_go_down_when_a_worker_is_killed(model_path: str) -> None:
    async with _serve(model_path, "process") as served:
        rt = served.rt
        await _chat(served, 3)
        before = await _counters(served)
        pid = _pid(rt)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(60):
            while True:
                after = await _counters(served)
                assert all(after[name] >= before[name] for name in COUNTERS), (before, after)
                if _pid(rt) not in (None, pid):
                    break
                await trio.sleep(0.02)
        assert after == before  # the new worker did nothing yet
        await _chat(served, 2)
        later = await _counters(served)
        assert later["corral_prefix_cache_queries"] > before["corral_prefix_cache_queries"]
        assert all(later[name] >= before[name] for name in COUNTERS)
        assert later == await _counters(served)

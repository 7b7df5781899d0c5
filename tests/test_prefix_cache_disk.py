"""The prefix cache's disk tier on the real tiny model: files outlive an engine and a
SIGKILLed worker, bad files are survived, the directory stays bounded.

Engines and workers run in real time, so every wait is bounded by `trio.fail_after` and
waits on tokens, files or heartbeats, never on a duration.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from corral.bench.report import PROMPTS as BENCH_PROMPTS
from corral.config import PrefixCacheConfig, RuntimeConfig, config_from_mapping
from corral.engine.prefix_index import BLOCK
from corral.engine.thread import Engine
from corral.protocol.messages import (
    Completion,
    EngineSequence,
    PrefixCacheStatistics,
    TokenOut,
)
from corral.runtime import Runtime, TokenStream, open_runtime
from corral.tiny import make_tiny_model
from test_engine import Recorder, open_engine, seq
from test_isolation import alive, wait_for_new_worker, worker_pid

pytestmark = pytest.mark.slow

GUARD_S = 60  # only against a hang
MIN_TOKENS = 512
MAX_TOKENS = 40
RESUME_AT = 8  # generated tokens the second engine is handed back
GARBAGE = b"not a safetensors file\n" * 200


def document(sentences: int, start: int) -> str:
    """A long prompt: `sentences` of the bench prompts in turn, from `start`."""
    return " ".join(BENCH_PROMPTS[(start + i) % len(BENCH_PROMPTS)] for i in range(sentences))


# Each runs to MAX_TOKENS, greedy and seeded, on the tiny model (none meets EOS early),
# and no two share a block of leading tokens.
MEDIUM = {"a": document(49, 4), "b": document(49, 6)}  # 607 tokens each
LONG = {"greedy": document(124, 4), "seeded": document(124, 12)}  # 1552 and 1545 tokens
PARAMS: dict[str, dict[str, Any]] = {
    "greedy": {"max_tokens": MAX_TOKENS},
    "seeded": {"max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": 7},
}


@pytest.fixture(scope="module")
def medium(model_path: str) -> dict[str, list[int]]:
    """The token ids of the MEDIUM prompts."""

    async def run() -> dict[str, list[int]]:
        async with open_engine(model_path, Recorder(),
                               prefix_cache=PrefixCacheConfig(enabled=False)) as engine:
            return {name: await engine.tokenize(text) for name, text in MEDIUM.items()}

    return trio.run(run)


@pytest.fixture(scope="module")
def fault_free(model_path: str) -> dict[str, Completion]:
    """What a runtime without a prefix cache answers to each LONG prompt: the text every
    run with a cache, a kill or a bad file must reproduce."""

    async def run() -> dict[str, Completion]:
        config = config_from_mapping({"generation": {"prefix_cache": {"enabled": False}}})
        async with open_runtime(config, models={"tiny": model_path}) as rt:
            return {name: await rt.complete("tiny", LONG[name], **PARAMS[name])
                    for name in LONG}

    return trio.run(run)


@pytest.fixture(scope="module")
def foreign_file(model_path: str, medium: dict[str, list[int]],
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid cache file of another tiny model (seed 1): another model's KV."""
    other = str(make_tiny_model(tmp_path_factory.mktemp("other") / "tiny", seed=1))
    directory = tmp_path_factory.mktemp("other-cache")

    async def run() -> None:
        await serve(other, disk_cache(directory), [seq(0, medium["a"], MAX_TOKENS)])

    trio.run(run)
    (path,) = cache_files(directory)
    return path


def disk_cache(directory: Path, **settings: Any) -> PrefixCacheConfig:
    return PrefixCacheConfig(disk_dir=str(directory), disk_min_tokens=MIN_TOKENS, **settings)


def cache_files(directory: Path) -> list[Path]:
    """The finished cache files under `directory` (temporary ones left out)."""
    return sorted(p for p in directory.rglob("*.safetensors") if not p.name.startswith(".tmp-"))


def temporary_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.startswith(".tmp-")]


def model_directory(directory: Path) -> Path:
    """The one per-model subdirectory of a cache directory."""
    (subdirectory,) = directory.iterdir()
    assert subdirectory.is_dir()
    return subdirectory


def first_output(recorder: Recorder, seq_id: int) -> TokenOut:
    return next(out for step in recorder.steps for out in step.outputs if out.seq_id == seq_id)


async def run_in_turn(engine: Engine, recorder: Recorder,
                      sequences: list[EngineSequence]) -> None:
    """Each sequence to its end before the next starts, so each sees what the ones
    before it stored."""
    for sequence in sequences:
        engine.submit(sequence)
        await recorder.wait_finished(sequence.seq_id)


async def serve(model_path: str, cache: PrefixCacheConfig,
                sequences: list[EngineSequence]) -> tuple[Recorder, PrefixCacheStatistics]:
    """Run `sequences` in turn on a fresh engine and close it; its steps, and its prefix
    cache counters once closed (so every queued write has finished)."""
    recorder = Recorder()
    async with open_engine(model_path, recorder, prefix_cache=cache) as engine:
        await run_in_turn(engine, recorder, sequences)
    return recorder, engine.statistics().prefix_cache


# -- the thread engine ------------------------------------------------------------------


async def test_a_second_engine_resumes_from_the_first_engines_file(
        model_path: str, medium: dict[str, list[int]], tmp_path: Path) -> None:
    prompt = medium["a"]
    short = medium["b"][:200]  # below disk_min_tokens: kept in memory only
    assert len(prompt) >= 600
    first, written = await serve(model_path, disk_cache(tmp_path),
                                 [seq(1, prompt, MAX_TOKENS), seq(2, short, 4)])
    generated = first.tokens[1]
    assert first.finish[1] == "length"
    assert written.disk_writes >= 1 and written.disk_errors == 0
    # One subdirectory per model identity; in it, one file: the prompt's, which its
    # finished sequence (prompt + generated) extended and replaced.
    files = cache_files(tmp_path)
    assert len(files) == 1 and files[0].parent == model_directory(tmp_path)
    assert temporary_files(tmp_path) == []

    resumed = seq(1, prompt, MAX_TOKENS - RESUME_AT, generated=generated[:RESUME_AT])
    second, read = await serve(model_path, disk_cache(tmp_path), [resumed])
    uncached, _ = await serve(model_path, PrefixCacheConfig(enabled=False), [resumed])
    assert first_output(second, 1).cached_tokens >= len(prompt)
    assert first_output(uncached, 1).cached_tokens == 0
    assert read.disk_loads >= 1 and read.disk_hit_tokens >= len(prompt)
    assert read.disk_errors == 0
    assert second.tokens[1] == uncached.tokens[1] == generated[RESUME_AT:]
    assert second.text(1) == uncached.text(1)
    assert temporary_files(tmp_path) == []


async def test_bad_files_are_deleted_counted_and_served_around(
        model_path: str, medium: dict[str, list[int]], foreign_file: Path,
        tmp_path: Path) -> None:
    # One valid file per prompt, made by two engines in turn, so each is known by name.
    cache = disk_cache(tmp_path)
    reference, _ = await serve(model_path, cache, [seq(1, medium["a"], MAX_TOKENS)])
    (file_a,) = cache_files(tmp_path)
    other, _ = await serve(model_path, cache, [seq(2, medium["b"], MAX_TOKENS)])
    (file_b,) = set(cache_files(tmp_path)) - {file_a}
    assert first_output(reference, 1).cached_tokens == 0
    assert first_output(other, 2).cached_tokens == 0
    directory = model_directory(tmp_path)
    sizes = {p.name: p.stat().st_size for p in (file_a, file_b)}

    # Found when the engine starts: a truncated file, garbage, another model's file.
    with file_a.open("r+b") as f:
        f.truncate(file_a.stat().st_size // 2)
    garbage = directory / f"{'0' * 40}.safetensors"
    garbage.write_bytes(GARBAGE)
    foreign = directory / f"{'f' * 40}.safetensors"
    shutil.copyfile(foreign_file, foreign)

    recorder = Recorder()
    async with open_engine(model_path, recorder, prefix_cache=cache) as engine:
        at_start = engine.statistics().prefix_cache
        assert cache_files(tmp_path) == [file_b]
        # Found when it is read: a file truncated after the engine indexed it.
        with file_b.open("r+b") as f:
            f.truncate(file_b.stat().st_size - 100)
        await run_in_turn(engine, recorder, [seq(1, medium["a"], MAX_TOKENS),
                                             seq(2, medium["b"], MAX_TOKENS)])
        served = engine.statistics().prefix_cache
    assert at_start.disk_errors == 3 and at_start.disk_entries == 1
    assert served.disk_errors == 4 and served.disk_loads == 0
    for seq_id, expected in ((1, reference), (2, other)):
        assert first_output(recorder, seq_id).cached_tokens == 0
        assert recorder.tokens[seq_id] == expected.tokens[seq_id]
        assert recorder.finish[seq_id] == expected.finish[seq_id]
    # The bad files are gone; the engine wrote both prompts' files again, whole.
    assert {p.name: p.stat().st_size for p in cache_files(tmp_path)} == sizes
    assert temporary_files(tmp_path) == []


async def test_a_file_whose_kv_bytes_were_overwritten_is_not_used(
        model_path: str, medium: dict[str, list[int]], tmp_path: Path) -> None:
    cache = disk_cache(tmp_path)
    reference, _ = await serve(model_path, cache, [seq(1, medium["a"], MAX_TOKENS)])
    (path,) = cache_files(tmp_path)
    data = bytearray(path.read_bytes())
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_length])
    start, end = (8 + header_length + offset for offset in header["0.0"]["data_offsets"])
    data[start:end] = struct.pack("<f", math.nan) * ((end - start) // 4)  # one layer's keys
    path.write_bytes(bytes(data))
    served, stats = await serve(model_path, cache, [seq(1, medium["a"], MAX_TOKENS)])
    assert served.tokens[1] == reference.tokens[1]
    assert stats.disk_errors == 1 and stats.disk_loads == 0


async def test_disk_max_bytes_bounds_the_directory(
        model_path: str, medium: dict[str, list[int]], tmp_path: Path) -> None:
    bound = 1_000_000  # about three of these prompts' files
    prompts = [[*medium["a"][:1], *medium[name][start:]]
               for start in range(1, 9) for name in ("a", "b")]
    assert len({tuple(p[:BLOCK]) for p in prompts}) == len(prompts), "no shared block"
    cache = disk_cache(tmp_path, disk_max_bytes=bound)
    _, stats = await serve(model_path, cache,
                           [seq(i, p, 8) for i, p in enumerate(prompts)])
    sizes = [p.stat().st_size for p in cache_files(tmp_path)]
    assert 1 < len(sizes) < len(prompts), "some were evicted, some kept"
    assert sum(sizes) <= bound
    assert stats.disk_entries == len(sizes) and stats.disk_bytes <= bound
    # The last prompt's file is among those kept: the least recently used go first.
    recorder, again = await serve(model_path, cache, [seq(0, prompts[-1], 8)])
    assert again.disk_loads == 1 and first_output(recorder, 0).cached_tokens > 0
    assert sum(p.stat().st_size for p in cache_files(tmp_path)) <= bound
    assert temporary_files(tmp_path) == []


async def test_the_bound_counts_whole_files_not_only_their_kv(
        model_path: str, medium: dict[str, list[int]], tmp_path: Path) -> None:
    length = MIN_TOKENS + 31  # every file holds length + 1 tokens: the prompt, one token
    prompts = [[*medium["a"][:1], *(medium["a"] + medium["b"])[start:start + length - 1]]
               for start in range(1, 6 * 37, 37)]
    _, probe = await serve(model_path, disk_cache(tmp_path / "probe"), [seq(0, prompts[0], 1)])
    kv_bytes = probe.disk_bytes  # one file's KV
    bound = 3 * kv_bytes  # room for exactly three files' KV
    _, stats = await serve(model_path, disk_cache(tmp_path / "bounded", disk_max_bytes=bound),
                           [seq(i, p, 1) for i, p in enumerate(prompts)])
    files = cache_files(tmp_path / "bounded")
    assert stats.disk_entries == len(files) == 3
    assert sum(p.stat().st_size for p in files) <= bound
    assert stats.disk_bytes == sum(p.stat().st_size for p in files)


async def test_files_swapped_on_disk_are_refused_and_the_fault_free_text_is_served(
        model_path: str, medium: dict[str, list[int]], tmp_path: Path) -> None:
    """Issue 21 item 4: two valid files of this model, prefixes of the same length,
    swapped under each other's names: before the engine starts (its scan sees names
    that are not their prefixes' hashes) and after (a load sees a header naming other
    tokens than the index expects). Neither is ever decoded from."""
    cache = disk_cache(tmp_path)
    reference, _ = await serve(model_path, cache, [seq(1, medium["a"], MAX_TOKENS)])
    (file_a,) = cache_files(tmp_path)
    other, _ = await serve(model_path, cache, [seq(2, medium["b"], MAX_TOKENS)])
    (file_b,) = set(cache_files(tmp_path)) - {file_a}
    assert file_a.stat().st_size == file_b.stat().st_size  # same length, same shapes
    assert first_output(reference, 1).cached_tokens == 0  # no cache yet: fault-free
    assert first_output(other, 2).cached_tokens == 0
    originals = {p.name: p.read_bytes() for p in (file_a, file_b)}

    def swap() -> None:
        file_a.write_bytes(originals[file_b.name])
        file_b.write_bytes(originals[file_a.name])

    for swapped_before_start in (True, False):
        if swapped_before_start:
            swap()
        recorder = Recorder()
        async with open_engine(model_path, recorder, prefix_cache=cache) as engine:
            if not swapped_before_start:
                assert engine.statistics().prefix_cache.disk_entries == 2
                swap()
            await run_in_turn(engine, recorder, [seq(1, medium["a"], MAX_TOKENS),
                                                 seq(2, medium["b"], MAX_TOKENS)])
            served = engine.statistics().prefix_cache
        assert served.disk_errors == 2 and served.disk_loads == 0
        for seq_id, expected in ((1, reference), (2, other)):
            assert first_output(recorder, seq_id).cached_tokens == 0
            assert recorder.tokens[seq_id] == expected.tokens[seq_id]
        # The swapped files were removed; the engine wrote both prompts' files again.
        assert {p.name: p.read_bytes() for p in cache_files(tmp_path)} == originals


async def test_a_fifo_in_disk_dir_is_skipped_and_never_blocks_the_engine(
        model_path: str, medium: dict[str, list[int]], tmp_path: Path) -> None:
    """Issue 21 item 9: a FIFO among the cache files, and a FIFO as the whole disk_dir:
    the engine starts and serves the fault-free text; the tier skips the FIFO (it is
    not deleted, not opened) or, when the directory itself is unusable, is off."""
    cache = disk_cache(tmp_path / "cache")
    reference, _ = await serve(model_path, cache, [seq(1, medium["a"], MAX_TOKENS)])
    fifo = model_directory(tmp_path / "cache") / f"{'e' * 40}.safetensors"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "fifo-dir")
    for settings, entries in ((cache, 1), (disk_cache(tmp_path / "fifo-dir"), 0)):
        recorder = Recorder()
        with trio.fail_after(GUARD_S):  # before the fix: the scan blocked on the FIFO
            async with open_engine(model_path, recorder, prefix_cache=settings) as engine:
                stats = engine.statistics().prefix_cache
                assert stats.disk_entries == entries
                assert stats.disk_errors == entries  # the FIFO, when the tier is on
                await run_in_turn(engine, recorder, [seq(1, medium["a"], MAX_TOKENS)])
        assert recorder.tokens[1] == reference.tokens[1]
    assert fifo.exists()


# -- process isolation through the runtime ----------------------------------------------


def isolated_config(cache_dir: Path) -> RuntimeConfig:
    """Process isolation with the disk tier and test_isolation's short restart delays."""
    return config_from_mapping({
        "generation": {"isolation": "process",
                       "prefix_cache": {"disk_dir": str(cache_dir),
                                        "disk_min_tokens": MIN_TOKENS}},
        "python_runtime": {"max_restarts": 10, "restart_period_ms": 60000,
                           "restart_delay_base_ms": 10, "restart_delay_max_ms": 100,
                           "heartbeat_interval_ms": 200},
    })


async def wait_for_prefix_cache(
        rt: Runtime, condition: Callable[[PrefixCacheStatistics], bool]
) -> PrefixCacheStatistics:
    """The worker's prefix cache counters, once a heartbeat has carried ones that meet
    `condition`."""
    with trio.fail_after(GUARD_S):
        while True:
            stats = rt.prefix_cache_statistics().get("tiny")
            if stats is not None and condition(stats):
                return stats
            await trio.sleep(0.02)


async def stream_and_kill(rt: Runtime, cache_dir: Path, prompt: str,
                          params: dict[str, Any]) -> tuple[TokenStream, int]:
    """Stream a request; SIGKILL its worker once 5 tokens have arrived and the prompt's
    KV is in a finished file (the directory starts empty)."""
    killed = 0
    async with rt.generate("tiny", prompt, **params) as stream:
        async for _ in stream:
            if not killed and len(stream.token_ids) >= 5 and cache_files(cache_dir):
                pid = worker_pid(rt)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                killed = pid
    assert killed, "the stream ended before its prompt's file was written"
    return stream, killed


@pytest.mark.parametrize("name", ["greedy", "seeded"])
async def test_a_worker_killed_mid_stream_restarts_from_the_disk_cache(
        model_path: str, fault_free: dict[str, Completion], tmp_path: Path, name: str) -> None:
    prompt, params, expected = LONG[name], PARAMS[name], fault_free[name]
    assert expected.finish_reason == "length" and expected.usage.prompt_tokens >= 1500
    async with open_runtime(isolated_config(tmp_path), models={"tiny": model_path}) as rt:
        with trio.fail_after(GUARD_S):
            stream, killed = await stream_and_kill(rt, tmp_path, prompt, params)
        assert stream.text == expected.text
        assert stream.token_ids == expected.token_ids
        assert stream.finish_reason == "length"
        assert not alive(killed)
        await wait_for_new_worker(rt, killed)
        stats = await wait_for_prefix_cache(rt, lambda s: s.disk_loads >= 1)
        assert stats.disk_hit_tokens >= 1500 and stats.disk_errors == 0
        with trio.fail_after(GUARD_S):
            following = await rt.complete("tiny", prompt, **params)
        assert following.text == expected.text
        assert following.usage.cached_tokens >= 1500
        assert [m.restarts for m in rt.list_models()] == [1]
    assert temporary_files(tmp_path) == []


async def test_a_worker_starts_and_serves_past_bad_files(
        model_path: str, fault_free: dict[str, Completion], foreign_file: Path,
        tmp_path: Path) -> None:
    expected = fault_free["greedy"]
    recorder = Recorder()  # a thread engine leaves a good file of the prompt
    async with open_engine(model_path, recorder, prefix_cache=disk_cache(tmp_path)) as engine:
        prompt = await engine.tokenize(LONG["greedy"])
        await run_in_turn(engine, recorder, [seq(0, prompt, MAX_TOKENS)])
    directory = model_directory(tmp_path)
    (good,) = cache_files(tmp_path)
    truncated = directory / f"{'1' * 40}.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    garbage = directory / f"{'0' * 40}.safetensors"
    garbage.write_bytes(GARBAGE)
    foreign = directory / f"{'f' * 40}.safetensors"
    shutil.copyfile(foreign_file, foreign)

    async with open_runtime(isolated_config(tmp_path), models={"tiny": model_path}) as rt:
        stats = await wait_for_prefix_cache(rt, lambda s: s.enabled)
        assert stats.disk_errors == 3 and stats.disk_entries == 1
        assert cache_files(tmp_path) == [good]
        with trio.fail_after(GUARD_S):
            served = await rt.complete("tiny", LONG["greedy"], **PARAMS["greedy"])
        assert served.text == expected.text
        assert served.usage.cached_tokens >= 1500
        stats = await wait_for_prefix_cache(rt, lambda s: s.disk_loads >= 1)
        assert stats.disk_errors == 3
    assert temporary_files(tmp_path) == []

"""The prefix cache: its index against a brute-force reference, and the engine on the real
tiny model, where reusing a prefix's KV must change nothing but the work done.

Each engine scenario runs twice, on an engine with the cache and on one without, and
the two must produce the same tokens and text; the cached run must also report the
right `cached_tokens` and counters. The engine computes in real time, so the tests wait
for sequences to finish, never for time to pass.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.config import PrefixCacheConfig
from corral.engine.api import EngineStatistics
from corral.engine.prefix_index import BLOCK, PrefixIndex, common_prefix_length
from corral.engine.thread import Engine
from corral.protocol.messages import PrefixCacheStatistics, SamplingParams
from test_engine import GREEDY, Recorder, open_engine, seq

MAX_TOKENS = 20
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=2024)
SAMPLINGS = pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
OFF = PrefixCacheConfig(enabled=False)
ON = PrefixCacheConfig()
KV_BYTES_PER_TOKEN = 512  # the tiny model: 2 layers x (keys, values) x 2 heads x 16 x 4 bytes


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    """`n` ids of ordinary tokens of the tiny tokenizer (0 to 4 are its special ones)."""
    return [rng.randrange(5, 201) for _ in range(n)]


def _diverging(rng: random.Random, prefix: list[int], n: int, others: list[list[int]],
               ) -> list[int]:
    """`prefix` and `n` more tokens, whose first differs from that of every tail in
    `others` (so the shared length is exactly `len(prefix)`)."""
    taken = {other[len(prefix)] for other in others}
    while True:
        tail = _random_tokens(rng, n)
        if tail[0] not in taken:
            return prefix + tail


# -- the index --------------------------------------------------------------------------


@st.composite
def _related_sequences(draw: st.DrawFn, count: int) -> list[list[int]]:
    """Sequences cut from one stem, each with its own tail, so they share long prefixes
    (a small alphabet makes the tails agree for a while too)."""
    letters = st.integers(0, 3)
    stem = draw(st.lists(letters, min_size=2 * BLOCK, max_size=200))
    return [stem[:draw(st.integers(0, len(stem)))] + draw(st.lists(letters, max_size=40))
            for _ in range(count)]


_KEYS = st.sampled_from("abcde")
_OPERATIONS = st.lists(st.tuples(st.booleans(), _KEYS, st.integers(0, 7)), max_size=12)


@settings(max_examples=100, deadline=None)
@given(sequences=_related_sequences(12), operations=_OPERATIONS)
def test_index_answers_as_a_brute_force_search(
        sequences: list[list[int]], operations: list[tuple[bool, str, int]]) -> None:
    """After every add (or replace) and remove, `longest` and `prefixes_of` agree with
    comparing the query against every stored sequence."""
    stored, queries = sequences[:8], sequences[8:]
    index: PrefixIndex[str] = PrefixIndex()
    reference: dict[str, list[int]] = {}
    for add, key, which in operations:
        if add:
            index.add(key, stored[which])
            reference[key] = stored[which]
        else:
            index.remove(key)
            reference.pop(key, None)
        assert len(index) == len(reference)
        for query in [*queries, *stored]:
            shared = {k: _brute_common_prefix(t, query) for k, t in reference.items()}
            best = max(shared.values(), default=0)
            key_found, length = index.longest(query)
            if best < BLOCK:
                assert (key_found, length) == (None, 0)
            else:
                assert length == best and key_found is not None
                assert shared[key_found] == best
                assert len(reference[key_found]) == min(
                    len(reference[k]) for k, n in shared.items() if n == best)
            assert sorted(index.prefixes_of(query)) == sorted(
                k for k, t in reference.items() if query[:len(t)] == t)


def _brute_common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@settings(max_examples=100, deadline=None)
@given(pair=_related_sequences(2))
def test_common_prefix_length_is_the_brute_force_one(pair: list[list[int]]) -> None:
    a, b = pair
    assert common_prefix_length(a, b) == _brute_common_prefix(a, b)
    assert common_prefix_length(b, a) == _brute_common_prefix(a, b)


def test_index_add_replace_and_remove() -> None:
    rng = random.Random(3)
    first = _random_tokens(rng, 100)
    second = _diverging(rng, first[:40], 60, [first])
    index: PrefixIndex[str] = PrefixIndex()
    assert index.longest(first) == (None, 0)
    index.add("a", first)
    assert "a" in index and len(index) == 1 and index.tokens("a") == first
    assert index.longest(first + [7]) == ("a", 100)
    assert index.longest(first[:BLOCK - 1]) == (None, 0), "under one block: no hit"
    assert index.longest(first[:BLOCK]) == ("a", BLOCK)
    assert index.longest(second) == ("a", 40)
    assert index.prefixes_of(first + [7]) == ["a"] and index.prefixes_of(first[:99]) == []

    index.add("a", second)  # replaces what "a" held
    assert len(index) == 1 and index.tokens("a") == second
    assert index.longest(first) == ("a", 40)
    assert index.longest(second) == ("a", 100)
    assert index.prefixes_of(first) == []

    index.add("b", first[:60])
    assert index.longest(first) == ("b", 60)
    assert index.longest(first[:40] + [999]) == ("b", 40), "a tie goes to the shorter one"
    index.remove("b")
    index.remove("never-added")
    assert "b" not in index and len(index) == 1
    assert index.longest(first) == ("a", 40)
    index.remove("a")
    assert len(index) == 0 and index.longest(second) == (None, 0)


# -- the engine: the same output with the cache, and what it reports --------------------


@dataclass
class Driver:
    """Submits a scenario's sequences to one engine and remembers their tokens."""

    engine: Engine
    recorder: Recorder
    sampling: SamplingParams
    submitted: dict[int, list[int]] = field(default_factory=dict)

    async def run(self, sequences: dict[int, list[int]]) -> None:
        """Submit every sequence at once, then wait until all have finished."""
        for seq_id, tokens in sequences.items():
            self.submitted[seq_id] = tokens
            self.engine.submit(seq(seq_id, tokens, MAX_TOKENS, self.sampling))
        await self.recorder.wait_finished(*sequences)


Scenario = Callable[[Driver], Awaitable[None]]


def _one_after_another(*batches: dict[int, list[int]]) -> Scenario:
    """A scenario that submits each batch of sequences once the one before finished."""
    async def scenario(driver: Driver) -> None:
        for batch in batches:
            await driver.run(batch)

    return scenario


@dataclass
class Run:
    recorder: Recorder
    statistics: EngineStatistics
    submitted: dict[int, list[int]]

    @property
    def cached(self) -> dict[int, int]:
        """`cached_tokens` of each sequence's first token."""
        first: dict[int, int] = {}
        for step in self.recorder.steps:
            for out in step.outputs:
                first.setdefault(out.seq_id, out.cached_tokens)
        return first


async def _run(model_path: str, scenario: Scenario, sampling: SamplingParams,
               prefix_cache: PrefixCacheConfig) -> Run:
    recorder = Recorder()
    async with open_engine(model_path, recorder, prefix_cache=prefix_cache) as engine:
        driver = Driver(engine, recorder, sampling)
        await scenario(driver)
        statistics = engine.statistics()
    assert recorder.failures == []
    return Run(recorder, statistics, driver.submitted)


async def _with_and_without(model_path: str, scenario: Scenario,
                            sampling: SamplingParams = GREEDY,
                            prefix_cache: PrefixCacheConfig = ON) -> Run:
    """Run `scenario` on an engine without the cache and on one with `prefix_cache`;
    assert they agree token for token and that the counters add up; return the second."""
    uncached = await _run(model_path, scenario, sampling, OFF)
    cached = await _run(model_path, scenario, sampling, prefix_cache)
    assert cached.submitted == uncached.submitted
    for seq_id in uncached.submitted:
        assert cached.recorder.tokens[seq_id] == uncached.recorder.tokens[seq_id], seq_id
        assert cached.recorder.text(seq_id) == uncached.recorder.text(seq_id), seq_id
        assert cached.recorder.finish[seq_id] == uncached.recorder.finish[seq_id], seq_id
    assert set(uncached.cached.values()) == {0}
    assert uncached.statistics.prefix_cache == PrefixCacheStatistics()
    _assert_counters_add_up(cached)
    return cached


def _assert_counters_add_up(run: Run) -> None:
    """Every prompt token was looked up once; each was either a hit or prefilled."""
    looked_up = sum(len(tokens) for tokens in run.submitted.values())
    hits = sum(run.cached.values())
    stats = run.statistics
    assert stats.prefix_cache.enabled
    assert stats.prefix_cache.queries == looked_up
    assert stats.prefix_cache.hits == hits
    assert stats.prompt_tokens == looked_up - hits
    assert stats.generation_tokens == sum(len(t) for t in run.recorder.tokens.values())


@pytest.mark.slow
@SAMPLINGS
async def test_the_same_prompt_twice_hits_all_but_its_last_token(
        model_path: str, sampling: SamplingParams) -> None:
    prompt = _random_tokens(random.Random(1), 300)
    scenario = _one_after_another({1: prompt}, {2: prompt})
    run = await _with_and_without(model_path, scenario, sampling)
    assert run.cached == {1: 0, 2: len(prompt) - 1}
    assert run.recorder.tokens[1] == run.recorder.tokens[2]


@pytest.mark.slow
@SAMPLINGS
async def test_a_shared_prefix_hits_exactly_its_length(
        model_path: str, sampling: SamplingParams) -> None:
    rng = random.Random(2)
    shared = _random_tokens(rng, 200)
    first = shared + _random_tokens(rng, 100)
    second = _diverging(rng, shared, 80, [first])
    short = _diverging(rng, shared[:BLOCK - 2], 250, [first, second])
    scenario = _one_after_another({1: first}, {2: second}, {3: short})
    run = await _with_and_without(model_path, scenario, sampling)
    assert run.cached == {1: 0, 2: len(shared), 3: 0}, "under one block is not a hit"


@pytest.mark.slow
@SAMPLINGS
async def test_a_prompt_that_a_cached_one_extends_hits_all_but_its_last_token(
        model_path: str, sampling: SamplingParams) -> None:
    prompt = _random_tokens(random.Random(3), 400)
    scenario = _one_after_another({1: prompt}, {2: prompt[:250]}, {3: prompt[:BLOCK]})
    run = await _with_and_without(model_path, scenario, sampling)
    assert run.cached == {1: 0, 2: 249, 3: 0}, "a hit of BLOCK - 1 tokens is not one"


@pytest.mark.slow
@SAMPLINGS
async def test_a_second_turn_starts_from_the_whole_first_one(
        model_path: str, sampling: SamplingParams) -> None:
    rng = random.Random(4)
    first = _random_tokens(rng, 300)
    asked = _random_tokens(rng, 30)

    async def scenario(driver: Driver) -> None:
        await driver.run({1: first})
        await driver.run({2: first + driver.recorder.tokens[1] + asked})

    run = await _with_and_without(model_path, scenario, sampling)
    answer = run.recorder.tokens[1]
    assert run.cached[1] == 0
    # The first turn's prompt and its answer, but for a last token whose KV may be
    # missing when it ended the turn.
    assert len(first) + len(answer) - 1 <= run.cached[2] < len(run.submitted[2])


@pytest.mark.slow
@SAMPLINGS
async def test_concurrent_sequences_wait_for_the_first_to_prefill_their_shared_prefix(
        model_path: str, sampling: SamplingParams) -> None:
    rng = random.Random(5)
    shared = _random_tokens(rng, 600)
    prompts: list[list[int]] = []
    for _ in range(8):
        prompts.append(_diverging(rng, shared, 20, prompts))

    run = await _with_and_without(model_path, _one_after_another(dict(enumerate(prompts))),
                                  sampling)
    assert run.cached == {0: 0} | {i: len(shared) for i in range(1, 8)}
    prefilled_at = run.recorder.prefilled_at
    assert all(prefilled_at[i] > prefilled_at[0] for i in range(1, 8))
    assert run.statistics.prompt_tokens == 620 + 7 * 20


@pytest.mark.slow
async def test_eviction_keeps_the_cache_under_its_bound(model_path: str) -> None:
    rng = random.Random(6)
    prompts = [_random_tokens(rng, 300) for _ in range(6)]
    entry = (300 + MAX_TOKENS) * KV_BYTES_PER_TOKEN  # a finished sequence's prefix
    max_bytes = 2 * entry + entry // 2
    held: list[PrefixCacheStatistics] = []  # after each request, on the cached engine

    def look(driver: Driver) -> None:
        stats = driver.engine.statistics().prefix_cache
        if stats.enabled:
            held.append(stats)

    async def scenario(driver: Driver) -> None:
        for i, prompt in enumerate(prompts):
            await driver.run({i: prompt})
            look(driver)
        await driver.run({10: prompts[-1]})  # among the last two: still held
        look(driver)
        await driver.run({11: prompts[0]})  # evicted long ago
        look(driver)

    run = await _with_and_without(model_path, scenario,
                                  prefix_cache=PrefixCacheConfig(max_bytes=max_bytes))
    assert all(0 < stats.bytes <= max_bytes for stats in held)
    assert max(stats.entries for stats in held) >= 2, "least recently used, not all"
    assert len(held) == len(prompts) + 2
    assert held[-1].evictions >= len(prompts) - 2
    assert run.cached == {i: 0 for i in range(6)} | {10: 299, 11: 0}


@pytest.mark.slow
async def test_a_prefix_too_large_to_keep_leaves_the_prefix_it_extends(
        model_path: str) -> None:
    prompt = _random_tokens(random.Random(9), 300)
    # The prompt's KV fits; with its answer, kept when the sequence finishes, it does not.
    max_bytes = (len(prompt) + MAX_TOKENS // 2) * KV_BYTES_PER_TOKEN

    run = await _with_and_without(model_path, _one_after_another({1: prompt}, {2: prompt}),
                                  prefix_cache=PrefixCacheConfig(max_bytes=max_bytes))
    assert run.cached == {1: 0, 2: len(prompt) - 1}


@pytest.mark.slow
async def test_a_cache_that_holds_nothing_fails_nothing(model_path: str) -> None:
    prompt = _random_tokens(random.Random(7), 300)

    scenario = _one_after_another({1: prompt}, {2: prompt, 3: prompt[:200] + [5] * 40})
    run = await _with_and_without(model_path, scenario,
                                  prefix_cache=PrefixCacheConfig(max_bytes=0))
    assert run.cached == {1: 0, 2: 0, 3: 0}
    stats = run.statistics.prefix_cache
    assert stats.bytes == stats.entries == stats.hits == 0


@pytest.mark.slow
async def test_a_disabled_cache_reports_nothing(model_path: str) -> None:
    prompt = _random_tokens(random.Random(8), 300)

    run = await _run(model_path, _one_after_another({1: prompt}, {2: prompt}), GREEDY, OFF)
    assert run.cached == {1: 0, 2: 0}
    assert run.statistics.prefix_cache == PrefixCacheStatistics()
    assert run.statistics.prefix_cache.enabled is False
    assert run.statistics.prompt_tokens == 2 * len(prompt)

"""Tests for corral.engine.thread on the real tiny model: no mocks, no MockClock.

The engine thread computes in real time, so these tests count engine steps rather than
seconds; `trio.fail_after` only guards against a hang.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import mlx_lm
import msgspec
import pytest
import trio
from mlx_lm.sample_utils import make_sampler

from corral.bench.report import PROMPTS as BENCH_PROMPTS
from corral.engine.api import EngineSettings
from corral.engine.thread import Engine
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import EngineSequence, EngineStep, SamplingParams

pytestmark = pytest.mark.slow

GUARD_S = 60  # only against a hang; every test takes a fraction of it
MAX_TOKENS = 20
PROMPTS = list(BENCH_PROMPTS)
GREEDY = SamplingParams()


def _in_helper_thread(fn: Callable[[], Any]) -> Any:
    """Run fn in a fresh OS thread and return its result.

    Raw mlx_lm runs here, once per session and before any engine starts, rather than in
    the test's trio thread: the trio thread never touches MLX, as in production. This
    works because mlx_lm 0.32's `generation_stream` (generate.py:234), which
    `stream_generate` uses by default, is a thread-local stream, so it is created for
    this thread on first use; the engine makes its own stream in its own thread, and
    the two never share one.
    """
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    thread = threading.Thread(target=run, name="mlx-reference")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


@pytest.fixture(scope="session")
def reference(model_path: str) -> dict[str, Any]:
    """Raw mlx_lm greedy output for every prompt, computed once, before any engine."""

    def run() -> dict[str, Any]:
        model, tokenizer = mlx_lm.load(model_path)
        prompts = {p: tokenizer.encode(p) for p in PROMPTS}
        greedy = {
            p: [
                r.token
                for r in mlx_lm.stream_generate(
                    model, tokenizer, ids, max_tokens=MAX_TOKENS, sampler=make_sampler(0.0)
                )
            ]
            for p, ids in prompts.items()
        }
        return {"prompt": prompts, "greedy": greedy, "tokenizer": tokenizer}

    return _in_helper_thread(run)


class Recorder:
    """Every step an engine posts, per-sequence views of them, and a way to wait."""

    def __init__(self) -> None:
        self.steps: list[EngineStep] = []
        self.tokens: dict[int, list[int]] = defaultdict(list)
        self.texts: dict[int, list[str]] = defaultdict(list)
        self.logprobs: dict[int, list[float | None]] = defaultdict(list)
        self.finish: dict[int, str] = {}
        self.token_steps: dict[int, list[int]] = defaultdict(list)
        self.prefilled_at: dict[int, int] = {}
        self.failures: list[BaseException] = []
        self.hooks: list[Callable[[EngineStep], None]] = []
        self._changed = trio.Event()

    def on_step(self, step: EngineStep) -> None:
        assert not self.steps or step.step == self.steps[-1].step + 1
        self.steps.append(step)
        for seq_id in step.prefilled:
            self.prefilled_at[seq_id] = step.step
        for out in step.outputs:
            assert out.seq_id not in self.finish, "a token after the finish"
            self.tokens[out.seq_id].append(out.token)
            self.texts[out.seq_id].append(out.text)
            self.logprobs[out.seq_id].append(out.logprob)
            self.token_steps[out.seq_id].append(step.step)
            if out.finish_reason is not None:
                self.finish[out.seq_id] = out.finish_reason
        for hook in list(self.hooks):
            hook(step)
        self._wake()

    def on_failure(self, exc: BaseException) -> None:
        self.failures.append(exc)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def text(self, seq_id: int) -> str:
        return "".join(self.texts[seq_id])

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(GUARD_S):
            while not condition():
                await self._changed.wait()

    async def wait_finished(self, *seq_ids: int) -> None:
        await self.wait_for(lambda: all(i in self.finish for i in seq_ids))


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("corral-engine")]


@asynccontextmanager
async def open_engine(path: str, recorder: Recorder, **settings: Any) -> AsyncIterator[Engine]:
    """A started Engine of the model at `path` with these `EngineSettings`; closed after."""
    engine = Engine(EngineSettings(path, **settings), on_step=recorder.on_step,
                    on_failure=recorder.on_failure)
    with trio.fail_after(GUARD_S):
        await engine.start()
    try:
        yield engine
    finally:
        with trio.fail_after(GUARD_S):
            await engine.close()


def seq(seq_id: int, prompt: list[int], max_tokens: int = MAX_TOKENS,
        sampling: SamplingParams = GREEDY, generated: list[int] | None = None,
        grammar: str | None = None) -> EngineSequence:
    """A sequence that generates `max_tokens` more tokens after `generated`."""
    generated = generated or []
    sampling = msgspec.structs.replace(sampling, max_tokens=max_tokens + len(generated))
    return EngineSequence(seq_id, prompt, sampling, grammar, generated)


async def test_model_info_and_tokenizer(model_path: str, reference: dict[str, Any]) -> None:
    tokenizer = reference["tokenizer"]
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        assert engine.statistics().loaded
        ids = await engine.tokenize("The quick brown fox")
        assert ids == tokenizer.encode("The quick brown fox")
        assert ids[0] == tokenizer.bos_token_id
        assert await engine.tokenize("fox", add_special_tokens=False) == tokenizer.encode(
            "fox", add_special_tokens=False)
        assert await engine.detokenize(ids[1:]) == "The quick brown fox"
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hello"}]
        chat = await engine.apply_chat_template(messages)
        assert chat == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert len(await engine.apply_chat_template(messages, False)) < len(chat)
        with pytest.raises(EngineClientError) as bad_role:
            await engine.apply_chat_template([{"role": "robot", "content": "x"}])
        assert bad_role.value.code is Code.TOKENIZER_ERROR
        with pytest.raises(EngineClientError) as bad_ids:
            await engine.detokenize([10**6])
        assert bad_ids.value.code is Code.TOKENIZER_ERROR
    info = await _start_info(model_path)
    assert info.path == model_path
    assert info.vocab_size == len(tokenizer)
    assert info.eos_token_ids == sorted(tokenizer.eos_token_ids)
    assert info.max_context == 2048
    assert info.has_chat_template
    assert info.tool_calling is not None and info.tool_calling.parser == "json_tools"
    assert info.tool_calling.marker_tokens
    assert info.load_seconds > 0


async def _start_info(model_path: str) -> Any:
    engine = Engine(EngineSettings(model_path), on_step=lambda s: None,
                    on_failure=lambda e: None)
    try:
        return await engine.start()
    finally:
        await engine.close()


async def test_greedy_equals_raw_mlx_lm(model_path: str, reference: dict[str, Any]) -> None:
    prompt = PROMPTS[0]
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        engine.submit(seq(1, reference["prompt"][prompt]))
        await recorder.wait_finished(1)
    expected = reference["greedy"][prompt]
    assert recorder.tokens[1] == expected
    assert recorder.text(1) == reference["tokenizer"].decode(expected).lstrip(" ")
    assert recorder.finish[1] == "length"
    # Prefill in one step, the batch starts in the next, one token per step after it.
    assert recorder.prefilled_at[1] == 2
    assert recorder.token_steps[1] == list(range(3, 3 + MAX_TOKENS))


async def test_sixteen_concurrent_sequences_match_single_greedy(
        model_path: str, reference: dict[str, Any]) -> None:
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        for i, prompt in enumerate(PROMPTS):
            engine.submit(seq(i, reference["prompt"][prompt]))
        await recorder.wait_finished(*range(len(PROMPTS)))
        stats = engine.statistics()
    for i, prompt in enumerate(PROMPTS):
        expected = reference["greedy"][prompt]
        assert len(expected) == MAX_TOKENS, f"{prompt!r} meets EOS early; pick another"
        assert recorder.tokens[i] == expected, prompt
        assert recorder.finish[i] == "length"
    assert max(len(step.outputs) for step in recorder.steps) == len(PROMPTS)
    assert stats.generation_tokens == len(PROMPTS) * MAX_TOKENS
    assert stats.active == stats.queued == 0
    assert stats.steps == recorder.steps[-1].step


SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=60, min_p=0.02, seed=1234)


async def test_seeded_sampling_is_repeatable_alone_and_in_a_batch(
        model_path: str, reference: dict[str, Any]) -> None:
    prompt = reference["prompt"][PROMPTS[2]]
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        engine.submit(seq(1, prompt, sampling=SEEDED))
        await recorder.wait_finished(1)
        engine.submit(seq(2, prompt, sampling=SEEDED))
        await recorder.wait_finished(2)
        # The same request among others: greedy ones, other seeds, unseeded ones.
        others = list(range(10, 10 + 9))
        for n, other in enumerate(others):
            p = reference["prompt"][PROMPTS[n + 3]]
            sampling = [GREEDY, SEEDED, SamplingParams(temperature=1.0)][n % 3]
            if n % 3 == 1:
                sampling = SamplingParams(temperature=1.2, seed=n)
            engine.submit(seq(other, p, sampling=sampling))
        engine.submit(seq(3, prompt, sampling=SEEDED))
        engine.submit(seq(4, prompt, sampling=SamplingParams(temperature=0.9, seed=99)))
        await recorder.wait_finished(3, 4, *others)
    assert recorder.tokens[1] == recorder.tokens[2] == recorder.tokens[3]
    assert len(recorder.tokens[1]) == MAX_TOKENS
    assert recorder.tokens[4] != recorder.tokens[1], "another seed, other tokens"
    assert recorder.tokens[1] != reference["greedy"][PROMPTS[2]], "it does sample"


async def test_late_sequence_joins_the_running_batch(
        model_path: str, reference: dict[str, Any]) -> None:
    recorder = Recorder()
    late = 99
    submitted_at: list[int] = []
    async with open_engine(model_path, recorder) as engine:
        for i in range(15):
            engine.submit(seq(i, reference["prompt"][PROMPTS[i]], max_tokens=3 * MAX_TOKENS))
        await recorder.wait_for(lambda: all(len(recorder.tokens[i]) >= 3 for i in range(15)))
        engine.submit(seq(late, reference["prompt"][PROMPTS[15]]))
        submitted_at.append(engine.statistics().steps)
        await recorder.wait_finished(late)
        for i in range(15):
            engine.cancel(i)
    prefilled = recorder.prefilled_at[late]
    first = recorder.token_steps[late][0]
    # Applied before step submitted_at + 2 at the latest; prompt processed by the next.
    assert prefilled <= submitted_at[0] + 3
    assert prefilled < first <= prefilled + 2
    assert recorder.tokens[late] == reference["greedy"][PROMPTS[15]]
    # Decoding did not stall while the newcomer was prefilled: one token per step each.
    for i in range(15):
        steps = recorder.token_steps[i]
        assert steps == list(range(steps[0], steps[0] + len(steps)))
        assert steps[-1] >= recorder.token_steps[late][-1]


async def test_cancel_stops_tokens_at_the_next_step(
        model_path: str, reference: dict[str, Any]) -> None:
    recorder = Recorder()
    applied_at: list[int] = []
    async with open_engine(model_path, recorder) as engine:

        def cancel_after_three(step: EngineStep) -> None:
            if len(recorder.tokens[1]) >= 3 and not applied_at:
                engine.cancel(1)
                applied_at.append(engine.statistics().steps)

        recorder.hooks.append(cancel_after_three)
        engine.submit(seq(1, reference["prompt"][PROMPTS[0]], max_tokens=50))
        engine.submit(seq(2, reference["prompt"][PROMPTS[1]]))
        await recorder.wait_finished(2)
        engine.submit(seq(3, reference["prompt"][PROMPTS[2]], max_tokens=50))
        await recorder.wait_for(lambda: len(recorder.tokens[3]) >= 1)
        engine.cancel(3)
        cancel_at = engine.statistics().steps
        engine.cancel(12345)  # an id never submitted: nothing happens
        engine.submit(seq(4, reference["prompt"][PROMPTS[3]], max_tokens=4))
        await recorder.wait_finished(4)
        stats = engine.statistics()
    assert applied_at
    assert max(recorder.token_steps[1]) <= applied_at[0] + 1
    assert 1 not in recorder.finish and len(recorder.tokens[1]) < 50
    assert max(recorder.token_steps[3]) <= cancel_at + 1
    assert recorder.tokens[2] == reference["greedy"][PROMPTS[1]]
    assert recorder.tokens[4] == reference["greedy"][PROMPTS[3]][:4]
    assert stats.active == stats.queued == 0


async def test_stop_strings_truncate_text(model_path: str, reference: dict[str, Any]) -> None:
    tokenizer = reference["tokenizer"]
    prompt = PROMPTS[0]
    full = tokenizer.decode(reference["greedy"][prompt]).lstrip(" ")
    # A stop string across a token boundary, one that never appears but whose prefix
    # does (held back, then released), and two where the earlier match wins.
    middle = full[len(full) // 2 - 2: len(full) // 2 + 2]
    assert len(middle) == 4 and full.count(middle) == 1
    never = full[-3:] + "\x00never"
    later, earlier = full[-4:], full[5:8]
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        ids = reference["prompt"][prompt]
        engine.submit(seq(1, ids, sampling=SamplingParams(stop=[middle])))
        engine.submit(seq(2, ids, sampling=SamplingParams(stop=[never])))
        engine.submit(seq(3, ids, sampling=SamplingParams(stop=[later, earlier])))
        engine.submit(seq(4, ids, sampling=SamplingParams(stop=[full[:2]])))
        await recorder.wait_finished(1, 2, 3, 4)
    assert recorder.text(1) == full[: full.index(middle)]
    assert recorder.finish[1] == "stop"
    assert len(recorder.tokens[1]) < MAX_TOKENS
    # The emitted text grows only by pieces that cannot start the stop string.
    emitted = ""
    for piece in recorder.texts[1]:
        emitted += piece
        assert middle not in emitted
    assert recorder.text(2) == full and recorder.finish[2] == "length"
    assert recorder.texts[2][-1].endswith(full[-3:]), "held back until the end"
    assert recorder.text(3) == full[: min(full.index(later), full.index(earlier))]
    assert recorder.finish[3] == "stop"
    assert recorder.text(4) == "" and recorder.finish[4] == "stop"


async def test_stop_token_ids(model_path: str, reference: dict[str, Any]) -> None:
    prompt = PROMPTS[4]
    expected = reference["greedy"][prompt]
    stop_token = expected[5]
    cut = expected.index(stop_token)
    tokenizer = reference["tokenizer"]
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        sampling = SamplingParams(stop_token_ids=[stop_token])
        engine.submit(seq(1, reference["prompt"][prompt], sampling=sampling))
        await recorder.wait_finished(1)
    assert recorder.tokens[1] == expected[: cut + 1]
    assert recorder.finish[1] == "stop"
    assert recorder.text(1) == tokenizer.decode(expected[:cut]).lstrip(" ")


async def test_logprobs(model_path: str, reference: dict[str, Any]) -> None:
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        ids = reference["prompt"][PROMPTS[5]]
        engine.submit(seq(1, ids, sampling=SamplingParams(logprobs=True)))
        engine.submit(seq(2, ids, sampling=SamplingParams(
            logprobs=True, temperature=1.0, seed=5)))
        engine.submit(seq(3, ids))
        await recorder.wait_finished(1, 2, 3)
    for seq_id in (1, 2):
        values = recorder.logprobs[seq_id]
        assert len(values) == MAX_TOKENS
        assert all(v is not None and v <= 0.0 for v in values)
    assert any(v is not None and v < -1e-3 for v in recorder.logprobs[2])
    assert recorder.logprobs[3] == [None] * MAX_TOKENS


@pytest.mark.parametrize(
    "sampling",
    [GREEDY, SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=7),
     SamplingParams(repetition_penalty=1.5)],
    ids=["greedy", "seeded", "repetition-penalty"],
)
async def test_resume_continues_the_uninterrupted_run(
        model_path: str, reference: dict[str, Any], sampling: SamplingParams) -> None:
    n, cuts = 16, (1, 4, 9, 15)
    prompt = reference["prompt"][PROMPTS[6]]
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        engine.submit(seq(0, prompt, max_tokens=n, sampling=sampling))
        await recorder.wait_finished(0)
        full = recorder.tokens[0]
        for k in cuts:
            engine.submit(seq(k, prompt, max_tokens=n - k, sampling=sampling,
                              generated=full[:k]))
        await recorder.wait_finished(*cuts)
    assert len(full) == n
    full_text = recorder.text(0)
    for k in cuts:
        assert full[:k] + recorder.tokens[k] == full, f"resumed after {k} tokens"
        assert "".join(recorder.texts[0][:k]) + recorder.text(k) == full_text, k
        assert recorder.finish[k] == "length"


async def test_injected_fault_calls_on_failure(
        model_path: str, reference: dict[str, Any]) -> None:
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        engine.submit(seq(1, reference["prompt"][PROMPTS[0]], max_tokens=100))
        await recorder.wait_for(lambda: len(recorder.tokens[1]) >= 2)
        engine.inject_fault("raise")
        await recorder.wait_for(lambda: bool(recorder.failures))
        with trio.fail_after(GUARD_S):
            while engine_threads():
                await trio.sleep(0.01)
        assert not engine.statistics().loaded
        with pytest.raises(EngineClientError) as refused:
            engine.submit(seq(2, reference["prompt"][PROMPTS[0]]))
        assert refused.value.code is Code.MODEL_NOT_LOADED
        with pytest.raises(EngineClientError):
            await engine.tokenize("hello")
    [failure] = recorder.failures
    assert isinstance(failure, RuntimeError)
    assert str(failure) == "injected engine fault"
    assert 1 not in recorder.finish


async def test_injected_hang_stops_stepping_until_close(
        model_path: str, reference: dict[str, Any]) -> None:
    recorder = Recorder()
    engine = Engine(EngineSettings(model_path), on_step=recorder.on_step,
                    on_failure=recorder.on_failure)
    await engine.start()
    engine.submit(seq(1, reference["prompt"][PROMPTS[0]], max_tokens=1000))
    await recorder.wait_for(lambda: len(recorder.tokens[1]) >= 2)
    engine.inject_fault("hang")
    await trio.sleep(0.2)  # the engine makes a step in a few ms; let it try
    steps = engine.statistics().steps
    await trio.sleep(0.3)
    assert engine.statistics().steps == steps
    assert engine.statistics().active == 1

    # Tokenizer calls run in a worker thread, not in the hung engine thread.
    assert await engine.tokenize("answered beside the hung thread")
    with trio.fail_after(GUARD_S):
        await engine.close()
    with pytest.raises(EngineClientError) as stopped:
        await engine.tokenize("after the close")
    assert stopped.value.code is Code.MODEL_NOT_LOADED
    assert not engine_threads()
    assert recorder.failures == []


async def test_load_failure(tmp_path: Path) -> None:
    engine = Engine(EngineSettings(str(tmp_path)), on_step=lambda s: None,
                    on_failure=lambda e: None)
    with pytest.raises(EngineClientError) as failed:
        await engine.start()
    assert failed.value.code is Code.MODEL_LOAD_ERROR
    assert str(tmp_path) in failed.value.message
    await engine.close()
    assert not engine_threads()
    with pytest.raises(EngineClientError):
        engine.submit(seq(1, [1, 2]))


async def test_invalid_sequences_are_refused(model_path: str) -> None:
    recorder = Recorder()
    async with open_engine(model_path, recorder) as engine:
        for bad in (seq(1, [5, 6], max_tokens=0), seq(2, []), seq(3, [5, 10**6]),
                    seq(4, [5], sampling=SamplingParams(top_p=0.0)),
                    seq(5, [5], sampling=SamplingParams(temperature=-1.0))):
            with pytest.raises(EngineClientError) as refused:
                engine.submit(bad)
            assert refused.value.code is Code.INVALID_PARAMS
        engine.submit(seq(6, [5], max_tokens=2))
        await recorder.wait_finished(6)
    assert len(recorder.tokens[6]) == 2


async def test_close_is_idempotent_and_leaves_no_thread(
        model_path: str, reference: dict[str, Any]) -> None:
    never_started = Engine(EngineSettings(model_path), on_step=lambda s: None,
                           on_failure=lambda e: None)
    await never_started.close()
    recorder = Recorder()
    engine = Engine(EngineSettings(model_path), on_step=recorder.on_step,
                    on_failure=recorder.on_failure)
    await engine.start()
    assert len(engine_threads()) == 1
    engine.submit(seq(1, reference["prompt"][PROMPTS[0]], max_tokens=1000))
    await recorder.wait_for(lambda: len(recorder.tokens[1]) >= 2)
    await engine.close()
    seen = len(recorder.steps)
    await engine.close()
    assert not engine_threads()
    assert len(recorder.steps) == seen, "no step after close returned"
    assert recorder.failures == []
    assert not engine.statistics().loaded
    with pytest.raises(EngineClientError):
        await engine.detokenize([5])

"""The request pipeline: one typed request in, one stream of tokens out.

Every request goes: validate at the edge (`GenerateParams`, built once by the caller)
→ the model's breaker (or a fallback while it is open) → the prompt's token ids and
limits → admission by the registry → submit with retry → tokens from the registry's
buffer, read through a `TokenStream`. Whatever ends a request (its end, an error, the
client leaving, cancellation), its sequence leaves the batch and its breaker hears the
outcome. This module never builds the tree and never loads a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any, final

import msgspec
import structlog
import trio

from corral.actors.ref import ActorRef
from corral.actors.system import ActorSystem
from corral.config import RuntimeConfig
from corral.protocol.errors import (
    ActorExitedError,
    CircuitBreakerOpenError,
    Code,
    CorralError,
    EngineClientError,
    TimeoutError,
    model_unloaded,
)
from corral.protocol.messages import ChatMessage, GenerateParams
from corral.protocol.serving_messages import (
    Admit,
    ApplyChatTemplate,
    CancelSequence,
    CloseStream,
    Detokenize,
    Submit,
    Tokenize,
)
from corral.resilience.breaker import CircuitBreaker
from corral.resilience.breaker_types import Outcome
from corral.resilience.classify import code_of
from corral.resilience.retries import RetryPolicy
from corral.resilience.retries import call as retry_call
from corral.resilience.rolling import RollingErrorMetrics
from corral.runtime.breaker_actor import Record, acquire_through
from corral.runtime.fallbacks import FallbackAnswer, ResponseFallbacks
from corral.runtime.guidance import guided_grammar
from corral.runtime.keep_alive import KeepAlive
from corral.runtime.limits import check_prompt_length, max_tokens_for
from corral.runtime.model_record import ModelRecord, held_open
from corral.runtime.models import Models
from corral.runtime.reasoning import ReasoningReader, starts_inside
from corral.runtime.request_checks import check_prompt_shape, check_text, check_token_ids
from corral.runtime.retry_actor import ActorBudget
from corral.runtime.stream_buffers import StreamBuffer, StreamTable
from corral.runtime.token_stream import TokenStream
from corral.runtime.tools import ToolCallReader, template_turns, tools_for
from corral.runtime.tree import REGISTRY

__all__ = ["Requests", "TokenStream", "shutting_down_error"]

_log = structlog.get_logger("corral.runtime")


@final
class Requests:
    """Runs requests against the runtime's models.

    Args:
        config: the runtime's configuration.
        system: the actor system (refs to the registry and the models).
        models: the loaded models.
        table: the open streams, shared with the registry.
        keep_alive: holds each request's model loaded, loading it on demand.
    """

    def __init__(self, config: RuntimeConfig, system: ActorSystem, models: Models,
                 table: StreamTable, keep_alive: KeepAlive) -> None:
        self._config = config
        self._models = models
        self._keep_alive = keep_alive
        self._table = table
        self._registry = system.ref(REGISTRY)
        self._policy = RetryPolicy.from_config(config.calls.retry)
        self._fallbacks = ResponseFallbacks()
        self.rolling = RollingErrorMetrics()
        """Error and success rates, latencies, retries and fallbacks of recent requests."""
        self.draining = False

    async def tokenize(self, model: str | None, text: str, *,
                       add_special_tokens: bool = True) -> list[int]:
        entry = self._models.require(model)
        check_text("text", text)
        reply = await self.ask_model(entry.alias, Tokenize(text, add_special_tokens))
        return list(reply.ids)

    async def tokenize_chat(self, model: str | None, messages: list[ChatMessage]) -> list[int]:
        entry = self._models.require(model)
        if not messages:
            raise EngineClientError(Code.INVALID_PARAMS, "messages: expected at least one",
                                    {"field": "messages"})
        for index, message in enumerate(messages):
            check_text(f"messages[{index}].content", message.content)
        reply = await self.ask_model(entry.alias, ApplyChatTemplate(template_turns(messages)))
        return list(reply.ids)

    async def detokenize(self, model: str | None, ids: list[int]) -> str:
        entry = self._models.require(model)
        reply = await self.ask_model(entry.alias, Detokenize(list(ids)))
        return str(reply.text)

    async def prompt_tokens(self, request: GenerateParams) -> int:
        """The length in tokens of `request`'s prompt, rendered as its generation would
        render it (chat template and tools included); nothing is admitted or generated."""
        entry = self._models.require(request.model)
        check_prompt_shape(request)
        tools = tools_for(request, entry.alias, entry.info)
        timeout_s = (request.timeout_ms
                     or self._config.stream_registry.default_timeout_ms) / 1000.0
        return len(await self._prompt_ids(entry.alias, request, tools,
                                          trio.current_time() + timeout_s))

    @asynccontextmanager
    async def open_stream(self, request: GenerateParams) -> AsyncIterator[TokenStream]:
        """See `Runtime.generate`, which this runs once the request is typed.

        A request that no model of its chain can start (before the first token) is
        answered by the model's cached or default fallback step, if it has one.
        """
        if self.draining:
            raise shutting_down_error("new requests are refused")
        if request.n != 1:
            raise EngineClientError(Code.INVALID_PARAMS,
                                    "n: a TokenStream reads one choice; read n > 1 through "
                                    "Runtime.choices or generate_choices", {"field": "n"})
        alias = request.model if request.model is not None else self._models.require(None).alias
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._keep_alive.hold(alias, request.keep_alive))
            entry = self._models.require(alias, allow_failed=True)
            try:
                stream = await stack.enter_async_context(self._model_stream(request, entry))
            except Exception as exc:
                answer = self._fallbacks.answer(entry.config, request, exc)
                if answer is None:
                    raise
                _log.warning("runtime.fallback_served", model=entry.alias, kind=answer.kind,
                             error=repr(exc))
                self.rolling.record_fallback(entry.alias, answer.kind)
                stream = self._answered(request, answer)
            yield stream

    def _answered(self, request: GenerateParams, answer: FallbackAnswer) -> TokenStream:
        now = trio.current_time()
        buffer = StreamBuffer(self._table.new_id(), answer.model,
                              request_id=request.request_id, timeout_s=0.0, deadline=now,
                              prompt_tokens=answer.prompt_tokens, logprobs=False)
        buffer.tokens.extend(answer.token_ids)
        buffer.token_times.extend(now for _ in answer.token_ids)
        buffer.text_parts.append(answer.text)
        buffer.finish(answer.finish_reason)
        return TokenStream(buffer, answer.model, answer.kind)

    @asynccontextmanager
    async def _model_stream(self, request: GenerateParams, entry: ModelRecord
                            ) -> AsyncIterator[TokenStream]:
        timeout_s = (request.timeout_ms
                     or self._config.stream_registry.default_timeout_ms) / 1000.0
        started = trio.current_time()
        deadline = started + timeout_s
        check_prompt_shape(request)
        try:
            with _within(deadline, timeout_s, request, started):
                alias, permit = await self._acquire(entry, deadline)
        except CorralError as exc:
            self._note(entry, request, entry.alias, None, exc, started)
            raise
        outcome = Outcome.IGNORED
        buffer: StreamBuffer | None = None
        error: BaseException | None = None
        submitted = False
        stream_id = self._table.new_id()
        try:
            # The permit was granted under a shield; a cancel that came meanwhile lands
            # here, where the finally gives the permit back.
            await trio.lowlevel.checkpoint_if_cancelled()
            serving = self._models.by_alias.get(alias, entry)
            tools = tools_for(request, alias, serving.info)
            with _as_request_timeout(request, timeout_s, started):
                prompt_ids = await self._prompt_ids(alias, request, tools, deadline)
            check_token_ids("generated", request.generated, serving.info)
            remaining = max_tokens_for(self._config.generation, request.max_tokens,
                                       len(prompt_ids), serving.info, len(request.generated))
            sampling = msgspec.structs.replace(
                request.sampling_params(), max_tokens=len(request.generated) + remaining)
            grammar = await guided_grammar(request, alias, serving.info, tools, remaining)
            try:
                with _as_request_timeout(request, timeout_s, started):
                    await self._registry.ask(
                        Admit(stream_id=stream_id, model=alias, timeout_s=timeout_s,
                              prompt=prompt_ids, sampling=sampling, grammar=grammar,
                              request_id=request.request_id,
                              client=request.client, generated=list(request.generated),
                              priority=request.priority),
                        timeout=max(deadline - trio.current_time(), 0.0),
                        request_id=request.request_id)
                    buffer = self._table.get(stream_id)  # the registry opened it on admission
                    assert buffer is not None and buffer.sequence is not None
                    if trio.current_time() >= deadline:  # the model was never asked
                        raise TimeoutError("generate", timeout_s, request.request_id,
                                           trio.current_time() - started)
                    submitted = True
                    await retry_call(self._policy, self.ask_model, alias,
                                     Submit(buffer.sequence),
                                     budget=ActorBudget(self._models.ref(alias, "retry")),
                                     deadline=deadline,
                                     on_retry=lambda *_: self.rolling.record_retry(alias))
                calling = serving.info.tool_calling if serving.info else None
                reader = (ToolCallReader(calling.parser, tools,
                                         first_only=not request.parallel_tool_calls)
                          if tools and calling else None)
                thinking = serving.info.thinking if serving.info else None
                reasoning = (ReasoningReader(thinking, inside=starts_inside(thinking,
                                                                            prompt_ids))
                             if thinking and request.messages is not None
                             and request.separate_reasoning else None)
                yield TokenStream(buffer, alias, alias if alias != entry.alias else None,
                                  reader, reasoning)
                outcome = _outcome(request, buffer.error, buffer.finish_reason)
            finally:
                # Whatever happened, from admission on: the stream is closed and its
                # sequence leaves the batch (the model first: before its next step).
                opened = self._table.get(stream_id)
                if opened is None or not opened.ended:
                    if opened is not None:
                        opened.finish("cancelled")
                    tell_quietly(self._models.ref(alias), CancelSequence(stream_id))
                    tell_quietly(self._registry, CloseStream(stream_id, "cancelled"))
                self._table.remove(stream_id)
        except BaseException as exc:
            # Before the submit (validation, tokenizing, admission) nothing said anything
            # about the model's health: ignored. From the submit on, the breaker's rule.
            outcome = _outcome(request, exc) if submitted else Outcome.IGNORED
            error = exc
            raise
        finally:
            self._note(entry, request, alias, buffer, error, started)
            # The breaker's slow-call measure is the time to first token, as the design
            # says; a request that produced none is measured to its end.
            first = buffer.token_times[0] if buffer is not None and buffer.token_times else None
            duration = (first if first is not None else trio.current_time()) - started
            tell_quietly(self._models.ref(alias, "breaker"), Record(permit, outcome, duration))

    def _note(self, entry: ModelRecord, request: GenerateParams, alias: str,
              buffer: StreamBuffer | None, error: BaseException | None,
              started: float) -> None:
        """Count the request in the rolling metrics; keep a success for the cache."""
        failure = error if error is not None else (buffer.error if buffer else None)
        if alias != entry.alias:
            self.rolling.record_fallback(entry.alias, alias)
        if failure is not None:
            code = code_of(failure)
            if code is not Code.CANCELLED:
                self.rolling.record_error(alias, code.value)
        elif buffer is not None and buffer.finish_reason in ("stop", "length"):
            self.rolling.record_success(alias, trio.current_time() - started)
            self._fallbacks.remember(entry.config, request, FallbackAnswer(
                "model", alias, buffer.text, list(buffer.tokens), buffer.finish_reason,
                buffer.prompt_tokens))

    async def ask_model(self, alias: str, message: Any, *, timeout: float | None = None) -> Any:
        """Ask the model actor (each ask within `timeout`, by default the config's);
        if its incarnation dies first, ask the next one.

        A model actor's crash fails the asks waiting on it with ActorExitedError at
        once, before they ran to completion, so sending the message again is safe: the
        restarting actor's mailbox stashes it until the next incarnation runs. Bounded
        by the model's restart budget; a model that failed for good answers at once,
        one unloaded meanwhile with ModelNotLoaded, one whose load has not started its
        actor yet with CircuitOpen (`held_open`).
        """
        ref = self._models.ref(alias)
        attempts = self._config.restarts.max_restarts + 1
        for attempt in range(1, attempts + 1):
            try:
                return await ref.ask(message, timeout=timeout)
            except ActorExitedError:
                if attempt == attempts:
                    raise
                if self._models.require(alias).in_trial:  # its subtree is not up yet
                    raise held_open(self._models.require(alias)) from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _acquire(self, entry: ModelRecord, deadline: float) -> tuple[str, Any]:
        """A breaker permit from the model, or from its first fallback that gives one,
        asked for until the request's deadline (the ask is shielded: see
        `acquire_through`). A breaker stopped by its model's unload answers
        ModelNotLoaded; one whose model's load has not started it yet, CircuitOpen
        with the load's time as retry-after (`held_open`)."""
        first_error: CircuitBreakerOpenError | None = None
        for alias in (entry.alias, *entry.config.fallback_aliases):
            candidate = self._models.by_alias.get(alias)
            if candidate is None or candidate.state == "failed":
                continue
            try:
                return alias, await acquire_through(
                    self._models.ref(alias, "breaker"),
                    timeout=max(deadline - trio.current_time(), 0.0))
            except CircuitBreakerOpenError as exc:
                first_error = first_error or exc
            except ActorExitedError:
                if self._models.by_alias.get(alias) is not candidate:
                    if alias == entry.alias:
                        raise model_unloaded(alias) from None
                    continue  # a fallback that was unloaded: try the next one
                if candidate.in_trial:  # its (re)load has not started the subtree yet
                    raise held_open(candidate) from None
                raise  # its model is still loaded: the breaker crashed
        if first_error is not None:
            raise first_error
        self._models.require(entry.alias)  # raises: held open, the model failed
        raise AssertionError("unreachable: a live model either grants or refuses a permit")

    async def _prompt_ids(self, alias: str, request: GenerateParams,
                          tools: list[dict[str, Any]] | None, deadline: float) -> list[int]:
        """The prompt's token ids, rendered and encoded by the model's tokenizer before
        the request's deadline, and checked against the model's context at once."""
        timeout = max(deadline - trio.current_time(), 0.0)
        if request.messages is not None:
            reply = await self.ask_model(
                alias, ApplyChatTemplate(template_turns(request.messages), tools,
                                         dict(request.chat_template_kwargs or {})),
                timeout=timeout)
            ids = list(reply.ids)
        elif isinstance(request.prompt, str):
            ids = list((await self.ask_model(alias, Tokenize(request.prompt),
                                             timeout=timeout)).ids)
        else:
            assert request.prompt is not None
            ids = list(request.prompt)
            check_token_ids("prompt", ids, self._models.require(alias).info)
        if not ids:
            raise EngineClientError(Code.INVALID_PARAMS, "prompt: expected at least one token",
                                    {"field": "prompt"})
        check_prompt_length(self._config.generation, len(ids),
                            self._models.require(alias).info)
        return ids

    async def drain(self, timeout: float) -> int:
        """Stop admitting, let open streams finish for up to `timeout` seconds, then end
        the rest with a typed, retryable ServerError (`details.shutting_down`).

        Returns:
            How many streams were cut off at the timeout.
        """
        self.draining = True
        with trio.move_on_after(timeout):
            while self._table.open_buffers():
                await trio.sleep(0.01)
        remaining = self._table.open_buffers()
        error = shutting_down_error("the drain timeout passed")
        for buffer in remaining:
            buffer.finish("cancelled", error)
            tell_quietly(self._models.ref(buffer.model), CancelSequence(buffer.stream_id))
            tell_quietly(self._registry, CloseStream(buffer.stream_id, "cancelled"))
        return len(remaining)


@contextmanager
def _as_request_timeout(request: GenerateParams, timeout_s: float,
                        started: float) -> Iterator[None]:
    """A deadline that passes while the pipeline waits (for the tokenizer, admission or
    the submit) is the request's own Timeout: named `generate`, with the timeout the
    request had (as asked, or the default) and the time since it began, never the
    internal call that happened to be waiting or what was left of the deadline."""
    try:
        yield
    except TimeoutError:
        raise TimeoutError("generate", timeout_s, request.request_id,
                           trio.current_time() - started) from None


def tell_quietly(ref: ActorRef, message: Any) -> None:
    """Tell, from cleanup code that must not raise: a stopped or overfull target has
    nothing left to do with the message."""
    try:
        ref.tell_nowait(message)
    except CorralError as exc:
        _log.info("runtime.tell_undelivered", actor=ref.path, error=repr(exc))


def shutting_down_error(why: str) -> EngineClientError:
    """What a request gets while `corral serve` shuts down: retry elsewhere or later."""
    return EngineClientError(Code.SERVER_ERROR, f"the server is shutting down: {why}",
                             {"shutting_down": True}, retryable=True)


def _outcome(request: GenerateParams, error: BaseException | None,
             finish_reason: str | None = None) -> Outcome:
    """What a request that was submitted to the model tells its breaker.

    Only the model's failures count. On top of the breaker's rule (client errors and
    cancellation are ignored), a Timeout is ignored when the client chose the deadline
    (`timeout_ms`): a client that gives a model 30 ms says nothing about its health.
    A Timeout under the server's default deadline still counts.
    """
    if error is None:
        return Outcome.SUCCESS if finish_reason in ("stop", "length") else Outcome.IGNORED
    if request.timeout_ms is not None and code_of(error) is Code.TIMEOUT:
        return Outcome.IGNORED
    return CircuitBreaker.outcome_of(error)


@contextmanager
def _within(deadline: float, timeout_s: float, request: GenerateParams,
            started: float) -> Iterator[None]:
    """Bound a wait before the submit (a breaker permit, the prompt's tokens) by the
    request's deadline: a model that restarts never holds a request past it.

    Raises:
        TimeoutError: the deadline passed first (what was waited on is cancelled).
    """
    with trio.move_on_at(deadline) as scope:
        yield
    if scope.cancelled_caught:
        raise TimeoutError("generate", timeout_s, request.request_id,
                           trio.current_time() - started)

"""The `n` choices of one request: `n` sequences in the batch, read as one stream.

Choice i is an ordinary stream of the request with `n` 1 and, when the request has a
seed, a seed derived from (seed, i), choice 0 keeping the request's own (so the first
of `n` choices is what `n` 1 gives): the choices differ, and a seeded request is
reproducible. Without a seed each choice draws its own. The choices open one after
another, so choice 0's prompt reaches the engine first; the others wait for its
prefill and start from its KV (`corral.engine.core`), so the prompt is prefilled once.
Each choice takes a stream slot of the registry. A batch of requests (a completion's
prompts) runs as the `n` choices of each in turn, numbered on: choice k*n + i is
choice i of prompt k, as OpenAI numbers them.

Leaving the block, cancelling it, or one choice failing ends every choice: their
sequences leave the batch at the next engine step, and the failure (typed, as a
`TokenStream` raises it) is what the reader gets. This module never reaches into
actors or the engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import final

import msgspec
import trio

from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import Choice, Completion, GenerateParams, TokenLogprob, Usage
from corral.runtime.requests import Requests, TokenStream
from corral.runtime.stream_buffers import StreamChunk

__all__ = ["ChoiceStreams", "choice_request", "open_choices"]

_Item = StreamChunk | Exception


def choice_request(request: GenerateParams, index: int) -> GenerateParams:
    """The one-sequence request of choice `index` of `request`."""
    seed = request.seed
    if seed is not None and index > 0:
        digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
        seed = int.from_bytes(digest) >> 1  # a Seed is at most 2**63 - 1
    return msgspec.structs.replace(request, n=1, seed=seed)


def _end_of(stream: TokenStream, choice: int) -> StreamChunk:
    """The last chunk of a choice: no tokens, its finish reason."""
    return StreamChunk("", [], None, len(stream.token_ids), choice=choice,
                       finish_reason=stream.finish_reason)


@final
class ChoiceStreams:
    """The choices of one request as the client reads them: `async for chunk in
    choices` gives every choice's chunks (`chunk.choice`) as they come, the last of each
    choice with its `finish_reason`.

    A choice that fails raises its error from the loop. `streams` are the choices'
    own streams (text, finish reason and usage of each); of a batch, `per_prompt`
    (`n`) of them run each prompt, in order.
    """

    def __init__(self, request: GenerateParams, streams: list[TokenStream],
                 receive: trio.MemoryReceiveChannel[_Item] | None, *,
                 per_prompt: int | None = None) -> None:
        self.request = request
        self.streams = streams
        self._receive = receive
        self._open = len(streams)
        self._per_prompt = per_prompt or len(streams)

    @property
    def model(self) -> str:
        return self.streams[0].model

    @property
    def fallback(self) -> str | None:
        """What served the request in place of the model asked for (see
        `TokenStream.fallback`): the first choice's."""
        return self.streams[0].fallback

    @property
    def stream_id(self) -> int:
        """The first choice's stream id, which names the request."""
        return self.streams[0].stream_id

    @property
    def usage(self) -> Usage:
        """Each prompt once (as its first choice, which prefilled it, saw it) and the
        tokens of every choice, as OpenAI counts them."""
        firsts = [s.usage for s in self.streams[::self._per_prompt]]
        return Usage(sum(u.prompt_tokens for u in firsts),
                     sum(s.usage.completion_tokens for s in self.streams),
                     sum(u.cached_tokens for u in firsts))

    def __aiter__(self) -> ChoiceStreams:
        return self

    async def __anext__(self) -> StreamChunk:
        if not self._open:
            raise StopAsyncIteration
        if self._receive is None:  # one choice: read straight from its stream
            stream = self.streams[0]
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                self._open = 0
                return _end_of(stream, 0)
        item = await self._receive.receive()
        if isinstance(item, Exception):
            self._open = 0
            raise item
        if item.finish_reason is not None:
            self._open -= 1
        return item

    async def completion(self) -> Completion:
        """Read every choice to its end: the whole result.

        Raises:
            CorralError: what the first choice to fail raised.
        """
        want_top = self.request.top_logprobs > 0
        want_logprobs = self.request.logprobs or want_top
        logprobs: list[list[float]] = [[] for _ in self.streams]
        tokens: list[list[str]] = [[] for _ in self.streams]
        top: list[list[list[TokenLogprob]]] = [[] for _ in self.streams]
        async for chunk in self:
            logprobs[chunk.choice].extend(chunk.logprobs or ())
            tokens[chunk.choice].extend(chunk.tokens or ())
            top[chunk.choice].extend(chunk.top_logprobs or ())
        choices = []
        for index, stream in enumerate(self.streams):
            assert stream.finish_reason is not None
            choices.append(Choice(
                index, stream.text, stream.token_ids, stream.finish_reason,
                logprobs[index] if want_logprobs else None,
                tokens[index] if want_logprobs else None,
                top[index] if want_top else None, stream.tool_calls, stream.reasoning))
        first = choices[0]
        return Completion(self.stream_id, self.model, first.text, first.token_ids,
                          first.finish_reason, self.usage, first.logprobs, first.tokens,
                          first.top_logprobs, choices, first.tool_calls, self.fallback,
                          first.reasoning)


async def _read(choice: int, stream: TokenStream,
                send: trio.MemorySendChannel[_Item]) -> None:
    """Hand one choice's chunks on, then its end or its error."""
    try:
        async for chunk in stream:
            await send.send(msgspec.structs.replace(chunk, choice=choice))
    except Exception as exc:  # the reader raises it
        await send.send(exc)
        return
    await send.send(_end_of(stream, choice))


@asynccontextmanager
async def open_choices(requests: Requests, request: GenerateParams | Sequence[GenerateParams]
                       ) -> AsyncIterator[ChoiceStreams]:
    """Open the `n` choices of `request`, or of each request of a batch (which differ
    in their prompt only); see `ChoiceStreams` and the module.

    Raises:
        CorralError: what opening a choice raised (the ones opened are closed first).
        EngineClientError: InvalidParams for `generated` with `n` > 1 or a batch.
    """
    batch = [request] if isinstance(request, GenerateParams) else list(request)
    first = batch[0]
    if (first.n > 1 or len(batch) > 1) and first.generated:
        raise EngineClientError(Code.INVALID_PARAMS, "generated: continues one choice, "
                                "not n of them", {"field": "generated"})
    async with AsyncExitStack() as opened:
        streams = [await opened.enter_async_context(
            requests.open_stream(choice_request(prompt, index)))
            for prompt in batch for index in range(prompt.n)]
        if len(streams) == 1:
            yield ChoiceStreams(first, streams, None)
            return
        send, receive = trio.open_memory_channel[_Item](0)
        async with trio.open_nursery() as nursery:
            for index, stream in enumerate(streams):
                nursery.start_soon(_read, index, stream, send)
            try:
                yield ChoiceStreams(first, streams, receive, per_prompt=first.n)
            finally:
                nursery.cancel_scope.cancel()

"""The client end of a stream: the buffer an engine's output waits in for its reader,
and the table of open streams.

A buffer never blocks its writer: output waiting for a slow reader coalesces into one
chunk. The `StreamTable` is owned by the runtime, not by the registry actor, so a
restarted registry picks the open streams back up from it, as an Erlang table outlives
its owner through an heir. This module decides nothing about admission or deadlines.
"""

from __future__ import annotations

import itertools
import math
from typing import final

import msgspec
import trio

from corral.protocol.errors import CorralError
from corral.protocol.messages import EngineSequence, FinishReason, TokenLogprob, TokenOut, ToolCall


class StreamChunk(msgspec.Struct, frozen=True):
    """What a reader gets: all output since its last read, coalesced.

    `index` is the position of the first token in the completion. With logprobs asked
    for, `logprobs` and `tokens` (each token decoded alone) hold one entry a token, and
    `top_logprobs` too when alternatives were asked for. Read through
    `corral.runtime.ChoiceStreams`, `choice` is the choice it belongs to, and the last
    chunk of each choice has no tokens and its `finish_reason`. With tools, `text`
    is the content around the calls, and `tool_calls` the calls this chunk completed
    (see `corral.runtime.tools`). Of a chat with a model that thinks, `reasoning` is
    the text between its think markers, and `text` the rest (`corral.runtime.reasoning`).
    """

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    index: int
    tokens: list[str] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    choice: int = 0
    finish_reason: FinishReason | None = None
    tool_calls: list[ToolCall] = []
    reasoning: str = ""


@final
class StreamBuffer:
    """The client end of one stream. The registry writes; one reader reads.

    Writes never wait: text and token ids pile up between reads and come out as one
    chunk, so memory is bounded by max_tokens and a slow reader never stalls the engine.
    """

    def __init__(self, stream_id: int, model: str, *, request_id: str | None,
                 timeout_s: float, deadline: float, prompt_tokens: int,
                 logprobs: bool, alternatives: bool = False, client: str | None = None) -> None:
        self.stream_id = stream_id
        self.model = model
        self.request_id = request_id
        self.client = client
        self.timeout_s = timeout_s
        self.deadline = deadline
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0  # of prompt_tokens, taken from the prefix cache
        self.started_at = trio.current_time()
        self.last_read_at = self.started_at
        self.reader_waiting = False
        self.tokens: list[int] = []
        self.token_times: list[float] = []  # trio time each token arrived (TTFT, ITL)
        self.text_parts: list[str] = []
        self.finish_reason: FinishReason | None = None
        self.error: CorralError | None = None
        self.sequence: EngineSequence | None = None  # as first submitted, for resume
        self.resumes = 0
        self.stalls = 0  # resumes after the progress watchdog found its engine stalled
        self.wants_logprobs = logprobs
        self._want_top = logprobs and alternatives
        self._logprobs: list[float] = []
        self._pieces: list[str] = []
        self._top: list[list[TokenLogprob]] = []
        self._read_tokens = 0
        self._read_text = 0
        self._wakeup = trio.Event()

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def has_unread(self) -> bool:
        return self._read_tokens < len(self.tokens) or self._read_text < len(self.text_parts)

    def push(self, out: TokenOut) -> None:
        if self.ended:
            return
        if not self.tokens:
            # A resumed sequence reports its re-prefill's hit too; the client's usage
            # is about its own prompt, as the first run saw it.
            self.cached_tokens = out.cached_tokens
        self.tokens.append(out.token)
        self.token_times.append(trio.current_time())
        if out.text:
            self.text_parts.append(out.text)
        if self.wants_logprobs:
            self._logprobs.append(out.logprob if out.logprob is not None else math.nan)
            self._pieces.append(out.piece or "")
            if self._want_top:
                self._top.append(out.top_logprobs or [])
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
        self._wakeup.set()

    def finish(self, reason: FinishReason, error: CorralError | None = None) -> None:
        """End the stream; the reader gets what is unread, then the end (or `error`)."""
        if self.ended:
            return
        self.finish_reason = reason
        self.error = error
        self._wakeup.set()

    def take(self) -> StreamChunk | None:
        """Everything unread as one chunk, or None when nothing is."""
        if not self.has_unread:
            return None
        start = self._read_tokens
        chunk = StreamChunk(
            text="".join(self.text_parts[self._read_text:]),
            token_ids=self.tokens[start:],
            logprobs=self._logprobs[start:] if self.wants_logprobs else None,
            index=start,
            tokens=self._pieces[start:] if self.wants_logprobs else None,
            top_logprobs=self._top[start:] if self._want_top else None)
        self._read_tokens = len(self.tokens)
        self._read_text = len(self.text_parts)
        return chunk

    async def next_chunk(self) -> StreamChunk | None:
        """Wait for output. Returns None at the end of the stream.

        Raises:
            CorralError: the stream ended with this error (after all unread output).

        Cancellation while waiting loses nothing: unread output stays for the next call.
        """
        self.reader_waiting = True
        try:
            while True:
                chunk = self.take()
                if chunk is not None:
                    return chunk
                if self.ended:
                    if self.error is not None:
                        raise self.error
                    return None
                self._wakeup = trio.Event()
                await self._wakeup.wait()
        finally:
            self.reader_waiting = False
            self.last_read_at = trio.current_time()


@final
class StreamTable:
    """Open streams by id, shared by the runtime facade and the registry actor.

    Ids come from one counter for the life of the runtime, so they stay unique across
    registry restarts.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, StreamBuffer] = {}
        self._ids = itertools.count(1)

    def new_id(self) -> int:
        return next(self._ids)

    def add(self, buffer: StreamBuffer) -> None:
        self._buffers[buffer.stream_id] = buffer

    def get(self, stream_id: int) -> StreamBuffer | None:
        return self._buffers.get(stream_id)

    def remove(self, stream_id: int) -> None:
        self._buffers.pop(stream_id, None)

    def buffers(self) -> list[StreamBuffer]:
        """Every buffer held, ended ones not yet removed included."""
        return list(self._buffers.values())

    def open_buffers(self) -> list[StreamBuffer]:
        return [b for b in self._buffers.values() if not b.ended]

    def __len__(self) -> int:
        return len(self._buffers)

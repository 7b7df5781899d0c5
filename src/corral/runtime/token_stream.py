"""`TokenStream`: one generation as its reader sees it, tokens and then how it ended.

The registry writes a stream's buffer; one reader reads it through this. Of a chat
with a model that thinks, the text goes through a `ReasoningReader` first, so the
reader gets the reasoning apart; with tools, the content then goes through a
`ToolCallReader`, so the reader gets the content and the calls apart. Reading never
blocks the engine (the buffer coalesces what a slow reader has not taken), and never
waits past the stream's deadline.
"""

from __future__ import annotations

from typing import final

import msgspec
import trio

from corral.protocol.errors import TimeoutError
from corral.protocol.messages import FinishReason, ToolCall, Usage
from corral.runtime.reasoning import ReasoningReader
from corral.runtime.stream_buffers import StreamBuffer, StreamChunk
from corral.runtime.tools import ToolCallReader

__all__ = ["TokenStream"]

_READER_GRACE_S = 5.0


@final
class TokenStream:
    """One generation as the client reads it: `async for chunk in stream`.

    After the loop, `finish_reason`, `usage` and `text` describe the whole completion.
    A stream that ends with an error raises it from the loop (a CorralError: Timeout,
    GenerationError with `details["partial_text"]`, Cancelled for an idle reader).
    """

    def __init__(self, buffer: StreamBuffer, model: str, fallback: str | None = None,
                 tool_calls: ToolCallReader | None = None,
                 reasoning: ReasoningReader | None = None) -> None:
        self._buffer = buffer
        self._reader = tool_calls
        self._thinking = reasoning
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._ended = False
        self.model = model
        self.fallback = fallback
        """What served the request in place of the model asked for: a fallback model's
        alias, "cached" or "default"; None when that model did."""

    @property
    def stream_id(self) -> int:
        return self._buffer.stream_id

    @property
    def text(self) -> str:
        """The completion's text; with tools or reasoning, its content (the text around
        the calls and the reasoning) as read so far."""
        if self._reader is None and self._thinking is None:
            return self._buffer.text
        return "".join(self._content)

    @property
    def reasoning(self) -> str | None:
        """The reasoning read so far, of a chat with a model that thinks; else None."""
        return "".join(self._reasoning) if self._thinking is not None else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls read so far (with tools; else none)."""
        return list(self._reader.calls) if self._reader is not None else []

    @property
    def token_ids(self) -> list[int]:
        return list(self._buffer.tokens)

    @property
    def finish_reason(self) -> FinishReason | None:
        """How it ended; "tool_calls" for a model that stopped after calling a tool."""
        reason = self._buffer.finish_reason
        return "tool_calls" if reason == "stop" and self.tool_calls else reason

    @property
    def token_times(self) -> list[float]:
        """trio time at which each token reached the stream (for TTFT and ITL)."""
        return list(self._buffer.token_times)

    @property
    def usage(self) -> Usage:
        return Usage(self._buffer.prompt_tokens, len(self._buffer.tokens),
                     self._buffer.cached_tokens)

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> StreamChunk:
        buffer = self._buffer
        # The registry ends a stream at its deadline; this backstop guarantees a reader
        # never waits forever even if the registry lost track of the stream.
        with trio.move_on_at(buffer.deadline + _READER_GRACE_S) as scope:
            chunk = await buffer.next_chunk()
        if scope.cancelled_caught:
            raise TimeoutError("generate", buffer.timeout_s, buffer.request_id,
                               trio.current_time() - buffer.started_at)
        if self._reader is None and self._thinking is None:
            if chunk is None:
                raise StopAsyncIteration
            return chunk
        if chunk is None:
            # The end: what the readers still held back, as one last chunk.
            if self._ended:
                raise StopAsyncIteration
            self._ended = True
            rest, thought, calls = self._read("", end=True)
            if not rest and not thought and not calls:
                raise StopAsyncIteration
            wants = buffer.wants_logprobs
            return StreamChunk(rest, [], [] if wants else None, len(buffer.tokens),
                               tokens=[] if wants else None, tool_calls=calls,
                               reasoning=thought)
        content, thought, calls = self._read(chunk.text)
        return msgspec.structs.replace(chunk, text=content, tool_calls=calls,
                                       reasoning=thought)

    def _read(self, text: str, *, end: bool = False) -> tuple[str, str, list[ToolCall]]:
        """`text` through the readers: the content, the reasoning and the calls it
        completes (and, at the `end`, what they held back)."""
        thought = ""
        if self._thinking is not None:
            text, thought = self._thinking.finish() if end else self._thinking.feed(text)
        calls: list[ToolCall] = []
        if self._reader is not None:
            text, calls = self._reader.feed(text)
            if end:
                rest, more = self._reader.finish()
                text, calls = text + rest, calls + more
        self._content.append(text)
        self._reasoning.append(thought)
        return text, thought, calls

"""The grammar a request's output must follow (its `response_format`, or the tool calls
its `tool_choice` forces), written and compiled off the event loop. Never runs a
request: `requests` asks it once per request, before admission.
"""

from __future__ import annotations

from typing import Any

import trio

from corral.engine.grammar import check_grammar, response_format_grammar
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import GenerateParams, ModelInfo
from corral.runtime.tools import constrained

__all__ = ["guided_grammar"]


async def guided_grammar(request: GenerateParams, alias: str, info: ModelInfo | None,
                         tools: list[dict[str, Any]] | None, max_tokens: int) -> str | None:
    """The grammar the request's `response_format` or `tool_choice` asks for (None for
    free text), written and compiled once (then cached) in a worker thread: a schema
    of a megabyte takes a fraction of a second to write and up to a second to compile,
    which on the event loop would stall every stream. A request with neither stays on
    the loop. On cancellation the caller waits for the thread (a second at most).

    Raises:
        EngineClientError: GuidanceError when the model cannot follow a grammar or
            llguidance cannot compile it; InvalidParams as `constrained` says.
    """
    if request.response_format is None and not tools:
        return None
    return await trio.to_thread.run_sync(_guided, request, alias, info, tools, max_tokens)


def _guided(request: GenerateParams, alias: str, info: ModelInfo | None,
            tools: list[dict[str, Any]] | None, max_tokens: int) -> str | None:
    grammar, field = constrained(response_format_grammar(request.response_format), request,
                                 alias, info, tools, max_tokens)
    if grammar is None:
        return None
    if info is not None and not info.structured_output:
        raise EngineClientError(
            Code.GUIDANCE_ERROR, f"model {alias}: its tokenizer cannot drive structured "
            "output (llguidance needs a fast tokenizer)", {"model": alias})
    check_grammar(grammar, field)
    return grammar

"""The Ollama API's side of the HTTP transport: reply lines (NDJSON, or one whole
object), model listings and error bodies over `protocol/ollama.py`'s Structs.

Pure functions and small objects: this module never does I/O, never knows of ASGI,
and never calls the runtime. Errors keep the status and headers every API gives them
(`errors.py`), so a client error is never a 5xx; only the body differs
(`{"error": "..."}`).
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any, Final, Literal, final

import msgspec

from corral.protocol.errors import CorralError
from corral.protocol.messages import FinishReason, ToolCall, Usage
from corral.protocol.ollama import (
    ChatLine,
    ErrorBody,
    FunctionCallOut,
    GenerateLine,
    ModelDetails,
    ModelEntry,
    ReplyMessage,
    RunningModel,
    ShowResponse,
    ToolCallOut,
)
from corral.runtime import ModelDescription
from corral.runtime.stream_buffers import StreamChunk
from corral.runtime.tools import arguments_object
from corral.server.errors import ErrorShape
from corral.server.openai import finish_reason

__all__ = ["OLLAMA_ERRORS", "ModelFiles", "Reply", "error_body", "model_entry", "rfc3339",
           "running_model", "show_response"]

_NS: Final = 1_000_000_000


def error_body(error: CorralError, request_id: str) -> ErrorBody:
    """Ollama's error body: the message alone (the status tells the kind)."""
    return ErrorBody(error.message)


OLLAMA_ERRORS: Final = ErrorShape(error_body)
"""corral's errors as the Ollama API tells them, also as a stream's last line."""


def rfc3339(unix_time: float) -> str:
    """A wall-clock time as Ollama writes it (UTC)."""
    moment = datetime.datetime.fromtimestamp(unix_time, datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _done_reason(reason: FinishReason | None) -> str:
    """Ollama's `done_reason`: it has no "tool_calls", a reply with calls stops.

    Raises:
        EngineClientError: Cancelled, when the runtime ended the stream early.
    """
    reason = finish_reason(reason)
    return "stop" if reason == "tool_calls" else reason


def _calls(calls: list[ToolCall], first_index: int) -> list[ToolCallOut]:
    return [ToolCallOut(id=call.id, function=FunctionCallOut(
                name=call.function.name, arguments=arguments_object(call),
                index=first_index + offset))
            for offset, call in enumerate(calls)]


@final
class Reply:
    """The lines of one /api/chat or /api/generate reply, timed on trio's clock.

    Args:
        kind: chat lines carry a `message`, generate lines a `response`.
        model: the model named in each line.
        started: when the request arrived.
    """

    def __init__(self, kind: Literal["chat", "generate"], model: str, started: float) -> None:
        self._kind = kind
        self._model = model
        self._started = started
        self._opened = started
        self._first: float | None = None
        self._calls = 0

    def opened(self, now: float) -> None:
        """The request's stream opened: admitted, its model loaded."""
        self._opened = now

    def _line(self, text: str, calls: list[ToolCallOut] | None, **done: Any) -> msgspec.Struct:
        created = rfc3339(datetime.datetime.now(datetime.UTC).timestamp())
        if self._kind == "chat":
            return ChatLine(model=self._model, created_at=created,
                            message=ReplyMessage(role="assistant", content=text,
                                                                 tool_calls=calls), **done)
        return GenerateLine(model=self._model, created_at=created, response=text, **done)

    def line(self, chunk: StreamChunk, now: float) -> msgspec.Struct | None:
        """The line of one chunk, or None for a chunk with nothing to tell."""
        if self._first is None and chunk.token_ids:
            self._first = now
        if not chunk.text and not chunk.tool_calls:
            return None
        calls = _calls(chunk.tool_calls, self._calls) if chunk.tool_calls else None
        self._calls += len(chunk.tool_calls)
        return self._line(chunk.text, calls, done=False)

    def last(self, reason: FinishReason | None, usage: Usage, now: float, text: str = "",
             calls: list[ToolCall] | None = None) -> msgspec.Struct:
        """The last line (or the whole reply, with its `text` and `calls`): done, the
        reason, the counts and durations.

        Raises:
            EngineClientError: Cancelled, when the runtime ended the stream early.
        """
        first = self._first if self._first is not None else now
        return self._line(
            text, _calls(calls, 0) if calls else None, done=True,
            done_reason=_done_reason(reason),
            total_duration=_ns(now - self._started),
            load_duration=_ns(self._opened - self._started),
            prompt_eval_count=usage.prompt_tokens,
            prompt_eval_duration=_ns(first - self._opened),
            eval_count=usage.completion_tokens, eval_duration=_ns(now - first))

    def loaded(self, unloaded: bool, now: float) -> msgspec.Struct:
        """The reply to a request with nothing to generate: the model is loaded (or,
        with keep_alive 0, about to be unloaded)."""
        return self._line("", None, done=True, done_reason="unload" if unloaded else "load",
                          total_duration=_ns(now - self._started),
                          load_duration=_ns(now - self._started))


def _ns(seconds: float) -> int:
    return max(0, round(seconds * _NS))


class ModelFiles(msgspec.Struct, frozen=True):
    """What the files of a model tell (read by the caller, off the event loop): their
    bytes, last change (unix time), and the architecture in its config.json."""

    size: int = 0
    modified: float = 0.0
    family: str = ""


def _digest(alias: str, path: str) -> str:
    return hashlib.sha256(f"{alias}\0{path}".encode()).hexdigest()


def _details(files: ModelFiles) -> ModelDetails:
    return ModelDetails(family=files.family, families=[files.family] if files.family else [])


def model_entry(alias: str, path: str, files: ModelFiles) -> ModelEntry:
    """A model as GET /api/tags lists it."""
    return ModelEntry(name=alias, model=alias, modified_at=rfc3339(files.modified),
                      size=files.size, digest=_digest(alias, path), details=_details(files))


def running_model(model: ModelDescription, files: ModelFiles,
                  expires_at: float | None) -> RunningModel:
    """A loaded model as GET /api/ps lists it; `expires_at` a unix time, or None."""
    return RunningModel(
        name=model.alias, model=model.alias, size=files.size,
        digest=_digest(model.alias, model.path), details=_details(files),
        expires_at=rfc3339(expires_at) if expires_at is not None else None,
        context_length=model.info.max_context if model.info else None)


def show_response(alias: str, model: ModelDescription | None,
                  files: ModelFiles) -> ShowResponse:
    """POST /api/show of a model, loaded (`model`) or loadable on demand (None: what
    only loading it would tell is left out)."""
    info = model.info if model is not None else None
    model_info: dict[str, Any] = {"general.architecture": files.family}
    if info is not None and info.max_context is not None and files.family:
        model_info[f"{files.family}.context_length"] = info.max_context
    capabilities = ["completion"]
    if info is not None and info.tool_calling is not None:
        capabilities.append("tools")
    return ShowResponse(modelfile=f"# corral model {alias}\nFROM {info.path if info else ''}\n",
                        parameters="", template="", details=_details(files),
                        model_info=model_info, capabilities=capabilities,
                        modified_at=rfc3339(files.modified))

"""JSON-RPC 2.0 envelopes: the Structs, and pure functions that parse and encode them.

The server side parses a line into requests (`parse_message`), types their params
(`params_as`) and encodes replies (`encode_result`, `encode_error`, `encode_batch`) and
stream notifications (`encode_notification`); the client side encodes requests and turns
replies back into values and typed errors (`parse_reply`, `error_from_response`);
Bodies are read with `corral.protocol.codec.decode_json` and `convert_params`, as every
transport reads them. The params, results and notifications of
corral's methods are Structs here too (`LoadModelParams`, `RuntimeInfo`,
`StreamEndParams`, ...).
Error numbers come from the error table in `errors.py` alone. Every failure on
untrusted input is a `CorralError`, never a msgspec or codec exception. This module
never does I/O: encoded messages are newline-free JSON bytes and the transport frames
them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Final, Literal, TypeAlias, TypeVar

import msgspec

from corral.protocol.codec import convert_params, decode_json
from corral.protocol.errors import (
    ERROR_TABLE,
    Code,
    CorralError,
    EngineClientError,
    ErrorInfo,
    code_for_jsonrpc,
    error_from_info,
)
from corral.protocol.messages import (
    Alias,
    FinishReason,
    Name,
    StreamId,
    TokenId,
    TokenLogprob,
    ToolCall,
)
from corral.protocol.openai import UsageInfo
from corral.protocol.validation import describe

RequestId: TypeAlias = str | int | None
"""A request id as the spec allows it here: a string, an integer or null."""

_S = TypeVar("_S", bound=msgspec.Struct)


class Method(enum.StrEnum):
    """Methods a corral server answers."""

    RUNTIME_INFO = "runtime/info"
    RUNTIME_STATE = "runtime/state"
    HEALTH = "health"
    LOAD_MODEL = "load_model"
    UNLOAD_MODEL = "unload_model"
    LIST_MODELS = "list_models"
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"
    GENERATE = "generate"
    COMPLETE = "complete"
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"


class Notification(enum.StrEnum):
    """Notifications a corral server sends while a `generate` stream runs."""

    STREAM_CHUNK = "stream.chunk"
    STREAM_END = "stream.end"
    STREAM_ERROR = "stream.error"


class Request(msgspec.Struct, frozen=True, omit_defaults=True):
    """A request, or a notification when `id` is absent (UNSET).

    `"id": null` is a request whose reply carries a null id; only an absent id makes a
    notification, which gets no reply. `"params": null` is taken as no params.
    """

    jsonrpc: Literal["2.0"]
    method: str
    params: dict[str, Any] | list[Any] | None = None
    id: RequestId | msgspec.UnsetType = msgspec.UNSET

    @property
    def is_notification(self) -> bool:
        return self.id is msgspec.UNSET


class Response(msgspec.Struct, frozen=True):
    """A success reply. It has no `error` key."""

    jsonrpc: Literal["2.0"]
    id: RequestId
    result: Any


class ErrorObject(msgspec.Struct, frozen=True, omit_defaults=True):
    """The `error` member of an error reply.

    corral fills `data` with `{"code": <code name>, "retryable": <bool>, **details}`.
    """

    code: int
    message: str
    data: dict[str, Any] | None = None


class ErrorResponse(msgspec.Struct, frozen=True):
    """An error reply. It has no `result` key."""

    jsonrpc: Literal["2.0"]
    id: RequestId
    error: ErrorObject


class InvalidItem(msgspec.Struct, frozen=True):
    """A message, or a batch member, that is valid JSON but not a valid request.

    It is always answered, even without an id: `encode_error(item.id, item.error)`.
    `id` is the member's id when it had a valid one, else None, as the spec asks.
    """

    error: ErrorInfo
    id: RequestId = None


ParsedItem: TypeAlias = Request | InvalidItem


# -- the methods' params, results and notifications -------------------------------------
# Decoding params is the validation: a wrong type or unknown field is InvalidParams
# naming the field. Positional params fill fields in declaration order (`params_as`).


class NoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The params of a method that takes none (absent, null, `{}` or `[]`)."""


class LoadModelParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    path: str
    alias: Alias | None = None
    fallbacks: list[Alias] = []


class UnloadModelParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    alias: Alias


class TokenizeParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: Name | None = None
    text: str
    add_special_tokens: bool = True


class DetokenizeParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: Name | None = None
    token_ids: list[TokenId]


class CancelParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    stream_id: StreamId


class InfoLimits(msgspec.Struct, frozen=True):
    """What one client may ask of the server, as `runtime/info` reports it."""

    max_line_bytes: int
    max_pending_per_connection: int
    max_streams_per_connection: int
    default_timeout_ms: int
    max_active_streams: int
    max_queued_streams: int
    max_tokens_limit: int | None


class InfoGeneration(msgspec.Struct, frozen=True):
    isolation: str
    default_max_tokens: int | None


class RuntimeInfo(msgspec.Struct, frozen=True):
    """The result of `runtime/info`: the server, its transport, methods and limits."""

    name: str
    version: str
    transport: str
    methods: list[str]
    notifications: list[str]
    models: list[str]
    limits: InfoLimits
    generation: InfoGeneration


class StreamChunkParams(msgspec.Struct, frozen=True, omit_defaults=True):
    """`stream.chunk`: text and token ids since the last chunk of one choice; `logprobs`
    and `tokens` (each decoded alone) when asked, `top_logprobs` too when alternatives
    were; `choice` when the request asked for `n` > 1.; with
    tools, `text` is the content and `tool_calls` the calls this chunk completed."""

    stream_id: int
    text: str
    token_ids: list[int]
    index: int
    logprobs: list[float] | None = None
    tokens: list[str] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    choice: int = 0
    tool_calls: list[ToolCall] = []


class StreamEndParams(msgspec.Struct, frozen=True, omit_defaults=True):
    """`stream.end`: the stream finished (or was cancelled) with this usage (the prompt
    once, the tokens of every choice); `finish_reason` is the first choice's, and with
    `n` > 1 `finish_reasons` has every choice's."""

    stream_id: int
    finish_reason: FinishReason | None
    usage: UsageInfo
    finish_reasons: list[FinishReason | None] = []


class StreamErrorParams(msgspec.Struct, frozen=True):
    """`stream.error`: the stream ended with this error; no other notification follows."""

    stream_id: int
    error: ErrorObject
Reply: TypeAlias = Response | ErrorResponse | Request

_VERSION: Final = "2.0"
_request_decoder: Final = msgspec.json.Decoder(Request)
_encoder: Final = msgspec.json.Encoder()


def _valid_id(value: Any) -> RequestId:
    return value if type(value) in (str, int) else None


def _item(value: Any) -> ParsedItem:
    try:
        return msgspec.convert(value, Request)
    except msgspec.ValidationError as exc:
        rid = _valid_id(value.get("id")) if isinstance(value, dict) else None
        error = EngineClientError(Code.INVALID_REQUEST, describe(exc, root=Request))
        return InvalidItem(error.info(), rid)


def parse_message(data: bytes) -> ParsedItem | list[ParsedItem]:
    """Parse one received message: a request, a notification or a batch of them.

    A single object gives one item, a batch (a JSON array) a list of items in order.
    An item that is valid JSON but not a valid request (missing method, wrong version,
    params neither object nor array, id neither string, integer nor null, not an object
    at all) is an `InvalidItem`, so that the caller answers each one, batch member or
    not, with its own id where it had one.

    Args:
        data: one message, without its framing newline; any bytes at all.

    Returns:
        A `Request` or `InvalidItem`, or for a batch a non-empty list of them.

    Raises:
        EngineClientError: code ParseError when `data` is not JSON (including invalid
            UTF-8, numbers out of range and nesting too deep to decode); code
            InvalidRequest for an empty batch. Both are answered with a null id. Nothing
            else is raised, whatever the bytes.
    """
    try:
        return _request_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass  # Not a well-formed single request: decode again to say what it is.
    value = decode_json(data)
    if not isinstance(value, list):
        return _item(value)
    if not value:
        raise EngineClientError(Code.INVALID_REQUEST, "empty batch")
    return [_item(member) for member in value]


def params_as(request: Request, type_: type[_S]) -> _S:
    """The request's params as a `type_` Struct.

    An object fills fields by name; an array fills them by position, in the Struct's
    field order (or the order its `positional_fields` class variable gives first, then
    the rest). Absent params fill nothing, so only the defaults apply.

    Raises:
        EngineClientError: code InvalidParams, with a message naming the field
            (`max_tokens: expected >= 1`) and `details["field"]`, when the params
            do not fit `type_`.
        TypeError: if `type_` is not a msgspec Struct type.
    """
    params: Any = request.params
    if isinstance(params, list):
        declared = [field.encode_name for field in msgspec.structs.fields(type_)]
        first: tuple[str, ...] = getattr(type_, "positional_fields", ())
        names = [*first, *(name for name in declared if name not in first)]
        if len(params) > len(names):
            raise EngineClientError(
                Code.INVALID_PARAMS,
                f"expected at most {len(names)} positional params, got {len(params)}",
            )
        params = dict(zip(names, params, strict=False))  # trailing fields: defaults
    return convert_params({} if params is None else params, type_)


def encode_request(method: str, params: Any = None, *, id: RequestId) -> bytes:
    """A request, for a client. `params`: a Struct, dict or list, or None for none.

    Raises:
        TypeError: if `params` holds a value msgspec cannot encode.
    """
    return _encoder.encode(Request(_VERSION, method, params, id))


def encode_notification(method: str, params: Any = None) -> bytes:
    """A notification (a request without id), e.g. `Notification.STREAM_CHUNK`.

    Raises:
        TypeError: if `params` holds a value msgspec cannot encode.
    """
    return _encoder.encode(Request(_VERSION, method, params))


def encode_result(id: RequestId, result: Any) -> bytes:
    """A success reply `{"jsonrpc", "id", "result"}`.

    Raises:
        TypeError: if `result` holds a value msgspec cannot encode.
    """
    return _encoder.encode(Response(_VERSION, id, result))


def encode_error(id: RequestId, error: CorralError | ErrorInfo) -> bytes:
    """An error reply `{"jsonrpc", "id", "error": {"code", "message", "data"}}`.

    `code` is the JSON-RPC number of the error's code in the error table; `data` is
    `{"code": <code name>, "retryable": <bool>, **details}`, where a detail never
    overrides `code` or `retryable`, and a detail with no JSON form is sent as its repr.
    Never raises for any `CorralError` or `ErrorInfo`.
    """
    return _encoder.encode(ErrorResponse(_VERSION, id, error_object(error)))


def error_object(error: CorralError | ErrorInfo) -> ErrorObject:
    """The `error` member of an error reply (see `encode_error`), also the `error` of a
    `stream.error` notification. Never raises for any `CorralError` or `ErrorInfo`:
    details are free-form, and the error must still go out when one of them has no
    JSON form, so such a value becomes its repr.
    """
    info = error.info() if isinstance(error, CorralError) else error
    data: dict[str, Any] = {"code": info.code.value, "retryable": info.retryable}
    data.update((key, value) for key, value in info.details.items() if key not in data)
    return ErrorObject(ERROR_TABLE[info.code].jsonrpc, info.message,
                       msgspec.to_builtins(data, enc_hook=repr))


def encode_batch(responses: Sequence[bytes]) -> bytes:
    """The reply to a batch: the members' encoded replies as one JSON array.

    Raises:
        ValueError: if `responses` is empty. A batch of notifications only gets no
            reply at all; the spec forbids an empty array.
    """
    if not responses:
        raise ValueError("a batch reply needs at least one response; send nothing instead")
    return b"[" + b",".join(responses) + b"]"


def _reply(value: Any) -> Reply:
    type_: type[Reply]
    if isinstance(value, dict) and "error" in value:
        type_ = ErrorResponse
    elif isinstance(value, dict) and "result" in value:
        type_ = Response
    else:
        type_ = Request
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        raise EngineClientError(Code.TRANSPORT_ERROR,
                                f"malformed reply: {describe(exc, root=type_)}") from None


def parse_reply(data: bytes) -> Reply | list[Reply]:
    """Parse one message a client received: a reply, a notification or a batch reply.

    Raises:
        EngineClientError: code TransportError when `data` is not a JSON-RPC reply or
            notification: the connection can no longer be trusted. Nothing else.
    """
    try:
        value = decode_json(data)
    except EngineClientError as exc:
        raise EngineClientError(Code.TRANSPORT_ERROR, f"malformed reply: {exc.message}") from None
    if isinstance(value, list):
        return [_reply(member) for member in value]
    return _reply(value)


def error_from_response(response: ErrorResponse) -> CorralError:
    """The typed error an error reply stands for, as the server raised it.

    The code comes from the JSON-RPC number; a number outside the table gives
    UnknownError with the number kept in `details["jsonrpc_code"]`. `retryable` comes
    from `data` when it says, else from the table. Never raises.
    """
    error = response.error
    code = code_for_jsonrpc(error.code)
    data = error.data or {}
    details = {key: value for key, value in data.items() if key not in ("code", "retryable")}
    if ERROR_TABLE[code].jsonrpc != error.code:
        details["jsonrpc_code"] = error.code
    retryable = data.get("retryable")
    if not isinstance(retryable, bool):
        retryable = bool(ERROR_TABLE[code].retryable)
    return error_from_info(ErrorInfo(code, error.message, retryable, details))

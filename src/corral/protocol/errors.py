"""The error table and the typed exceptions every boundary speaks.

One row per code: its JSON-RPC number, HTTP status, whether a retry can help, and how to
classify it. Transports map exceptions to wire errors through this table alone; nothing
else in corral invents a status code. This module holds data and lookups, never I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

import msgspec


class Code(enum.StrEnum):
    """Error code names, exactly as they appear on the wire."""

    PARSE_ERROR = "ParseError"
    INVALID_REQUEST = "InvalidRequest"
    METHOD_NOT_FOUND = "MethodNotFound"
    INVALID_PARAMS = "InvalidParams"
    INTERNAL_ERROR = "InternalError"
    SERVER_ERROR = "ServerError"
    MODEL_LOAD_ERROR = "ModelLoadError"
    GENERATION_ERROR = "GenerationError"
    TOKENIZER_ERROR = "TokenizerError"
    GUIDANCE_ERROR = "GuidanceError"
    MODEL_NOT_LOADED = "ModelNotLoaded"
    OVERLOADED = "Overloaded"
    CIRCUIT_OPEN = "CircuitOpen"
    RUNTIME_ERROR = "RuntimeError"
    TRANSPORT_ERROR = "TransportError"
    TIMEOUT = "Timeout"
    CANCELLED = "Cancelled"
    UNKNOWN_ERROR = "UnknownError"


class Category(enum.StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    DEGRADATION = "degradation"
    THROTTLED = "throttled"
    UNKNOWN = "unknown"


class Severity(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class ErrorSpec(msgspec.Struct, frozen=True):
    """One row of the error table.

    `retryable` is None where the table says "by cause": the raising site decides.
    """

    code: Code
    jsonrpc: int
    http: int
    retryable: bool | None
    category: Category
    severity: Severity
    suggestion: str


_C, _S = Category, Severity

ERROR_TABLE: Final[dict[Code, ErrorSpec]] = {
    spec.code: spec
    for spec in (
        ErrorSpec(Code.PARSE_ERROR, -32700, 400, False, _C.PERMANENT, _S.LOW,
                  "send valid JSON"),
        ErrorSpec(Code.INVALID_REQUEST, -32600, 400, False, _C.PERMANENT, _S.LOW,
                  "fix the request envelope"),
        ErrorSpec(Code.METHOD_NOT_FOUND, -32601, 404, False, _C.PERMANENT, _S.LOW,
                  "call a method the server lists"),
        ErrorSpec(Code.INVALID_PARAMS, -32602, 400, False, _C.PERMANENT, _S.LOW,
                  "fix the named parameter"),
        ErrorSpec(Code.INTERNAL_ERROR, -32603, 500, True, _C.TRANSIENT, _S.HIGH,
                  "retry; report it if it persists"),
        ErrorSpec(Code.SERVER_ERROR, -32000, 500, True, _C.TRANSIENT, _S.HIGH,
                  "retry with backoff"),
        ErrorSpec(Code.MODEL_LOAD_ERROR, -32001, 500, None, _C.TRANSIENT, _S.HIGH,
                  "check the model path and memory, then load again"),
        ErrorSpec(Code.GENERATION_ERROR, -32002, 500, None, _C.TRANSIENT, _S.MEDIUM,
                  "retry; the engine restarts on its own"),
        ErrorSpec(Code.TOKENIZER_ERROR, -32003, 400, False, _C.PERMANENT, _S.LOW,
                  "send text the model's tokenizer accepts"),
        ErrorSpec(Code.GUIDANCE_ERROR, -32004, 400, False, _C.PERMANENT, _S.LOW,
                  "fix the grammar or schema"),
        ErrorSpec(Code.MODEL_NOT_LOADED, -32005, 404, False, _C.PERMANENT, _S.MEDIUM,
                  "load the model or use a listed alias"),
        ErrorSpec(Code.OVERLOADED, -32006, 429, True, _C.THROTTLED, _S.MEDIUM,
                  "wait retry_after_ms, then retry"),
        ErrorSpec(Code.CIRCUIT_OPEN, -32007, 503, True, _C.DEGRADATION, _S.HIGH,
                  "wait retry_after_ms or use a fallback model"),
        ErrorSpec(Code.RUNTIME_ERROR, -32099, 500, True, _C.TRANSIENT, _S.CRITICAL,
                  "retry; the supervisor restarts the failed part"),
        ErrorSpec(Code.TRANSPORT_ERROR, -32010, 502, True, _C.TRANSIENT, _S.MEDIUM,
                  "reconnect and retry"),
        ErrorSpec(Code.TIMEOUT, -32011, 504, True, _C.TRANSIENT, _S.MEDIUM,
                  "retry with a longer deadline or a shorter request"),
        ErrorSpec(Code.CANCELLED, -32012, 499, False, _C.PERMANENT, _S.LOW,
                  "none: the caller cancelled"),
        ErrorSpec(Code.UNKNOWN_ERROR, -32013, 500, None, _C.UNKNOWN, _S.HIGH,
                  "inspect the details and report it"),
    )
}

CLIENT_ERROR_CODES: Final[frozenset[Code]] = frozenset(
    {Code.PARSE_ERROR, Code.INVALID_REQUEST, Code.METHOD_NOT_FOUND, Code.INVALID_PARAMS,
     Code.TOKENIZER_ERROR, Code.GUIDANCE_ERROR}
)
"""Codes that blame the caller: breakers ignore them, retries never repeat them."""

_BY_JSONRPC: Final[dict[int, Code]] = {spec.jsonrpc: code for code, spec in ERROR_TABLE.items()}


def code_for_jsonrpc(number: int) -> Code:
    """The code whose JSON-RPC number is `number`, or UnknownError."""
    return _BY_JSONRPC.get(number, Code.UNKNOWN_ERROR)


class ErrorInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """An error as it crosses a boundary (mailbox reply, IPC frame, JSON-RPC, HTTP body)."""

    code: Code
    message: str
    retryable: bool = False
    details: dict[str, Any] = {}


class CorralError(Exception):
    """Base of every typed corral error. Each has a `code` from the table.

    Subclasses carry the fields their code needs; `info()` gives the wire form.
    """

    code: Code = Code.UNKNOWN_ERROR

    def __init__(self, message: str, *, details: dict[str, Any] | None = None,
                 retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self._retryable = retryable

    @property
    def retryable(self) -> bool:
        if self._retryable is not None:
            return self._retryable
        return bool(ERROR_TABLE[self.code].retryable)

    @property
    def spec(self) -> ErrorSpec:
        return ERROR_TABLE[self.code]

    def info(self) -> ErrorInfo:
        return ErrorInfo(self.code, self.message, self.retryable, self.details)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value}: {self.message!r})"


class EngineClientError(CorralError):
    """An error with any code of the table: `EngineClientError(code, message, details)`."""

    def __init__(self, code: Code, message: str, details: dict[str, Any] | None = None,
                 *, retryable: bool | None = None) -> None:
        self.code = Code(code)
        super().__init__(message, details=details, retryable=retryable)


def model_unloaded(model: str, partial_text: str = "",
                   completion_tokens: int = 0) -> EngineClientError:
    """What a request gets when its model is unloaded while it waits or runs:
    ModelNotLoaded (404, not retryable), as the next request to that model gets, with
    the text the stream had produced so far (`partial_text`)."""
    return EngineClientError(
        Code.MODEL_NOT_LOADED, f"model {model!r} was unloaded while the request ran",
        {"model": model, "unloaded": True, "partial_text": partial_text,
         "completion_tokens": completion_tokens})


class TimeoutError(CorralError):
    """A call ran past its deadline."""

    code = Code.TIMEOUT

    def __init__(self, method: str, timeout: float, request_id: str | int | None,
                 duration: float) -> None:
        # A deadline already past when a wait began leaves a negative time to wait:
        # the caller had none left, never a negative timeout.
        timeout = max(0.0, timeout)
        duration = max(0.0, duration)
        self.method = method
        self.timeout = timeout
        self.request_id = request_id
        self.duration = duration
        super().__init__(
            f"{method} timed out after {duration:.3f}s (timeout {timeout:.3f}s)",
            details={"method": method, "timeout": timeout, "request_id": request_id,
                     "duration": duration},
        )

    def for_method(self, method: str) -> TimeoutError:
        """The same timeout, named for the method the client called (a transport's
        name for it: `chat.completions`)."""
        return TimeoutError(method, self.timeout, self.request_id, self.duration)


class CircuitBreakerOpenError(CorralError):
    """A circuit breaker refused the call; try again after `retry_after_ms`."""

    code = Code.CIRCUIT_OPEN

    def __init__(self, retry_after_ms: int, state: str, circuit: str) -> None:
        self.retry_after_ms = retry_after_ms
        self.state = state
        self.circuit = circuit
        super().__init__(
            f"circuit {circuit!r} is {state}; retry after {retry_after_ms} ms",
            details={"retry_after_ms": retry_after_ms, "state": state, "circuit": circuit},
        )


class RetryAbortedError(CorralError):
    """A retry loop was cancelled before it succeeded; `last_error` is the last failure."""

    code = Code.CANCELLED

    def __init__(self, attempts: int, last_error: BaseException | None = None) -> None:
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(
            f"retry aborted after {attempts} attempt(s)",
            details={"attempts": attempts,
                     "last_error": repr(last_error) if last_error is not None else None},
        )


class OverloadedError(CorralError):
    """Admission refused: too many requests. Retry after `retry_after_ms`."""

    code = Code.OVERLOADED

    def __init__(self, message: str, retry_after_ms: int,
                 details: dict[str, Any] | None = None) -> None:
        self.retry_after_ms = retry_after_ms
        super().__init__(message, details={**(details or {}), "retry_after_ms": retry_after_ms})


class ActorExitedError(CorralError):
    """The actor that should answer has exited; carries its path and exit reason.

    Raised at once to every caller waiting on that actor (a monitor), never at a timeout.
    """

    code = Code.RUNTIME_ERROR

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"actor {path} exited: {reason}",
                         details={"path": path, "reason": reason})


def error_from_info(info: ErrorInfo) -> CorralError:
    """Rebuild a typed exception from its wire form (the inverse of `CorralError.info`)."""
    d = info.details
    try:
        if info.code is Code.TIMEOUT and {"method", "timeout", "duration"} <= d.keys():
            return TimeoutError(d["method"], d["timeout"], d.get("request_id"), d["duration"])
        if info.code is Code.CIRCUIT_OPEN and {"retry_after_ms", "state", "circuit"} <= d.keys():
            return CircuitBreakerOpenError(d["retry_after_ms"], d["state"], d["circuit"])
        if info.code is Code.OVERLOADED and "retry_after_ms" in d:
            rest = {k: v for k, v in d.items() if k != "retry_after_ms"}
            return OverloadedError(info.message, d["retry_after_ms"], rest)
    except (TypeError, ValueError):
        pass
    return EngineClientError(info.code, info.message, d, retryable=info.retryable)


class EscalationError(CorralError):
    """A supervisor exceeded its restart intensity and gave up.

    `chain` holds the reasons from this supervisor down to the first failure, so the
    root's error says what broke and where.
    """

    code = Code.RUNTIME_ERROR

    def __init__(self, path: str, chain: tuple[str, ...]) -> None:
        self.path = path
        self.chain = chain
        super().__init__(" <- ".join(chain), details={"path": path, "chain": list(chain)})


class ChildStartError(CorralError):
    """A supervised child failed before it reported started; the cause is chained."""

    code = Code.RUNTIME_ERROR

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"{path} failed to start: {reason}", details={"path": path})


RETRY_ERROR_ALIASES: Final[Mapping[str, Code]] = {
    "TIMEOUT": Code.TIMEOUT,
    "ECONNRESET": Code.TRANSPORT_ERROR,
}
"""Names kept from the configuration format corral started from, and what they mean."""


def resolve_error_name(name: str) -> Code:
    """The error code a `retryable_errors` entry names.

    Accepts a code as it appears on the wire (`"Timeout"`), its enum member name
    (`"TIMEOUT"`) or an alias from `RETRY_ERROR_ALIASES` (`"ECONNRESET"`).

    Raises:
        ValueError: if the name matches none of these.
    """
    if name in RETRY_ERROR_ALIASES:
        return RETRY_ERROR_ALIASES[name]
    try:
        return Code(name)
    except ValueError:
        pass
    try:
        return Code[name]
    except KeyError:
        aliases = ", ".join(RETRY_ERROR_ALIASES)
        raise ValueError(
            f"unknown error code {name!r}; expected a corral.protocol.errors.Code name "
            f"(e.g. 'Timeout') or one of {aliases}"
        ) from None

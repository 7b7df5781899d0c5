"""The error table, the typed exceptions, and classification of any error."""

from __future__ import annotations

import pytest
import trio

from corral.protocol.errors import (
    CLIENT_ERROR_CODES,
    ERROR_TABLE,
    ActorExitedError,
    Category,
    CircuitBreakerOpenError,
    Code,
    EngineClientError,
    OverloadedError,
    RetryAbortedError,
    Severity,
    TimeoutError,
    code_for_jsonrpc,
    error_from_info,
)
from corral.resilience.classify import classify

# The table of DESIGN.md, row by row: JSON-RPC number, HTTP status, retryable.
DESIGN_TABLE = {
    "ParseError": (-32700, 400, False), "InvalidRequest": (-32600, 400, False),
    "MethodNotFound": (-32601, 404, False), "InvalidParams": (-32602, 400, False),
    "InternalError": (-32603, 500, True), "ServerError": (-32000, 500, True),
    "ModelLoadError": (-32001, 500, None), "GenerationError": (-32002, 500, None),
    "TokenizerError": (-32003, 400, False), "GuidanceError": (-32004, 400, False),
    "ModelNotLoaded": (-32005, 404, False), "Overloaded": (-32006, 429, True),
    "CircuitOpen": (-32007, 503, True), "RuntimeError": (-32099, 500, True),
    "TransportError": (-32010, 502, True), "Timeout": (-32011, 504, True),
    "Cancelled": (-32012, 499, False), "UnknownError": (-32013, 500, None),
}


def test_the_table_is_the_design_table() -> None:
    assert {code.value for code in ERROR_TABLE} == set(DESIGN_TABLE)
    for code, spec in ERROR_TABLE.items():
        assert (spec.jsonrpc, spec.http, spec.retryable) == DESIGN_TABLE[code.value]
        assert code_for_jsonrpc(spec.jsonrpc) is code
    assert code_for_jsonrpc(12345) is Code.UNKNOWN_ERROR


@pytest.mark.parametrize("code", list(Code))
def test_every_code_classifies_with_a_suggestion(code: Code) -> None:
    result = classify(EngineClientError(code, "x"))
    assert result.code is code
    assert isinstance(result.category, Category)
    assert isinstance(result.severity, Severity)
    assert result.suggestion
    if code in CLIENT_ERROR_CODES:
        assert result.category is Category.PERMANENT and not result.retryable
    if ERROR_TABLE[code].retryable is not None:
        assert result.retryable is ERROR_TABLE[code].retryable


def test_by_cause_codes_take_the_raisers_word() -> None:
    assert classify(EngineClientError(Code.GENERATION_ERROR, "x", retryable=True)).retryable
    assert not classify(EngineClientError(Code.GENERATION_ERROR, "x")).retryable


def test_categories_of_the_special_codes() -> None:
    assert classify(OverloadedError("full", 100)).category is Category.THROTTLED
    assert classify(CircuitBreakerOpenError(50, "open", "m")).category is Category.DEGRADATION
    assert classify(TimeoutError("generate", 1.0, "r", 1.2)).category is Category.TRANSIENT
    assert classify(ValueError("?")).code is Code.UNKNOWN_ERROR
    assert not classify(ValueError("?")).retryable


async def test_trio_cancellation_classifies_as_cancelled() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            assert classify(exc).code is Code.CANCELLED
            raise


@pytest.mark.parametrize("error", [
    TimeoutError("generate", 2.0, "req-1", 2.5),
    CircuitBreakerOpenError(1500, "open", "tiny"),
    OverloadedError("full", 250, {"active": 3}),
    EngineClientError(Code.INVALID_PARAMS, "top_p: expected <= 1", {"field": "top_p"}),
    RetryAbortedError(3, ValueError("x")),
    ActorExitedError("root/a", "ValueError: boom"),
])
def test_typed_errors_cross_the_wire_and_come_back_typed(error: Exception) -> None:
    assert isinstance(error, EngineClientError | TimeoutError | CircuitBreakerOpenError
                      | OverloadedError | RetryAbortedError | ActorExitedError)
    back = error_from_info(error.info())  # type: ignore[attr-defined]
    assert back.code is error.code  # type: ignore[attr-defined]
    assert back.message == error.message  # type: ignore[attr-defined]
    if isinstance(error, TimeoutError | CircuitBreakerOpenError | OverloadedError):
        assert type(back) is type(error)
        assert back.details == error.details

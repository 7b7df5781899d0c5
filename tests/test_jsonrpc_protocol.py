"""JSON-RPC 2.0 envelopes: spec examples, classification, typed params, encoding, fuzz."""

from __future__ import annotations

import json
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.protocol import errors
from corral.protocol.errors import Code, CorralError, EngineClientError, ErrorInfo
from corral.protocol.jsonrpc import (
    ErrorResponse,
    InvalidItem,
    Method,
    Notification,
    ParsedItem,
    Request,
    Response,
    encode_batch,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    error_from_response,
    params_as,
    parse_message,
    parse_reply,
)


def raised_code(data: bytes) -> Code:
    with pytest.raises(CorralError) as info:
        parse_message(data)
    return info.value.code


def answer(item: ParsedItem, result: Any = 7) -> bytes:
    """What a server sends for an item that is not a notification."""
    if isinstance(item, InvalidItem):
        return encode_error(item.id, item.error)
    assert not isinstance(item.id, msgspec.UnsetType)
    return encode_result(item.id, result)


def invalid(data: bytes) -> InvalidItem:
    item = parse_message(data)
    assert isinstance(item, InvalidItem), item
    return item


# -- the examples of jsonrpc.org/specification, section 7 ---------------------------------


def test_spec_positional_and_named_params() -> None:
    positional = parse_message(
        b'{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}')
    assert positional == Request("2.0", "subtract", [42, 23], 1)
    assert not positional.is_notification
    named = parse_message(b'{"jsonrpc": "2.0", "method": "subtract", '
                          b'"params": {"subtrahend": 23, "minuend": 42}, "id": 3}')
    assert named == Request("2.0", "subtract", {"subtrahend": 23, "minuend": 42}, 3)


def test_spec_notifications_and_null_id() -> None:
    note = parse_message(b'{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}')
    assert isinstance(note, Request) and note.is_notification
    assert note.id is msgspec.UNSET
    bare = parse_message(b'{"jsonrpc": "2.0", "method": "foobar"}')
    assert isinstance(bare, Request) and bare.is_notification and bare.params is None
    null_id = parse_message(b'{"jsonrpc": "2.0", "method": "foobar", "id": null}')
    assert isinstance(null_id, Request) and not null_id.is_notification
    assert null_id.id is None


def test_spec_invalid_json_is_parse_error() -> None:
    assert raised_code(b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]') \
        is Code.PARSE_ERROR
    assert raised_code(b'[\n  {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
                       b'\n  {"jsonrpc": "2.0", "method"\n]') is Code.PARSE_ERROR


def test_spec_invalid_request_object_is_answered_with_null_id() -> None:
    item = invalid(b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    assert item.id is None
    assert item.error.code is Code.INVALID_REQUEST
    assert json.loads(encode_error(item.id, item.error)) == {
        "jsonrpc": "2.0", "id": None,
        "error": {"code": -32600, "message": item.error.message,
                  "data": {"code": "InvalidRequest", "retryable": False}},
    }


def test_spec_empty_batch_is_one_invalid_request() -> None:
    assert raised_code(b"[]") is Code.INVALID_REQUEST
    assert raised_code(b"  [ ]  ") is Code.INVALID_REQUEST


@pytest.mark.parametrize("data, count", [(b"[1]", 1), (b"[1,2,3]", 3)])
def test_spec_invalid_batches_answer_each_member(data: bytes, count: int) -> None:
    items = parse_message(data)
    assert isinstance(items, list) and len(items) == count
    assert all(isinstance(item, InvalidItem) and item.id is None
               and item.error.code is Code.INVALID_REQUEST for item in items)
    reply = json.loads(encode_batch([answer(item) for item in items]))
    assert [r["error"]["code"] for r in reply] == [-32600] * count
    assert [r["id"] for r in reply] == [None] * count


def test_spec_mixed_batch() -> None:
    items = parse_message(b"""[
        {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
    ]""")
    assert isinstance(items, list)
    assert items[0] == Request("2.0", "sum", [1, 2, 4], "1")
    assert isinstance(items[1], Request) and items[1].is_notification
    assert items[2] == Request("2.0", "subtract", [42, 23], "2")
    assert isinstance(items[3], InvalidItem) and items[3].id is None
    assert items[3].error.code is Code.INVALID_REQUEST
    assert items[4] == Request("2.0", "foo.get", {"name": "myself"}, "5")
    assert items[5] == Request("2.0", "get_data", None, "9")

    decoded = json.loads(encode_batch([answer(item) for item in items
                                       if not (isinstance(item, Request) and item.is_notification)]))
    assert [r["id"] for r in decoded] == ["1", "2", None, "5", "9"]
    assert "error" in decoded[2] and "result" not in decoded[2]


def test_spec_batch_of_notifications_gets_no_reply() -> None:
    items = parse_message(b'[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
                          b' {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]')
    assert isinstance(items, list)
    assert all(isinstance(item, Request) and item.is_notification for item in items)
    with pytest.raises(ValueError):
        encode_batch([])


# -- classification -------------------------------------------------------------------------


@pytest.mark.parametrize("data, message", [
    (b'{"jsonrpc": "2.0", "id": 1}', "method: required field missing"),
    (b'{"method": "health", "id": 1}', "jsonrpc: required field missing"),
    (b'{"jsonrpc": "1.0", "method": "health", "id": 1}', "jsonrpc: expected one of '2.0', got '1.0'"),
    (b'{"jsonrpc": 2.0, "method": "health", "id": 1}', "jsonrpc: expected str, got float"),
    (b'{"jsonrpc": "2.0", "method": ["health"], "id": 1}', "method: expected str, got array"),
    (b'{"jsonrpc": "2.0", "method": "health", "params": 3, "id": 1}',
     "params: expected object | array | null, got int"),
    (b'{"jsonrpc": "2.0", "method": "health", "params": "x", "id": 1}',
     "params: expected object | array | null, got str"),
])
def test_invalid_request_names_the_member_and_echoes_a_valid_id(data: bytes,
                                                                message: str) -> None:
    item = invalid(data)
    assert item.error == ErrorInfo(Code.INVALID_REQUEST, message, False)
    assert item.id == 1


@pytest.mark.parametrize("id_json", [b"1.5", b"true", b"[1]", b'{"a": 1}'])
def test_an_id_of_the_wrong_type_is_invalid_and_answered_with_null(id_json: bytes) -> None:
    item = invalid(b'{"jsonrpc": "2.0", "method": "health", "id": ' + id_json + b"}")
    assert item.id is None
    assert item.error.message.startswith("id: expected int | str | null, got ")


@pytest.mark.parametrize("data", [b"1", b'"health"', b"null", b"true", b"[[]]"])
def test_json_that_is_not_an_object_is_invalid_request(data: bytes) -> None:
    parsed = parse_message(data)
    item = parsed[0] if isinstance(parsed, list) else parsed
    assert isinstance(item, InvalidItem) and item.id is None
    assert item.error.code is Code.INVALID_REQUEST
    assert item.error.message.startswith("expected object, got ")


@pytest.mark.parametrize("data", [
    b"", b"   ", b"\xff\xfe", b'"\xff"', b'{"jsonrpc": "2.0", "method": "\xc3\x28"}',
    b"NaN", b"1e400", b"9" * 5000, b"[1,]", b"{} {}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"jsonrpc": "2.0", "method": "m", "params": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
])
def test_bytes_that_are_not_json_are_parse_errors(data: bytes) -> None:
    with pytest.raises(EngineClientError) as info:
        parse_message(data)
    assert info.value.code is Code.PARSE_ERROR
    assert info.value.message.startswith("invalid JSON: ")


def test_valid_requests_keep_large_ids_and_unicode() -> None:
    big = 10**30
    item = parse_message(b'{"jsonrpc": "2.0", "method": "t\xc3\xa9", "id": %d}' % big)
    assert item == Request("2.0", "té", None, big)
    assert json.loads(encode_result(big, None)) == {"jsonrpc": "2.0", "id": big, "result": None}


def test_null_params_are_no_params() -> None:
    assert parse_message(b'{"jsonrpc": "2.0", "method": "health", "params": null, "id": 1}') \
        == Request("2.0", "health", None, 1)


# -- params_as ------------------------------------------------------------------------------


class GenerateParams(msgspec.Struct, frozen=True):
    prompt: str
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 16
    temperature: float = 0.0


def request(params: Any) -> Request:
    return Request("2.0", Method.GENERATE, params, 1)


def invalid_params(params: Any) -> EngineClientError:
    with pytest.raises(EngineClientError) as info:
        params_as(request(params), GenerateParams)
    assert info.value.code is Code.INVALID_PARAMS
    return info.value


def test_params_by_name_and_by_position() -> None:
    expected = GenerateParams("hi", 8, 0.5)
    assert params_as(request({"prompt": "hi", "max_tokens": 8, "temperature": 0.5}),
                     GenerateParams) == expected
    assert params_as(request(["hi", 8, 0.5]), GenerateParams) == expected
    assert params_as(request(["hi"]), GenerateParams) == GenerateParams("hi")


def test_params_by_position_use_renamed_fields() -> None:
    class Renamed(msgspec.Struct, frozen=True, rename="camel"):
        max_tokens: int
        top_p: float = 1.0

    assert params_as(request([4, 0.9]), Renamed) == Renamed(4, 0.9)
    assert params_as(request({"maxTokens": 4}), Renamed) == Renamed(4)


def test_absent_params_fill_only_defaults() -> None:
    class Empty(msgspec.Struct, frozen=True):
        verbose: bool = False

    assert params_as(Request("2.0", Method.HEALTH, None, 1), Empty) == Empty()
    assert invalid_params(None).message == "prompt: required field missing"


@pytest.mark.parametrize("params, message, field", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens: expected >= 1", "max_tokens"),
    ({"prompt": "hi", "max_tokens": "8"}, "max_tokens: expected int, got str", "max_tokens"),
    (["hi", 0], "max_tokens: expected >= 1", "max_tokens"),
    ([1], "prompt: expected str, got int", "prompt"),
    ({"max_tokens": 4}, "prompt: required field missing", "prompt"),
])
def test_invalid_params_name_the_field(params: Any, message: str, field: str) -> None:
    error = invalid_params(params)
    assert error.message == message
    assert error.details == {"field": field}
    assert not error.retryable


class Sampling(msgspec.Struct, frozen=True):
    top_k: Annotated[int, msgspec.Meta(ge=0)]


class Nested(msgspec.Struct, frozen=True):
    sampling: Sampling
    stop: list[str] = []


def test_invalid_params_name_nested_fields() -> None:
    def message(params: Any) -> str:
        with pytest.raises(EngineClientError) as info:
            params_as(request(params), Nested)
        return info.value.message

    assert message({"sampling": {"top_k": -1}}) == "sampling.top_k: expected >= 0"
    assert message({"sampling": {}}) == "sampling.top_k: required field missing"
    assert message({"sampling": {"top_k": 1}, "stop": ["a", 2]}) \
        == "stop[1]: expected str, got int"


def test_unknown_fields_follow_the_struct() -> None:
    class Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        prompt: str = ""

    with pytest.raises(EngineClientError) as info:
        params_as(request({"promt": "hi"}), Strict)
    assert info.value.message == "promt: unknown field"
    assert params_as(request({"prompt": "a", "extra": 1}), GenerateParams) == GenerateParams("a")


def test_too_many_positional_params() -> None:
    error = invalid_params(["hi", 1, 0.5, "extra"])
    assert error.message == "expected at most 3 positional params, got 4"


# -- encoding -------------------------------------------------------------------------------


def test_encode_result_has_exact_keys() -> None:
    for result in (None, 0, "x", [1], {"a": {"b": None}}):
        out = encode_result("r1", result)
        assert json.loads(out) == {"jsonrpc": "2.0", "id": "r1", "result": result}
        assert b"\n" not in out


def test_encode_result_encodes_structs() -> None:
    assert json.loads(encode_result(3, GenerateParams("a\nb"))) == {
        "jsonrpc": "2.0", "id": 3,
        "result": {"prompt": "a\nb", "max_tokens": 16, "temperature": 0.0},
    }


def test_encode_error_has_exact_keys_and_table_numbers() -> None:
    error = EngineClientError(Code.MODEL_NOT_LOADED, "no model 'x'\nloaded", {"model": "x"})
    out = encode_error(7, error)
    assert b"\n" not in out
    assert json.loads(out) == {
        "jsonrpc": "2.0", "id": 7,
        "error": {"code": -32005, "message": "no model 'x'\nloaded",
                  "data": {"code": "ModelNotLoaded", "retryable": False, "model": "x"}},
    }


@pytest.mark.parametrize("code", list(Code))
def test_every_code_encodes_with_its_table_number(code: Code) -> None:
    reply = json.loads(encode_error(None, EngineClientError(code, "boom")))
    spec = errors.ERROR_TABLE[code]
    assert reply["error"]["code"] == spec.jsonrpc
    assert reply["error"]["data"] == {"code": code.value, "retryable": bool(spec.retryable)}


def test_encode_error_details_cannot_override_code_and_unencodable_details_go_as_repr() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    info = ErrorInfo(Code.INTERNAL_ERROR, "x", True,
                     {"code": "Spoofed", "retryable": False, "thing": Opaque()})
    data = json.loads(encode_error(1, info))["error"]["data"]
    assert data == {"code": "InternalError", "retryable": True, "thing": "<opaque>"}


def test_encode_notification_and_request() -> None:
    chunk = json.loads(encode_notification(Notification.STREAM_CHUNK, {"text": "a"}))
    assert chunk == {"jsonrpc": "2.0", "method": "stream.chunk", "params": {"text": "a"}}
    assert json.loads(encode_notification(Notification.STREAM_END)) \
        == {"jsonrpc": "2.0", "method": "stream.end"}
    assert json.loads(encode_request(Method.HEALTH, id=None)) \
        == {"jsonrpc": "2.0", "method": "health", "id": None}
    assert json.loads(encode_request(Method.TOKENIZE, ["hi"], id="a")) \
        == {"jsonrpc": "2.0", "method": "tokenize", "params": ["hi"], "id": "a"}


def test_encoded_requests_parse_back() -> None:
    out = encode_request(Method.GENERATE, GenerateParams("hi", 4), id=9)
    parsed = parse_message(out)
    assert isinstance(parsed, Request) and parsed.method == Method.GENERATE
    assert params_as(parsed, GenerateParams) == GenerateParams("hi", 4)
    note = parse_message(encode_notification(Method.CANCEL, {"stream_id": "s"}))
    assert isinstance(note, Request) and note.is_notification


def test_method_and_notification_names_are_the_designed_ones() -> None:
    assert {m.value for m in Method} == {
        "runtime/info", "runtime/state", "health", "load_model", "unload_model",
        "list_models", "tokenize", "detokenize", "generate", "complete", "cancel", "shutdown"}
    assert {n.value for n in Notification} == {"stream.chunk", "stream.end", "stream.error"}


# -- the client side ------------------------------------------------------------------------


def rebuilt(error: CorralError) -> CorralError:
    reply = parse_reply(encode_error("q", error))
    assert isinstance(reply, ErrorResponse) and reply.id == "q"
    return error_from_response(reply)


def test_typed_errors_survive_the_wire() -> None:
    timeout = rebuilt(errors.TimeoutError("generate", 2.0, 5, 2.25))
    assert isinstance(timeout, errors.TimeoutError)
    assert (timeout.method, timeout.timeout, timeout.request_id, timeout.duration) \
        == ("generate", 2.0, 5, 2.25)
    circuit = rebuilt(errors.CircuitBreakerOpenError(250, "open", "model:tiny"))
    assert isinstance(circuit, errors.CircuitBreakerOpenError)
    assert (circuit.retry_after_ms, circuit.state, circuit.circuit) == (250, "open", "model:tiny")
    overloaded = rebuilt(errors.OverloadedError("busy", 100, {"queued": 3}))
    assert isinstance(overloaded, errors.OverloadedError)
    assert overloaded.retry_after_ms == 100 and overloaded.details["queued"] == 3


@pytest.mark.parametrize("code", list(Code))
@pytest.mark.parametrize("retryable", [True, False])
def test_every_code_and_retryable_flag_survive_the_wire(code: Code, retryable: bool) -> None:
    error = rebuilt(EngineClientError(code, "m", {"k": [1, "v"]}, retryable=retryable))
    assert (error.code, error.message, error.retryable, error.details) \
        == (code, "m", retryable, {"k": [1, "v"]})


def test_foreign_error_numbers_are_unknown_errors_that_keep_the_number() -> None:
    reply = parse_reply(b'{"jsonrpc": "2.0", "id": 1, "error": {"code": -32050, "message": "x"}}')
    assert isinstance(reply, ErrorResponse)
    error = error_from_response(reply)
    assert error.code is Code.UNKNOWN_ERROR
    assert error.details == {"jsonrpc_code": -32050}
    assert error.retryable is False


def test_parse_reply_tells_results_errors_and_notifications_apart() -> None:
    assert parse_reply(encode_result(1, {"ok": True})) == Response("2.0", 1, {"ok": True})
    note = parse_reply(encode_notification(Notification.STREAM_END, {"stream_id": "s"}))
    assert note == Request("2.0", "stream.end", {"stream_id": "s"})
    batch = parse_reply(encode_batch([encode_result(1, None),
                                      encode_error(2, EngineClientError(Code.TIMEOUT, "t"))]))
    assert isinstance(batch, list)
    assert [type(r) for r in batch] == [Response, ErrorResponse]


@pytest.mark.parametrize("data", [
    b"{", b"\xff", b"1", b'{"jsonrpc": "2.0", "id": 1}',
    b'{"jsonrpc": "2.0", "id": 1, "error": {"code": "x", "message": "m"}}',
    b'{"jsonrpc": "2.0", "id": 1.5, "result": 1}',
])
def test_malformed_replies_are_transport_errors(data: bytes) -> None:
    with pytest.raises(EngineClientError) as info:
        parse_reply(data)
    assert info.value.code is Code.TRANSPORT_ERROR


# -- fuzz -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["jsonrpc", "method", "params", "id", "x"]) | st.text(),
                      children, max_size=5),
    max_leaves=30,
)

request_ids = st.none() | st.integers() | st.text()
requests = st.builds(
    Request,
    st.just("2.0"),
    st.text(),
    st.none() | st.lists(json_values, max_size=3)
    | st.dictionaries(st.text(), json_values, max_size=3),
    request_ids | st.just(msgspec.UNSET),
)


def parse_or_corral_error(data: bytes) -> Any:
    try:
        return parse_message(data)
    except CorralError as exc:
        assert exc.code in (Code.PARSE_ERROR, Code.INVALID_REQUEST)
        return exc


@settings(max_examples=500)
@given(st.binary())
def test_any_bytes_give_items_or_a_corral_error(data: bytes) -> None:
    parse_or_corral_error(data)


@settings(max_examples=300)
@given(st.binary(), st.binary())
def test_corrupted_requests_give_items_or_a_corral_error(prefix: bytes, suffix: bytes) -> None:
    parse_or_corral_error(prefix + b'{"jsonrpc": "2.0", "method": "generate", "id": 1}' + suffix)
    parse_or_corral_error(b'[{"jsonrpc": "2.0", "method": "x"},' + prefix + suffix + b"]")


@settings(max_examples=100)
@given(st.integers(1, 20_000), st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
def test_nesting_of_any_depth_gives_items_or_a_corral_error(depth: int,
                                                            brackets: tuple[bytes, bytes]) -> None:
    open_, close = brackets
    parse_or_corral_error(open_ * depth + b"1" + close * depth)
    parse_or_corral_error(b'{"jsonrpc": "2.0", "method": "m", "params": '
                          + open_ * depth + b"1" + close * depth + b"}")


@settings(max_examples=300)
@given(json_values)
def test_any_json_value_is_classified_never_a_parse_error(value: Any) -> None:
    data = json.dumps(value).encode()
    if value == []:
        assert raised_code(data) is Code.INVALID_REQUEST
        return
    parsed = parse_message(data)
    items = parsed if isinstance(value, list) else [parsed]
    assert isinstance(items, list) and len(items) == (len(value) if isinstance(value, list) else 1)
    for item in items:
        assert isinstance(item, (Request, InvalidItem))
        if isinstance(item, InvalidItem):
            assert item.error.code is Code.INVALID_REQUEST


@settings(max_examples=300)
@given(requests)
def test_requests_round_trip(req: Request) -> None:
    assert parse_message(msgspec.json.encode(req)) == req
    assert parse_message(msgspec.json.encode([req, 1])) == [req, parse_message(b"1")]


@settings(max_examples=200)
@given(request_ids, json_values)
def test_results_round_trip_through_the_client(rid: Any, result: Any) -> None:
    out = encode_result(rid, result)
    assert b"\n" not in out
    assert parse_reply(out) == Response("2.0", rid, result)

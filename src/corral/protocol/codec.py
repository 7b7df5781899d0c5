"""The codecs: msgpack for mailboxes and length-prefixed IPC frames, JSON for bodies.

The same msgpack bytes cross a mailbox and a process boundary. Decoding is where schemas
are checked: a payload that does not match raises `DecodeError`, which callers turn into
a client error for the sender. JSON bodies of every transport (JSON-RPC params, HTTP
requests) are read by `decode_json` and typed by `convert_params`, which name the field
of whatever they refuse. This module never blocks and never does I/O itself.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Final, Generic, TypeVar

import msgspec

from corral.protocol.errors import Code, EngineClientError
from corral.protocol.validation import explain, lower_first

T = TypeVar("T")
_S = TypeVar("_S", bound=msgspec.Struct)

_HEADER: Final = struct.Struct(">I")
HEADER_SIZE: Final = _HEADER.size
DEFAULT_MAX_FRAME: Final = 64 * 1024 * 1024

_encoder: Final = msgspec.msgpack.Encoder()
# Only to find where a number beyond a float's range (1e999) is: as an infinity.
_lenient_decoder: Final = msgspec.json.Decoder(float_hook=float)
encode = _encoder.encode
"""Encode any msgspec-compatible value to msgpack bytes."""


class DecodeError(ValueError):
    """Bytes that are not valid msgpack, or do not match the expected schema."""


class Decoder(Generic[T]):
    """A typed msgpack decoder whose failures are `DecodeError`, never msgspec internals."""

    __slots__ = ("_decoder", "type")

    def __init__(self, type: type[T] | Any) -> None:
        self.type = type
        self._decoder = msgspec.msgpack.Decoder(type)

    @property
    def decode_unchecked(self) -> Any:
        """msgspec's own decode function: raises msgspec.DecodeError or ValidationError.

        For hot loops that catch those themselves and cannot afford a wrapper frame.
        """
        return self._decoder.decode

    def decode(self, data: bytes | bytearray | memoryview) -> T:
        try:
            return self._decoder.decode(data)  # type: ignore[no-any-return]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(str(exc)) from None


def frame(payload: bytes) -> bytes:
    """Prefix `payload` with its length (4 bytes, big-endian)."""
    return _HEADER.pack(len(payload)) + payload


class FrameError(ValueError):
    """A frame header announced more bytes than the reader accepts."""


class FrameReader:
    """Splits a byte stream into the payloads of length-prefixed frames.

    Feed it whatever the pipe gave; it returns every complete payload and keeps the rest.
    A frame larger than `max_frame` raises `FrameError`: the stream is then unusable.
    """

    __slots__ = ("_buffer", "_max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        payloads: list[bytes] = []
        while len(self._buffer) >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > self._max_frame:
                raise FrameError(f"frame of {size} bytes exceeds the limit of {self._max_frame}")
            end = HEADER_SIZE + size
            if len(self._buffer) < end:
                break
            payloads.append(bytes(self._buffer[HEADER_SIZE:end]))
            del self._buffer[:end]
        return payloads

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buffer)


# -- JSON bodies ----------------------------------------------------------------------


def _parse_error(reason: str) -> EngineClientError:
    return EngineClientError(Code.PARSE_ERROR, f"invalid JSON: {reason}")


def decode_json(data: bytes) -> Any:
    """Any JSON text as builtins, for every interface that reads JSON.

    Integers of any size decode as Python ints, left to the range checks of the Struct
    they are converted to (`convert_params`), which name the field.

    Raises:
        EngineClientError: code ParseError when `data` is not JSON: invalid UTF-8,
            nesting too deep to decode, or a number beyond a float's range (1e999),
            which is named by its path in the message and `details["field"]`
            (`temperature`, `params.stop_token_ids[2]`). Nothing else.
    """
    try:
        return msgspec.json.decode(data)
    except RecursionError:
        raise _parse_error("nested too deeply") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec reports a number it cannot hold (1e400) as a ValidationError.
        path = _out_of_range(data) if isinstance(exc, msgspec.ValidationError) else None
        if path:
            raise EngineClientError(
                Code.PARSE_ERROR, f"invalid JSON: {path}: number out of range",
                {"field": path}) from None
        raise _parse_error(lower_first(str(exc))) from None


def _out_of_range(data: bytes) -> str | None:
    """The path of the first number beyond a float's range in `data`, if any."""
    try:
        value = _lenient_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:  # not recursive: the value may be nested as deeply as msgspec allows
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path
        if isinstance(item, dict):
            stack.extend((f"{path}.{key}" if path else str(key), member)
                         for key, member in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{index}]", member)
                         for index, member in reversed(list(enumerate(item))))
    return None


def convert_params(params: Any, type_: type[_S]) -> _S:
    """`params` (builtins: a dict, usually) as a `type_` Struct; for every interface.

    Raises:
        EngineClientError: code InvalidParams naming the field (`max_tokens: expected
            >= 1`) and `details["field"]`.
    """
    try:
        # JSON object keys are strings: a token id may key a mapping (logit_bias).
        return msgspec.convert(params, type_, str_keys=True)
    except RecursionError:
        raise EngineClientError(Code.INVALID_PARAMS, "params nested too deeply") from None
    except msgspec.ValidationError as exc:
        path, message = explain(exc, root=type_)
        raise EngineClientError(Code.INVALID_PARAMS, f"{path}: {message}" if path else message,
                                {"field": path} if path else None) from None

"""msgpack encoding for mailboxes and length-prefixed frames for IPC pipes.

The same bytes cross a mailbox and a process boundary. Decoding is where schemas are
checked: a payload that does not match raises `DecodeError`, which callers turn into a
client error for the sender. This module never blocks and never does I/O itself.
"""

from __future__ import annotations

import struct
from typing import Any, Final, Generic, TypeVar

import msgspec

T = TypeVar("T")

_HEADER: Final = struct.Struct(">I")
HEADER_SIZE: Final = _HEADER.size
DEFAULT_MAX_FRAME: Final = 64 * 1024 * 1024

_encoder: Final = msgspec.msgpack.Encoder()
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

"""The msgpack codec and the length-prefixed frames that carry it across pipes."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.protocol.codec import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    DecodeError,
    Decoder,
    FrameError,
    FrameReader,
    encode,
    frame,
)
from corral.protocol.lifecycle import ExitReason, LifecycleEvent, Ping, Pong


class Chunk(msgspec.Struct, frozen=True, tag=True):
    text: str
    token_ids: list[int]
    logprob: float | None = None


Message = Ping | Pong | Chunk


def test_round_trip_through_a_tagged_union() -> None:
    decoder = Decoder(Message)
    for value in (Ping(3), Pong(4), Chunk("héllo", [1, 2, 3], -0.5), Chunk("", [])):
        decoded = decoder.decode(encode(value))
        assert decoded == value and type(decoded) is type(value)


def test_round_trip_of_a_lifecycle_event() -> None:
    event = LifecycleEvent("exited", "root/a", 1.5, ExitReason.from_exception(ValueError("x")),
                           attempt=2, delay_s=0.25)
    assert Decoder(LifecycleEvent).decode(encode(event)) == event


def test_decode_accepts_bytes_like_input() -> None:
    payload = encode(Ping(9))
    decoder = Decoder(Ping)
    assert decoder.decode(bytearray(payload)) == Ping(9)
    assert decoder.decode(memoryview(payload)) == Ping(9)


@pytest.mark.parametrize("payload", [
    encode(Chunk("x", [1])),            # a known struct, not in the expected type
    encode({"type": "Ping", "seq": "one"}),  # the right tag, a field of the wrong type
    encode({"type": "Nope"}),          # an unknown tag
    encode([1, 2, 3]),                 # not a struct at all
])
def test_wrong_schema_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        Decoder(Ping | Pong).decode(payload)
    assert str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01", b"not msgpack at all"])
def test_garbage_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        Decoder(Ping).decode(payload)
    assert isinstance(info.value, ValueError)  # callers may catch it as a ValueError


def test_decode_unchecked_raises_msgspec_errors() -> None:
    decode = Decoder(Ping).decode_unchecked
    assert decode(encode(Ping(1))) == Ping(1)
    with pytest.raises(msgspec.DecodeError):
        decode(b"\xc1")
    with pytest.raises(msgspec.ValidationError):
        decode(encode(Pong(1)))


# -- frames ------------------------------------------------------------------------------


def test_frame_prefixes_the_big_endian_length() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"") == b"\x00\x00\x00\x00"
    assert HEADER_SIZE == 4


def test_several_frames_in_one_chunk() -> None:
    payloads = [encode(Ping(i)) for i in range(5)] + [b""]
    reader = FrameReader()
    stream = b"".join(frame(p) for p in payloads) + frame(b"partial")[:6]
    assert reader.feed(stream) == payloads
    assert reader.pending == 6
    assert reader.feed(frame(b"partial")[6:]) == [b"partial"]
    assert reader.pending == 0


def test_a_frame_split_at_every_byte_boundary() -> None:
    payload = encode(Chunk("split me", list(range(20))))
    data = frame(payload) + frame(b"next")
    for cut in range(len(data) + 1):
        reader = FrameReader()
        got = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert got == [payload, b"next"], cut
        assert reader.pending == 0


def test_byte_by_byte() -> None:
    payloads = [encode(Pong(i)) for i in range(3)]
    reader = FrameReader()
    got = []
    for byte in b"".join(frame(p) for p in payloads):
        got += reader.feed(bytes([byte]))
    assert got == payloads


def test_an_oversize_frame_raises() -> None:
    reader = FrameReader(max_frame=16)
    assert reader.feed(frame(b"x" * 16)) == [b"x" * 16]  # exactly the limit is fine
    with pytest.raises(FrameError, match="17 bytes exceeds the limit of 16"):
        reader.feed(struct.pack(">I", 17))  # known from the header, before the body


def test_the_default_limit_rejects_a_huge_header() -> None:
    with pytest.raises(FrameError):
        FrameReader().feed(struct.pack(">I", DEFAULT_MAX_FRAME + 1))


@settings(max_examples=200, deadline=None)
@given(payloads=st.lists(st.binary(max_size=64), max_size=8), data=st.data())
def test_any_split_yields_the_same_frames(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader(max_frame=64)
    got: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += reader.feed(stream[start:end])
    assert got == payloads
    assert reader.pending == 0


@settings(max_examples=200, deadline=None)
@given(seq=st.integers(-(2**63), 2**64 - 1), text=st.text(max_size=50),
       ids=st.lists(st.integers(0, 2**31), max_size=20),
       logprob=st.none() | st.floats(allow_nan=False))
def test_round_trip_property(seq: int, text: str, ids: list[int], logprob: float | None) -> None:
    decoder = Decoder(Message)
    for value in (Ping(seq), Chunk(text, ids, logprob)):
        assert decoder.decode(FrameReader().feed(frame(encode(value)))[0]) == value

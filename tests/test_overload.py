"""300 streams at once against a `corral serve` process: none is lost (issue 21).

A chaos run once lost 15 of 300 simultaneous streams with no error (thread isolation,
32 active / 64 queued). Here each of four configurations (thread or process isolation,
the default limits or tight ones) takes 300 simultaneous streaming requests, five
times over, on new connections each time. Every request must end one of two ways:
- a 200 stream that ends with a finish reason and `[DONE]`, whose text equals every
  other served stream's (one prompt, greedy);
- a refusal before any token: 429 Overloaded with a Retry-After header.
Anything else is lost: a connection closed or reset without a reply, a stream cut
without its end, a 5xx, an error after the first token. After each round the next
request is served and the server logged nothing at error level.

Only 127.0.0.1; each round is bounded (every request has a 120 s deadline of its own).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import resource
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
import trio

from test_serve import Server, free_port

pytestmark = pytest.mark.slow

STREAMS = 300
ROUNDS = 5
BODY = json.dumps({"model": "tiny", "stream": True, "max_tokens": 12,
                   "messages": [{"role": "user", "content": "Tell me about the sea."}]}
                  ).encode()


@dataclass(frozen=True)
class Outcome:
    """How one request ended: `served` (with its text), `refused` (429 Overloaded
    with Retry-After) or `lost` (with what was seen)."""

    kind: str
    detail: str = ""


async def _one_stream(port: int) -> Outcome:
    """One streaming chat request on a new connection, read to its end."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as exc:
        return Outcome("lost", f"connect: {exc!r}")
    return await _exchange(stream, send=True)


async def _exchange(stream: trio.SocketStream, *, send: bool) -> Outcome:
    """The chat request on `stream` (sent now with `send`, else sent already as
    `_request_bytes`), its reply read to its end, then the stream closed."""
    async with stream:
        connection = h11.Connection(h11.CLIENT)
        headers = [("host", "127.0.0.1"), ("content-type", "application/json"),
                   ("content-length", str(len(BODY)))]
        data = connection.send(h11.Request(method="POST", target="/v1/chat/completions",
                                           headers=headers)) or b""
        data += connection.send(h11.Data(data=BODY)) or b""
        data += connection.send(h11.EndOfMessage()) or b""
        status, reply_headers, parts = 0, {}, bytearray()
        try:
            if send:
                await stream.send_all(data)
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    reply_headers = {bytes(k).decode(): bytes(v).decode()
                                     for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    parts += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return Outcome("lost", f"status {status}, then {event!r} "
                                           f"after {bytes(parts[-200:])!r}")
        except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError) as exc:
            return Outcome("lost", f"status {status}: {exc!r} after {bytes(parts[-200:])!r}")
    return _judged(status, reply_headers, bytes(parts))


def _judged(status: int, headers: dict[str, str], body: bytes) -> Outcome:
    if status == 429:
        error = json.loads(body)["error"]
        if error["code"] == "Overloaded" and int(headers.get("retry-after", "0")) >= 1:
            return Outcome("refused")
        return Outcome("lost", f"429 without Overloaded and Retry-After: {body!r}")
    if status != 200:
        return Outcome("lost", f"status {status}: {body[:300]!r}")
    lines = [line.removeprefix(b"data: ") for line in body.split(b"\n")
             if line.startswith(b"data: ")]
    if not lines or lines[-1] != b"[DONE]":
        return Outcome("lost", f"a stream without [DONE]: {body[-300:]!r}")
    chunks = [json.loads(line) for line in lines[:-1]]
    if any("error" in chunk for chunk in chunks):
        return Outcome("lost", f"an error after the first token: {body[-300:]!r}")
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    if finish[-1] not in ("stop", "length"):
        return Outcome("lost", f"a stream without a finish reason: {finish!r}")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"])
    return Outcome("served", text)


async def _round(port: int) -> list[Outcome]:
    outcomes: list[Outcome] = []

    async def one() -> None:
        with trio.move_on_after(120) as scope:
            outcomes.append(await _one_stream(port))
        if scope.cancelled_caught:
            outcomes.append(Outcome("lost", "no end within 120 s"))

    async with trio.open_nursery() as nursery:
        for _ in range(STREAMS):
            nursery.start_soon(one)
    return outcomes


CONFIGURATIONS = {
    "thread-32-64": ("thread", 32, 64),
    "process-32-64": ("process", 32, 64),
    "thread-4-8": ("thread", 4, 8),
    "process-4-8": ("process", 4, 8),
}


@pytest.fixture(params=list(CONFIGURATIONS), scope="module")
def server(request: pytest.FixtureRequest, model_path: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int, int]]:
    isolation, active, queued = CONFIGURATIONS[request.param]
    config = tmp_path_factory.mktemp("overload") / "runtime.yaml"
    config.write_text(f"generation:\n  isolation: {isolation}\n"
                      f"stream_registry:\n  max_active_streams: {active}\n"
                      f"  max_queued: {queued}\n"
                      "logging:\n  format: json\n")
    port = free_port()
    served = Server(["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{port}"],
                    Path(config))
    try:
        served.wait_ready()
        yield served, port, active
    finally:
        served.stop()


@pytest.mark.parametrize("round_", range(1, ROUNDS + 1))
def test_300_simultaneous_streams_lose_none(server: tuple[Server, int, int],
                                            round_: int) -> None:
    served, port, active = server
    outcomes = trio.run(_round, port)
    kinds = collections.Counter(o.kind for o in outcomes)
    lost = [o.detail for o in outcomes if o.kind == "lost"]
    assert lost == [], (kinds, lost[:5])
    assert kinds["served"] + kinds["refused"] == STREAMS
    assert kinds["served"] >= active  # the admitted ones at least were all served
    texts = {o.detail for o in outcomes if o.kind == "served"}
    assert len(texts) == 1, texts  # one prompt, greedy: one text
    after = trio.run(_one_stream, port)  # the next request is served
    assert after == Outcome("served", texts.pop())
    errors = [line for line in served.lines
              if '"level": "error"' in line or '"log_level": "error"' in line
              or "Traceback" in line]
    assert errors == []


# -- what the overload runs found ------------------------------------------------------------


def _limited_open_files(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_low_open_file_limit_neither_fails_the_load_nor_is_lowered(
        model_path: str, tmp_path: Path, isolation: str) -> None:
    """Importing mlx_lm sets the open-file limit to (2048, 4096): under a hard limit
    below 4096 (`ulimit -n 256`, a systemd unit's LimitNOFILE) that raised ValueError
    and no model could load; above 2048 it lowered the soft limit. Both processes keep
    the limit they were given, and the model serves."""
    config = tmp_path / "runtime.yaml"
    config.write_text(f"generation:\n  isolation: {isolation}\nlogging:\n  format: json\n")
    port = free_port()
    server = Server(["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{port}"],
                    config, preexec_fn=_limited_open_files(256))
    try:
        server.wait_ready()
        served = trio.run(_one_stream, port)
        assert served.kind == "served", served
        # 300 at once past the connection cap (128, half the limit): refused, not lost.
        outcomes = trio.run(_round, port)
        assert [o.detail for o in outcomes if o.kind == "lost"] == []
        assert {o.detail for o in outcomes if o.kind == "served"} == {served.detail}
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        assert re.search(r"Max open files\s+256\s+256", limits), limits
    finally:
        server.stop()


def test_a_connection_its_client_closed_frees_its_place_at_once(
        model_path: str, tmp_path: Path) -> None:
    """Hypercorn held a connection its client had closed until its keep-alive timeout
    (5 s), so clients that open and close connections quickly found the server at its
    connection cap with sockets nobody used: 429 for most of them."""
    config = tmp_path / "runtime.yaml"
    config.write_text("server:\n  max_connections: 8\n  keep_alive_timeout_ms: 60000\n"
                      "logging:\n  format: json\n")
    port = free_port()
    server = Server(["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{port}"], config)
    try:
        server.wait_ready()

        async def waves() -> list[list[str]]:
            kinds = []
            for _ in range(5):  # 5 waves of 8: each wave needs the last one's places
                outcomes: list[Outcome] = []
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(lambda: _append(outcomes, port))
                kinds.append(sorted(o.kind for o in outcomes))
                # The clients have closed: once the server has seen their EOF, no
                # connection is left open (counted by the server's sockets in /proc).
                with trio.fail_after(10):
                    while _established(server.process.pid, port):
                        await trio.sleep(0.01)
            return kinds

        assert trio.run(waves) == [["served"] * 8] * 5
    finally:
        server.stop()


async def _append(outcomes: list[Outcome], port: int) -> None:
    outcomes.append(await _one_stream(port))


def _established(pid: int, port: int) -> int:
    """The server's TCP connections on `port` not yet closed by it (any state but
    LISTEN: a socket in CLOSE_WAIT is a client's EOF the server has not acted on)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed since it was listed
            inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] != "0A" and f"socket:[{fields[9]}]" in inodes:
            count += 1
    return count


def test_a_request_waiting_unread_when_the_idle_timer_fires_is_served(
        model_path: str, tmp_path: Path) -> None:
    """The cause of the lost streams: Hypercorn closed a connection whose idle timer
    (`keep_alive_timeout`, running from accept to the first request) fired while the
    request sat unread in its socket, as it does when a loaded server reads late. The
    server is stopped (SIGSTOP) between the clients' connect and their request, for
    longer than the timer, and continued: every request is served."""
    config = tmp_path / "runtime.yaml"
    config.write_text("server:\n  keep_alive_timeout_ms: 1000\nlogging:\n  format: json\n")
    port = free_port()
    server = Server(["--model", f"tiny={model_path}", "--http", f"127.0.0.1:{port}"], config)
    try:
        server.wait_ready()

        async def late_requests() -> list[Outcome]:
            streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(8)]
            with trio.fail_after(10):
                while _established(server.process.pid, port) < 8:  # all accepted
                    await trio.sleep(0.01)
            server.process.send_signal(signal.SIGSTOP)
            try:
                for stream in streams:
                    await stream.send_all(_request_bytes())
                await trio.sleep(1.5)  # every idle timer is due when the server goes on
            finally:
                server.process.send_signal(signal.SIGCONT)
            outcomes: list[Outcome] = []
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(lambda s=stream: _append_reply(outcomes, s))
            return outcomes

        outcomes = trio.run(late_requests)
        assert [o.kind for o in outcomes] == ["served"] * 8, outcomes
    finally:
        server.stop()


def _request_bytes() -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\ncontent-length: "
            + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


async def _append_reply(outcomes: list[Outcome], stream: trio.SocketStream) -> None:
    """Read one reply (its request already sent) on `stream`, then close it."""
    outcomes.append(await _exchange(stream, send=False))

"""Failure domains over the wire: one transport child crashing leaves the others serving."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import trio

from corral.actors.child_spec import ChildSpec
from corral.config import config_from_mapping
from corral.metrics import Metrics
from corral.runtime import open_runtime
from corral.server.http import HttpServer
from corral.server.jsonrpc import JsonRpcListener


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_http_server_crashes_and_restarts_while_a_jsonrpc_stream_streams_on(
        model_path: str) -> None:
    config = config_from_mapping({"stream_registry": {"max_active_streams": 4}})
    async with open_runtime(config, models={"tiny": model_path}) as rt:
        port = _free_port()
        metrics = Metrics(rt)
        await rt.start_transport(ChildSpec(
            name="http", factory=lambda: HttpServer(rt, "127.0.0.1", port, metrics)))
        listener = JsonRpcListener(rt, "tcp://127.0.0.1:0")
        await rt.start_transport(listener.spec("jsonrpc"))
        assert listener.port is not None
        expected = (await rt.complete("tiny", "The river", max_tokens=300)).text

        stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
        request = {"jsonrpc": "2.0", "id": 1, "method": "generate",
                   "params": {"model": "tiny", "prompt": "The river", "max_tokens": 300}}
        await stream.send_all(json.dumps(request).encode() + b"\n")
        text: list[str] = []
        ended: dict[str, Any] = {}
        first_chunk = trio.Event()

        async def read_stream() -> None:
            buffer = b""
            while not ended:
                data = await stream.receive_some()
                assert data, "the JSON-RPC connection closed mid-stream"
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    message = json.loads(line)
                    if message.get("method") == "stream.chunk":
                        text.append(message["params"]["text"])
                        first_chunk.set()
                    elif message.get("method") in ("stream.end", "stream.error"):
                        ended.update(message)

        transport = rt.domain("transport")
        http_ref = rt.actor("root/transport/http")
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_stream)
                await first_chunk.wait()
                transport.kill_child("http")  # type: ignore[union-attr]
                reason = await http_ref.wait_exit()
                assert reason.abnormal
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                    while True:
                        try:
                            reply = await client.get("/v1/models", timeout=5)
                            break
                        except httpx.TransportError:
                            await trio.sleep(0.02)
                assert reply.status_code == 200
        assert ended["method"] == "stream.end"
        assert ended["params"]["finish_reason"] == "length"
        assert "".join(text) == expected
        assert http_ref.statistics().restarts == 1
        assert rt.actor("root/transport/jsonrpc").statistics().restarts == 0
        await stream.aclose()

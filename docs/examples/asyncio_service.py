"""Example 2: a circuit breaker and retries around an HTTP call, under asyncio.

A small asyncio HTTP server on 127.0.0.1 answers 503 to its first requests. The client
(httpx, as in a FastAPI app) retries with linear backoff inside a circuit breaker; a
second upstream that is down opens its breaker, and further calls fail fast with
CircuitBreakerOpenError instead of waiting on the network.
Run: python docs/examples/asyncio_service.py
"""

import asyncio

import httpx

from corral import CircuitBreakerOpenError, CircuitState, circuit_breaker, retry

failures_left = 2


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global failures_left
    await reader.readuntil(b"\r\n\r\n")
    status, body = (b"503 Service Unavailable", b"busy") if failures_left else (b"200 OK", b"hi")
    failures_left = max(0, failures_left - 1)
    writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: " + str(len(body)).encode()
                 + b"\r\nconnection: close\r\n\r\n" + body)
    await writer.drain()
    writer.close()


class Unavailable(ConnectionError):
    """A 503 from the upstream: a transport-level failure, so TransportError, retryable."""


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    guard = circuit_breaker("greeter", failure_threshold=3, recovery_timeout_ms=30_000)

    @guard
    @retry(max_attempts=4, strategy="linear", initial_delay_ms=20, max_delay_ms=100,
           retryable_errors=["TransportError", "Timeout"])
    async def greet(client: httpx.AsyncClient, url: str) -> str:
        response = await client.get(url)
        if response.status_code == 503:
            raise Unavailable("503 from upstream")
        return response.text

    async with httpx.AsyncClient(timeout=2.0) as client:
        print("greeter says", await greet(client, f"http://127.0.0.1:{port}/"))
        dead = circuit_breaker("dead-upstream", failure_threshold=2)
        for attempt in range(4):
            try:
                await dead.arun(client.get, "http://127.0.0.1:9/")  # nothing listens on 9
            except httpx.ConnectError as exc:
                print(f"call {attempt}: connect failed ({type(exc).__name__})")
            except CircuitBreakerOpenError as exc:
                print(f"call {attempt}: failed fast, retry after {exc.retry_after_ms} ms")
        assert dead.breaker.state is CircuitState.OPEN
    server.close()
    await server.wait_closed()
    print("ok")


if __name__ == "__main__":
    asyncio.run(main())

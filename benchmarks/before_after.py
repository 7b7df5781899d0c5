"""Before and after a change: two source trees of corral, one model, measured side by side.

    python benchmarks/before_after.py BEFORE_SRC AFTER_SRC MODEL_DIR [ROUNDS]

Two measurements, each alternating the trees round by round (the order flips every
round) so that drift of the machine falls on both alike:
- `corral serve` on its defaults, c=1: 8 streamed chat completions of 64 tokens per
  round against each tree's server (both servers start first; only one works at a
  time); output tokens per second and TTFT p50;
- embedded generation: a fresh process per tree and round runs 32 concurrent
  completions of 64 tokens through `open_runtime`; output tokens per second.

It prints the medians and the ratio after/before. Only 127.0.0.1; nothing is written.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

_EMBEDDED = """
import sys, time, trio, corral
async def main():
    async with corral.open_runtime(models={"m": sys.argv[1]}) as rt:
        await rt.complete("m", "warm up", max_tokens=8)
        started, tokens = time.perf_counter(), 0
        async def one(i):
            nonlocal tokens
            done = await rt.complete("m", f"The river {i}", max_tokens=64)
            tokens += done.usage.completion_tokens  # read after the await, not before
        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(one, i)
        print(tokens / (time.perf_counter() - started))
trio.run(main)
"""
_BODY = {"model": "m", "max_tokens": 64, "stream": True,
         "messages": [{"role": "user", "content": "Tell me about the sea."}]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(port: int) -> None:
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server on port {port} did not become ready")


def _serve_round(port: int) -> tuple[float, list[float]]:
    tokens, ttfts, started = 0, [], time.perf_counter()
    for _ in range(8):
        sent, first = time.perf_counter(), None
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                          json=_BODY, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    first = first or time.perf_counter() - sent
                    tokens += 1
        ttfts.append(first or 0.0)
    return tokens / (time.perf_counter() - started), ttfts


def main() -> None:
    before, after, model = sys.argv[1:4]
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    trees = {"before": before, "after": after}
    ports = {name: _free_port() for name in trees}
    servers = {name: subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "serve", "--model", f"m={model}",
         "--http", f"127.0.0.1:{ports[name]}"], env={**os.environ, "PYTHONPATH": src},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, src in trees.items()}
    serve = {name: [] for name in trees}
    ttft = {name: [] for name in trees}
    embedded = {name: [] for name in trees}
    try:
        for port in ports.values():
            _wait_ready(port)
        for index in range(rounds):
            order = list(trees) if index % 2 == 0 else list(reversed(trees))
            for name in order:
                rate, ttfts = _serve_round(ports[name])
                serve[name].append(rate)
                ttft[name] += ttfts
    finally:
        for server in servers.values():
            server.kill()
    for index in range(rounds):
        order = list(trees) if index % 2 == 0 else list(reversed(trees))
        for name in order:
            out = subprocess.run([sys.executable, "-c", _EMBEDDED, model], check=True,
                                 capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": trees[name]})
            embedded[name].append(float(out.stdout.split()[-1]))
    for name in trees:
        print(f"{name}: serve c=1 {statistics.median(serve[name]):.1f} tok/s, TTFT p50 "
              f"{1000 * statistics.median(ttft[name]):.1f} ms; embedded "
              f"{statistics.median(embedded[name]):.0f} tok/s")
    print(f"after/before: serve {statistics.median(serve['after']) / statistics.median(serve['before']):.3f}, "
          f"embedded {statistics.median(embedded['after']) / statistics.median(embedded['before']):.3f}")


if __name__ == "__main__":
    main()

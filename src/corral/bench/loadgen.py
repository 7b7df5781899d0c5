"""The load generator of `corral bench serve` and `corral bench chaos`, and its metrics.

An OpenAI-API client on trio and httpx: it streams `/v1/completions` with `stream: true`
and `stream_options: {include_usage: true}` (both corral and mlx_lm.server honour them),
and records, per request, when it was sent, when each content chunk arrived, when it
ended and how (completed, failed with a code, lost, hung). From those records it
computes what vLLM's `bench serve` reports: TTFT, TPOT, ITL and end-to-end latency
(mean, p50, p90, p99), request and output-token throughput, and goodput for SLOs.

It must never import corral's server, runtime or protocol code: it measures what any
HTTP client would see, the same way for every target.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

import httpx
import msgspec
import trio

from corral.bench.report import percentile

__all__ = ["Load", "Record", "Slo", "Target", "arrival_offsets", "random_prompts",
           "run_load", "stream_request", "summarize"]

Outcome = Literal["completed", "failed", "lost", "hung"]

# Plain words for prompts: any byte-level tokenizer encodes them, and no prompt is a
# prefix of another, so no server's prompt cache serves one request from another's.
_WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "river", "valley",
    "spring", "water", "cold", "clear", "window", "rain", "book", "morning", "station",
    "newspaper", "train", "library", "weekday", "report", "friday", "meeting", "team",
    "project", "office", "children", "castle", "sand", "beach", "waves", "winter", "mountain",
    "snow", "road", "museum", "recipe", "eggs", "flour", "salt", "music", "room", "dance",
    "scientist", "ocean", "bridge", "summer", "truck", "traffic", "cat", "garden", "sun",
    "post", "apple", "tree", "fence", "computer", "update", "file", "writing", "reader",
    "boat", "harbor", "fog", "doctor", "sleep", "star", "grandmother", "village", "bread",
    "bakery", "school", "teacher", "server", "client", "engine", "pilot", "bird", "flower",
    "letter", "friend", "market", "fish", "cheese", "storm", "street", "language", "painting",
    "light", "concert", "company", "engineer", "city", "candle", "brother", "soup", "trail",
    "lake", "noon",
]


class Target(msgspec.Struct, frozen=True):
    """An OpenAI-compatible server: its base URL and the `model` field to send (None:
    leave the field out, which mlx_lm.server reads as its default model)."""

    name: str
    base_url: str
    model: str | None = None


class Load(msgspec.Struct, frozen=True):
    """Fixed concurrency (`concurrency` requests in flight, a new one as one ends) or
    Poisson arrivals at `rate` requests/s with no cap on concurrency, as vLLM's
    `--max-concurrency` and `--request-rate`. A fixed-concurrency load with a
    `duration_s` starts requests until that many seconds have passed, however many
    (`requests` is then only the number of distinct prompts)."""

    kind: Literal["concurrency", "poisson"]
    requests: int
    concurrency: int = 0
    rate: float = 0.0
    duration_s: float | None = None

    def sends_more(self, started: float, now: float, sent: int) -> bool:
        """Whether a load that started at `started` and has `sent` requests sends
        another at `now`."""
        if self.duration_s is not None and self.kind == "concurrency":
            return now < started + self.duration_s
        return sent < self.requests

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.kind == "concurrency" else f"{self.rate:g} req/s"


class Slo(msgspec.Struct, frozen=True):
    """Service-level objectives for goodput, in ms, as vLLM's `--goodput`; None: no bound."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None


class Record(msgspec.Struct):
    """One request as the client saw it; times are `time.perf_counter()` seconds.

    `chunk_times` holds the arrival of every SSE event that carried text (a chunk may
    hold more than one token). `output_tokens` is the usage's `completion_tokens` when
    the server sent it, else the number of such chunks. `code` names how a request that
    did not complete ended: the error body's `code` (or `HTTP <status>` when it has
    none), or the exception that cut a lost request short.
    """

    index: int
    sent: float = math.nan
    chunk_times: list[float] = msgspec.field(default_factory=list)
    ended: float = math.nan
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    outcome: Outcome = "lost"
    code: str | None = None
    text: str = ""

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.ended - self.sent

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, as vLLM defines it."""
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)


class LoadRun(msgspec.Struct, frozen=True):
    """The records of one load against one target, with its wall time and the client's
    own CPU time (to show the load generator was not the bottleneck)."""

    target: str
    load: Load
    records: list[Record]
    started: float
    ended: float
    client_cpu_s: float


def random_prompts(count: int, *, seed: int, min_words: int, max_words: int) -> list[str]:
    """`count` prompts of random words, the same for the same arguments."""
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words,
                                                                              max_words)))
            for i in range(count)]


def arrival_offsets(load: Load, *, seed: int) -> list[float]:
    """Seconds from the load's start at which each request is sent under Poisson arrivals
    (exponential gaps at `load.rate`); all zeros for fixed concurrency."""
    if load.kind == "concurrency":
        return [0.0] * load.requests
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(load.requests):
        offsets.append(t)
        t += rng.expovariate(load.rate)
    return offsets


def _body(target: Target, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if target.model is not None:
        body["model"] = target.model
    return body


def _error_code(payload: Any, status: int) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return str(error["code"])
    return f"HTTP {status}"


def _apply_event(record: Record, data: bytes, now: float) -> bool:
    """Fold one SSE `data:` payload into `record`; True when it ends the stream."""
    if data == b"[DONE]":
        record.outcome = "completed" if record.finish_reason is not None else "lost"
        if record.outcome == "lost":
            record.code = "no finish_reason"
        return True
    event = msgspec.json.decode(data)
    if "error" in event:
        record.outcome, record.code = "failed", _error_code(event, 200)
        return True
    for choice in event.get("choices") or ():
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text:
            record.chunk_times.append(now)
            record.text += text
        if choice.get("finish_reason") is not None:
            record.finish_reason = choice["finish_reason"]
    usage = event.get("usage")
    if usage:
        record.output_tokens = int(usage["completion_tokens"])
        record.prompt_tokens = int(usage["prompt_tokens"])
        details = usage.get("prompt_tokens_details") or {}
        if "cached_tokens" in details:
            record.cached_tokens = int(details["cached_tokens"])
    return False


async def stream_request(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                         record: Record) -> None:
    """POST one streaming completion or chat completion (`body` as the OpenAI API
    takes it) and fill `record` from its SSE events, except `outcome` on a hang."""
    record.sent = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                raw = await response.aread()
                try:
                    payload = msgspec.json.decode(raw)
                except msgspec.DecodeError:
                    payload = None
                record.outcome, record.code = "failed", _error_code(payload,
                                                                   response.status_code)
                return
            buffer = b""
            async for raw in response.aiter_raw():
                now = time.perf_counter()
                buffer += raw.replace(b"\r\n", b"\n") if b"\r" in raw else raw
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        # Comments (mlx_lm.server's ": keepalive") carry no data.
                        if line.startswith(b"data:") and _apply_event(
                                record, line[5:].strip(), now):
                            return
            record.outcome, record.code = "lost", "stream ended without [DONE]"
    except (httpx.HTTPError, OSError, msgspec.DecodeError) as exc:
        record.outcome, record.code = "lost", type(exc).__name__
    finally:
        _ended(record)


def _ended(record: Record) -> None:
    """Stamp the end; a completed stream with no usage counts its text chunks."""
    record.ended = time.perf_counter()
    if record.outcome == "completed" and not record.output_tokens:
        record.output_tokens = len(record.chunk_times)


async def run_load(target: Target, prompts: Sequence[str], load: Load, *, max_tokens: int,
                   timeout_s: float, seed: int = 0,
                   on_done: Callable[[Record], None] = lambda record: None) -> LoadRun:
    """Run `load` against `target` with `prompts[i % len(prompts)]` as request i; return
    the records. A load with a `duration_s` sends requests until its time is up.

    A request not ended `timeout_s` after it was sent is cancelled and counted as hung;
    its connection is closed. Every request gets a record, so none goes uncounted.
    `on_done` is called as each request ends (for a progress bar).
    """
    offsets = arrival_offsets(load, seed=seed)
    timed = load.duration_s is not None and load.kind == "concurrency"
    records = [] if timed else [Record(i) for i in range(load.requests)]
    connections = load.concurrency if load.kind == "concurrency" else load.requests
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # No read timeout of httpx's own: the request's deadline alone decides a hang.
    timeout = httpx.Timeout(None, connect=min(timeout_s, 10.0))

    async def one(client: httpx.AsyncClient, i: int) -> None:
        record = records[i]
        with trio.move_on_after(timeout_s) as scope:
            await stream_request(client, f"{target.base_url}/v1/completions",
                                 _body(target, prompts[i % len(prompts)], max_tokens), record)
        if scope.cancelled_caught:
            record.outcome, record.code = "hung", "client timeout"
            record.ended = time.perf_counter()
        on_done(record)

    cpu = time.process_time()
    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client, \
            trio.open_nursery() as nursery:
        if load.kind == "concurrency":
            sent = 0

            async def worker() -> None:
                nonlocal sent
                while load.sends_more(started, time.perf_counter(), sent):
                    i, sent = sent, sent + 1
                    if timed:
                        records.append(Record(i))
                    await one(client, i)

            for _ in range(load.concurrency if timed
                           else min(load.concurrency, load.requests)):
                nursery.start_soon(worker)
        else:
            for i, offset in enumerate(offsets):
                await trio.sleep(max(0.0, started + offset - time.perf_counter()))
                nursery.start_soon(one, client, i)
    return LoadRun(target.name, load, records, started, time.perf_counter(),
                   time.process_time() - cpu)


def _stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, p50, p90, p99 of seconds, in ms (NaN when there are none)."""
    ms = [v * 1e3 for v in values]
    return {"mean": sum(ms) / len(ms) if ms else math.nan,
            "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99)}


def _meets(record: Record, slo: Slo) -> bool:
    checks = ((slo.ttft_ms, record.ttft), (slo.tpot_ms, record.tpot),
              (slo.e2e_ms, record.e2e))
    return all(bound is None or (value is not None and value * 1e3 <= bound)
               for bound, value in checks)


def summarize(records: Sequence[Record], duration_s: float, slo: Slo) -> dict[str, Any]:
    """vLLM's `bench serve` figures over `records` of a load that took `duration_s`.

    Latencies are of completed requests only; ITL is the gap between consecutive
    chunks of one request. Throughputs divide by the whole load's wall time.
    """
    completed = [r for r in records if r.outcome == "completed"]
    output = sum(r.output_tokens for r in completed)
    itls = [b - a for r in completed for a, b in zip(r.chunk_times, r.chunk_times[1:],
                                                       strict=False)]
    not_completed = Counter(f"{r.outcome}: {r.code}" for r in records
                            if r.outcome != "completed")
    return {
        "requests": len(records),
        "completed": len(completed),
        "failed": sum(r.outcome == "failed" for r in records),
        "lost": sum(r.outcome == "lost" for r in records),
        "hung": sum(r.outcome == "hung" for r in records),
        "errors": dict(not_completed),
        "duration_s": duration_s,
        "output_tokens": output,
        "mean_output_tokens": output / len(completed) if completed else math.nan,
        "request_throughput": len(completed) / duration_s,
        "output_throughput": output / duration_s,
        "goodput": sum(_meets(r, slo) for r in completed) / duration_s,
        "ttft_ms": _stats([r.ttft for r in completed if r.ttft is not None]),
        "tpot_ms": _stats([r.tpot for r in completed if r.tpot is not None]),
        "itl_ms": _stats(itls),
        "e2e_ms": _stats([r.e2e for r in completed]),
    }

"""Example 4: the embedded runtime under trio: typed errors, retries that honour
retry-after, and the rolling error metrics.

Three requests race for one generation slot with no queue: two are refused with
Overloaded (retryable, with retry_after_ms), and `retry` waits the advised time and
gets them through. A bad request is InvalidParams: never retried. Pass a model
directory, or the tiny test model is built in a temporary directory.
Run: python docs/examples/embedded_overload.py [MODEL_DIR]
"""

import sys
import tempfile

import trio

from corral import Code, CorralError, open_runtime, retry
from corral.config import config_from_mapping
from corral.tiny import make_tiny_model


async def main(model: str) -> None:
    config = config_from_mapping({"stream_registry": {
        "max_active_streams": 1, "max_queued": 0, "overloaded_retry_after_ms": 50}})
    patient = retry(max_attempts=20, strategy="fixed", initial_delay_ms=10,
                    retryable_errors=["Overloaded", "Timeout"])
    async with open_runtime(config, models={"tiny": model}) as rt:
        async def ask(n: int) -> None:
            completion = await patient.arun(rt.complete, "tiny", f"Request {n}:",
                                            max_tokens=8)
            print(f"request {n}: {completion.usage.completion_tokens} tokens")

        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(ask, n)
        stats = patient.statistics()
        print(f"{stats.calls} calls, {stats.attempts - stats.calls} retries after Overloaded")
        try:
            await patient.arun(rt.complete, "tiny", "", max_tokens=8)
        except CorralError as error:
            assert error.code is Code.INVALID_PARAMS
            print(f"{error.code.value} (HTTP {error.spec.http}, JSON-RPC {error.spec.jsonrpc}):"
                  f" {error.message}; retryable={error.retryable}")
        window = rt.resilience().windows.rates["1m"]
        print(f"last minute: {window.successes} ok, errors by code {window.errors_by_code}")
    print("ok")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        trio.run(main, sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as directory:
            trio.run(main, str(make_tiny_model(directory)))

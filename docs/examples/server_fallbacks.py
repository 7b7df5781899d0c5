"""Example 5: a model whose fallbacks end in a cached and a default response.

While the model's circuit is open (forced open here, as an operator would during an
incident), a request seen before gets its last good completion, and any other request
gets the default text. `Completion.fallback` (and, over HTTP, the X-Corral-Fallback
header) says which one answered. Pass a model directory, or the tiny test model is
built in a temporary directory.
Run: python docs/examples/server_fallbacks.py [MODEL_DIR]
"""

import sys
import tempfile

import trio

from corral import open_runtime
from corral.config import config_from_mapping
from corral.tiny import make_tiny_model


async def main(model: str) -> None:
    config = config_from_mapping({"generation": {"models": [
        {"alias": "chat", "path": model,
         "fallbacks": [{"cached_ttl_ms": 600_000},
                       {"default": "The assistant is busy; please try again."}]}]}})
    async with open_runtime(config) as rt:
        live = await rt.complete("chat", "Hello", max_tokens=6)
        print(f"live:    {live.text!r} (fallback={live.fallback})")
        rt.circuit_breaker("chat").force_open()
        cached = await rt.complete("chat", "Hello", max_tokens=6)
        print(f"cached:  {cached.text!r} (fallback={cached.fallback})")
        assert cached.text == live.text
        other = await rt.complete("chat", "Something new", max_tokens=6)
        print(f"default: {other.text!r} (fallback={other.fallback})")
        rt.circuit_breaker("chat").reset()
        print("served by fallbacks:", rt.resilience().fallbacks_total)
    print("ok")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        trio.run(main, sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as directory:
            trio.run(main, str(make_tiny_model(directory)))

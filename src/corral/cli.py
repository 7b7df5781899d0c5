"""The `corral` command line: make-tiny-model, check-config and bench.

Each command parses its options and calls one function of the library; none holds logic
of its own. A bad configuration exits non-zero with the errors, one per line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="corral: a fault-tolerant runtime for serving language models with MLX.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks, measured side by side.")
app.add_typer(bench_app, name="bench")

SmokeOption = Annotated[bool, typer.Option("--smoke", help="A handful of iterations.")]
OutputOption = Annotated[Path | None, typer.Option("--output-dir",
                                                   help="Where to write the JSON result.")]


@app.command("make-tiny-model")
def make_tiny_model(directory: Path, seed: int = 0) -> None:
    """Build the small offline llama model (random weights, local tokenizer) in DIRECTORY."""
    from corral.tiny import make_tiny_model as make

    path = make(directory, seed=seed)
    typer.echo(str(path))


@app.command("check-config")
def check_config(path: Path, env: Annotated[str | None, typer.Option(
        help="Environment overlay; defaults to $CORRAL_ENV.")] = None) -> None:
    """Print the resolved configuration of PATH, or its errors (exit code 1)."""
    from corral.config import ConfigError, load_config, render_config

    try:
        config = load_config(path, env=env)
    except ConfigError as exc:
        for error in exc.errors:
            typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    sys.stdout.write(render_config(config))


def _quiet_logs() -> None:
    from corral.config import LoggingConfig
    from corral.logging import configure_logging

    configure_logging(LoggingConfig(level="error"))


@bench_app.command("actors")
def bench_actors(smoke: SmokeOption = False, output_dir: OutputOption = None) -> None:
    """Mailbox tell/ask against raw trio channels; restart latency."""
    from corral.bench import actors

    _quiet_logs()
    actors.main(smoke=smoke, output_dir=output_dir)


@bench_app.command("resilience")
def bench_resilience(smoke: SmokeOption = False, output_dir: OutputOption = None) -> None:
    """Breaker and retry overhead per call; the retry storm per jitter mode."""
    from corral.bench import resilience

    _quiet_logs()
    resilience.main(smoke=smoke, output_dir=output_dir)

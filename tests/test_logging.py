"""Tests for corral.logging: JSON events, bound context, level filtering."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import structlog

from corral.config import LoggingConfig
from corral.logging import bind_request, configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_event_carries_bound_context() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="info"), stream=stream)
    log = get_logger(actor="/root/generation")
    with bind_request("req-1"):
        log.info("actor.restarted", attempt=2)
    log.info("actor.stopped")
    first, second = _lines(stream)
    assert first["event"] == "actor.restarted"
    assert first["actor"] == "/root/generation"
    assert first["request_id"] == "req-1"
    assert first["attempt"] == 2
    assert first["level"] == "info"
    assert "timestamp" in first
    assert second["event"] == "actor.stopped"
    assert "request_id" not in second


def test_level_filtering() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="warning"), stream=stream)
    log = get_logger()
    log.debug("x.debug")
    log.info("x.info")
    log.warning("x.warning")
    log.error("x.error")
    assert [line["event"] for line in _lines(stream)] == ["x.warning", "x.error"]


def test_reconfigure_reaches_existing_loggers() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(LoggingConfig(format="json"), stream=first)
    log = get_logger(actor="a")
    log.info("one")
    configure_logging(LoggingConfig(format="json", level="debug"), stream=second)
    log.debug("two")
    assert [line["event"] for line in _lines(first)] == ["one"]
    assert [line["event"] for line in _lines(second)] == ["two"]


def test_console_format_writes_event_and_context() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="console", level="debug"), stream=stream)
    with bind_request("req-9"):
        get_logger(actor="/root").debug("breaker.opened", failures=5)
    text = stream.getvalue()
    assert "breaker.opened" in text
    assert "req-9" in text and "/root" in text and "failures=5" in text


def test_json_exception_is_structured() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json"), stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger().exception("engine.crashed")
    [line] = _lines(stream)
    assert line["event"] == "engine.crashed"
    assert line["exception"][0]["exc_type"] == "ValueError"


@pytest.mark.slow
def test_an_embedded_runtime_logs_warnings_only_unless_configured(model_path: str) -> None:
    """Info lines of a runtime embedded in a host program would crowd the host's own
    output: with `logging.level` unset it logs at warning; set, it logs at that level."""
    script = textwrap.dedent(f"""
        import sys, trio
        from corral.config import config_from_mapping
        from corral.runtime import open_runtime

        async def main(level):
            config = config_from_mapping({{"logging": {{"level": level}}}} if level else {{}})
            async with open_runtime(config, models={{"tiny": {model_path!r}}}) as rt:
                await rt.complete("tiny", "Hello", max_tokens=2)
            print("done", flush=True)

        trio.run(main, sys.argv[1] if len(sys.argv) > 1 else None)
    """)
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=120)
    assert quiet.stdout == "done\n" and quiet.stderr == "", quiet.stderr[-2000:]
    chatty = subprocess.run([sys.executable, "-c", script, "debug"], capture_output=True,
                            text=True, timeout=120)
    assert chatty.stdout == "done\n" and "actor.started" in chatty.stderr

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


_TOOLKIT_ALONE = textwrap.dedent("""
    import logging, sys
    import corral

    if sys.argv[1:] == ["host-logging"]:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(name)s %(levelname)s %(message)s")
        seen = []

        class Keep(logging.Handler):
            def emit(self, record):
                seen.append((record.name, record.event, record.fields))

        logging.getLogger("corral").addHandler(Keep())
    guard = corral.circuit_breaker("upstream", failure_threshold=2)

    def down():
        raise ConnectionRefusedError("down")

    for _ in range(2):
        try:
            guard.run(down)
        except ConnectionRefusedError:
            pass
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 2:
            raise ConnectionResetError("reset")
        return "ok"

    assert corral.retry(strategy="immediate").run(flaky) == "ok"
    assert guard.breaker.state is corral.CircuitState.OPEN
    if sys.argv[1:] == ["host-logging"]:
        [(name, event, fields)] = seen
        assert (name, event) == ("corral.breaker", "breaker.transition"), seen
        assert fields["circuit"] == "upstream" and fields["next"] == "open", fields
""")


def test_the_toolkit_alone_prints_nothing_and_logs_through_the_hosts_logging() -> None:
    """A breaker and a retry used on their own, with no logging configured, print nothing
    on stdout or stderr; once the host configures `logging`, the breaker's transition
    reaches it as a record of the `corral.breaker` logger."""
    alone = subprocess.run([sys.executable, "-c", _TOOLKIT_ALONE], capture_output=True,
                           text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert alone.stdout == "" and alone.stderr == ""
    hosted = subprocess.run([sys.executable, "-c", _TOOLKIT_ALONE, "host-logging"],
                            capture_output=True, text=True, timeout=120)
    assert hosted.returncode == 0, hosted.stderr[-2000:]
    assert hosted.stdout == ""
    assert ("corral.breaker INFO breaker.transition circuit=upstream previous=closed "
            "next=open") in hosted.stderr


def test_events_before_any_setup_go_to_the_standard_logging(
        caplog: pytest.LogCaptureFixture) -> None:
    structlog.reset_defaults()
    caplog.set_level("DEBUG", logger="corral.test")
    with bind_request("req-3"):
        get_logger("corral.test", actor="/a").bind(step=1).debug("x.happened", n=2)
    [record] = caplog.records
    assert record.getMessage() == "x.happened request_id=req-3 actor=/a step=1 n=2"
    assert record.fields == {"request_id": "req-3", "actor": "/a", "step": 1, "n": 2}

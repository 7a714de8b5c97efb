"""Logging: one pipeline for structlog and stdlib loggers, JSON or console, no locals."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime
from typing import Any

import pytest

from sagaworks.adapters.observability.logging import (
    bind_message_context,
    clear_message_context,
    configure_logging,
    get_logger,
)

pytestmark = pytest.mark.unit

SECRET = "postgresql://worker:hunter2-do-not-log@db/shop"
PASSWORD = "hunter2-do-not-log"


class TerminalStream(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_structlog_and_stdlib_lines_are_both_json() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream)

    get_logger("sagaworks.test").info("saga started", saga_id="s-1")
    logging.getLogger("faststream").warning("consumer %s paused", "orders")

    ours, library = json_lines(stream)
    assert ours["event"] == "saga started"
    assert ours["saga_id"] == "s-1"
    assert (ours["level"], ours["logger"]) == ("info", "sagaworks.test")
    assert library["event"] == "consumer orders paused"
    assert (library["level"], library["logger"]) == ("warning", "faststream")
    for line in (ours, library):
        stamp = datetime.fromisoformat(line["timestamp"])
        assert stamp.utcoffset() is not None
        assert stamp.utcoffset().total_seconds() == 0


def test_stdlib_extra_fields_reach_the_line() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream)

    logging.getLogger("sagaworks.outbox").warning(
        "outbox publish failed", extra={"rows": 3, "error": "DeliveryError: nack"}
    )

    (line,) = json_lines(stream)
    assert (line["rows"], line["error"]) == (3, "DeliveryError: nack")


def test_level_threshold_applies_to_both_kinds_of_logger() -> None:
    stream = io.StringIO()
    configure_logging("json", "WARNING", stream)

    get_logger("sagaworks.test").info("hidden")
    logging.getLogger("faststream").info("hidden too")
    get_logger("sagaworks.test").warning("shown")

    assert [line["event"] for line in json_lines(stream)] == ["shown"]


def test_noisy_libraries_stay_at_warning_even_at_info() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream)

    logging.getLogger("aiormq.connection").info("frame received")
    logging.getLogger("sqlalchemy.engine.Engine").info("SELECT 1")
    logging.getLogger("aiormq.connection").warning("connection lost")

    assert [line["event"] for line in json_lines(stream)] == ["connection lost"]


def test_message_context_is_on_every_line_until_cleared() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream)

    bind_message_context(message_id="m-42", correlation_id="order-7", saga_id="s-9")
    get_logger("sagaworks.worker").info("handling")
    logging.getLogger("faststream").info("library line while handling")
    clear_message_context()
    get_logger("sagaworks.worker").info("idle")

    handling, library, idle = json_lines(stream)
    for line in (handling, library):
        assert (line["message_id"], line["correlation_id"], line["saga_id"]) == (
            "m-42",
            "order-7",
            "s-9",
        )
    assert not {"message_id", "correlation_id", "saga_id"} & set(idle)


def _fail_with_a_secret_in_locals() -> None:
    database_url = SECRET
    password = PASSWORD
    raise RuntimeError(f"cannot connect ({len(database_url) + len(password)} chars)")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_never_show_frame_locals(fmt: Any) -> None:
    stream = io.StringIO()
    configure_logging(fmt, "INFO", stream)

    try:
        _fail_with_a_secret_in_locals()
    except RuntimeError:
        get_logger("sagaworks.worker").exception("handler failed")
        logging.getLogger("faststream").exception("library saw it too")

    output = stream.getvalue()
    assert output.count("_fail_with_a_secret_in_locals") >= 2, "the traceback must be rendered"
    assert "RuntimeError" in output
    assert PASSWORD not in output


def test_json_traceback_is_structured() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream)

    try:
        _fail_with_a_secret_in_locals()
    except RuntimeError:
        get_logger("sagaworks.worker").exception("handler failed")

    (line,) = json_lines(stream)
    assert line["level"] == "error"
    (raised,) = line["exception"]
    assert raised["exc_type"] == "RuntimeError"
    assert raised["frames"][-1]["name"] == "_fail_with_a_secret_in_locals"
    assert all("locals" not in frame for frame in raised["frames"])


def test_auto_is_console_on_a_terminal() -> None:
    stream = TerminalStream()
    configure_logging("auto", "INFO", stream)

    get_logger("sagaworks.test").info("saga started", saga_id="s-1")
    logging.getLogger("faststream").info("library line")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "saga started" in lines[0]
    assert "saga_id" in lines[0]
    assert "s-1" in lines[0]
    assert "library line" in lines[1]
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)


def test_auto_is_json_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("auto", "INFO", stream)

    get_logger("sagaworks.test").info("saga started")

    (line,) = json_lines(stream)
    assert line["event"] == "saga started"


def test_console_is_forced_even_off_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("console", "INFO", stream)

    get_logger("sagaworks.test").info("saga started")

    assert "saga started" in stream.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(stream.getvalue())


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_urls_in_any_line_are_masked_in_userinfo_and_query(fmt: str) -> None:
    stream = TerminalStream() if fmt == "console" else io.StringIO()
    configure_logging(fmt, "INFO", stream)  # type: ignore[arg-type]

    logging.getLogger("aio_pika.robust_connection").warning(
        'Connection attempt to "%s" failed', f"amqps://svc:{PASSWORD}@broker/?cafile=/ca.pem"
    )
    get_logger("sagaworks.test").error(
        "database lost", url=f"postgresql://u@db/shop?sslmode=require&password={PASSWORD}"
    )
    error = ConnectionError(f"cannot reach {SECRET}")
    logging.getLogger("sagaworks.test").error("failed", exc_info=error)

    output = stream.getvalue()
    assert PASSWORD not in output
    assert "amqps://svc:***@broker/?cafile=/ca.pem" in output
    assert "postgresql://u@db/shop?sslmode=require&password=***" in output
    assert "postgresql://worker:***@db/shop" in output

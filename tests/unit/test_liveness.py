"""Silent partitions: the heartbeat in the URL, the statement deadlines, one log line per outage."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiormq.exceptions import AMQPConnectionError
from structlog.testing import capture_logs

from sagaworks.adapters.postgres.deadlines import SessionDeadlines
from sagaworks.adapters.rabbitmq.liveness import ConnectionWatch, with_heartbeat
from sagaworks.entrypoints.outages import OutageLog

pytestmark = pytest.mark.unit


def test_the_heartbeat_joins_the_url_query_unless_the_url_names_one() -> None:
    assert with_heartbeat("amqp://u:p@h:5672/", 6) == "amqp://u:p@h:5672/?heartbeat=6"
    assert (
        with_heartbeat("amqps://u:p@h/v?cafile=/ca.pem", 6)
        == "amqps://u:p@h/v?cafile=/ca.pem&heartbeat=6"
    )
    assert with_heartbeat("amqp://h/?heartbeat=30", 6) == "amqp://h/?heartbeat=30"


def test_session_deadlines_are_sent_in_milliseconds_and_the_client_waits_longer() -> None:
    deadlines = SessionDeadlines(statement_timeout_s=10, idle_in_transaction_timeout_s=30)

    assert deadlines.server_settings() == {
        "statement_timeout": "10000",
        "idle_in_transaction_session_timeout": "30000",
    }
    assert deadlines.command_timeout_s > deadlines.statement_timeout_s


class _Connection:
    _close_called = False


def test_a_lost_broker_connection_is_logged_once_with_what_happened_and_its_return(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = ConnectionWatch("consumers", heartbeat_s=6)
    connection = _Connection()
    with caplog.at_level(logging.WARNING, logger="sagaworks.broker"):
        watch.on_close(connection, asyncio.CancelledError())
        for _ in range(5):  # every failed reconnection attempt closes again
            watch.on_close(connection, AMQPConnectionError("refused"))
        watch.on_reconnect(connection)

    lost, back = caplog.records
    assert lost.getMessage().startswith("broker connection lost")
    assert "missed heartbeats" in lost.__dict__["cause"]
    assert "21 s" in lost.__dict__["cause"]
    assert back.getMessage().startswith("broker connection restored")
    assert watch.losses == 1


def test_closing_the_connection_on_purpose_is_no_loss(caplog: pytest.LogCaptureFixture) -> None:
    watch = ConnectionWatch("publisher", heartbeat_s=6)
    closing = _Connection()
    closing._close_called = True
    with caplog.at_level(logging.WARNING, logger="sagaworks.broker"):
        watch.on_close(closing, asyncio.CancelledError())

    assert not caplog.records
    assert watch.losses == 0


def test_an_outage_is_logged_when_it_starts_and_when_it_ends_not_at_every_failed_poll() -> None:
    outages = OutageLog((OSError,), deadline_s=12)
    with capture_logs() as logged:
        for _ in range(20):
            outages.failed("timers", TimeoutError())
        outages.succeeded()
        outages.succeeded()
        outages.failed("outbox sweep", ValueError("a bug"))
        outages.failed("outbox sweep", ValueError("a bug"))

    events = [entry["event"] for entry in logged]
    assert [e.split(":")[0] for e in events] == [
        "outage",
        "outage over",
        "outbox sweep failed; will retry",
        "outbox sweep failed; will retry",
    ]
    assert "no answer within 12 s" in logged[0]["cause"]
    assert logged[1]["failed_polls"] == 20

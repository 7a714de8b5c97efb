"""Noticing a dead broker connection quickly, and saying so once.

A network that silently drops packets gives a TCP connection no error for
many minutes: only AMQP heartbeats tell. aiormq declares a connection dead
when no frame arrived for `(heartbeat + 1) * 3` seconds, so the heartbeat
(`SAGAWORKS_AMQP_HEARTBEAT_S`, default 6 s: about 21 s) bounds how long a
partition goes unnoticed; RabbitMQ's default of 60 s took over three minutes.

`ConnectionWatch` is hung on a robust connection's close and reconnect
callbacks: it logs one warning when the connection is lost, naming what
happened, and one line when it is back, with the time it was down; the
reconnection attempts in between stay quiet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiormq.exceptions import ConnectionClosed

__all__ = ["ConnectionWatch", "with_heartbeat"]

_log = logging.getLogger("sagaworks.broker")


def with_heartbeat(url: str, heartbeat_s: int) -> str:
    """`url` with `heartbeat=<heartbeat_s>` in its query, unless it names one already."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "heartbeat" for name, _ in query):
        return url
    query.append(("heartbeat", str(heartbeat_s)))
    return urlunsplit(parts._replace(query=urlencode(query, safe="/:")))


def _what_happened(error: BaseException | None, heartbeat_s: float) -> str:
    if isinstance(error, asyncio.CancelledError | TimeoutError):
        return (
            f"no frame from the broker for over {(heartbeat_s + 1) * 3:g} s (missed heartbeats): "
            "the network is dropping traffic or the broker is frozen"
        )
    if isinstance(error, ConnectionClosed):
        return f"the broker closed the connection ({error})"
    if isinstance(error, ConnectionError):
        return f"the connection was reset ({type(error).__name__}: {error})"
    if error is None:
        return "the connection was closed"
    return f"{type(error).__name__}: {error}"


class ConnectionWatch:
    """Logs each loss of one robust connection once, and its return with the downtime."""

    def __init__(self, name: str, heartbeat_s: float) -> None:
        self.name = name
        self._heartbeat_s = heartbeat_s
        self._lost_at: float | None = None
        self.losses = 0

    @property
    def down_for_s(self) -> float | None:
        """Seconds since the connection was lost; None while it is up."""
        return None if self._lost_at is None else time.monotonic() - self._lost_at

    def on_close(self, sender: Any, error: BaseException | None = None) -> None:
        """aio-pika close callback: also called for each failed reconnection attempt.

        A close the program asked for is no loss; aio-pika marks it on the connection
        (`_close_called`) before it runs the callbacks, and says so no other way.
        """
        if self._lost_at is not None or getattr(sender, "_close_called", False):
            return
        self._lost_at = time.monotonic()
        self.losses += 1
        _log.warning(
            "broker connection lost; deliveries in hand cannot be acknowledged and will be "
            "redelivered; reconnecting",
            extra={"connection": self.name, "cause": _what_happened(error, self._heartbeat_s)},
        )

    def on_reconnect(self, _sender: Any) -> None:
        """aio-pika reconnect callback: the connection and its channels are restored."""
        if self._lost_at is None:
            return
        down_s = time.monotonic() - self._lost_at
        self._lost_at = None
        _log.warning(
            "broker connection restored; consuming again",
            extra={"connection": self.name, "down_s": round(down_s, 1)},
        )

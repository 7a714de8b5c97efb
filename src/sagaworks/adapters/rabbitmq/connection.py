"""Opening the broker connection: reconnect forever later, fail fast and clearly first.

Once a worker runs, a dropped connection must heal by itself, so the
connection is aio-pika's robust one. The first connection is different: a
wrong host, a stopped broker or a bad password will not fix themselves, and
a worker that keeps retrying them hides the mistake. aio-pika's robust
connection gives up on the first attempt for the errors it knows
(`fail_fast`, forced on here whatever the URL says); the deadline below
bounds everything else, such as a host that silently drops packets.

Failures become `BrokerUnreachable` or `BrokerAuthenticationFailed`, whose
messages name the host, port, user and vhost but never the password.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from aiormq.exceptions import (
    AMQPError,
    AuthenticationError,
    IncompatibleProtocolError,
    InvalidFrameError,
    ProbableAuthenticationError,
)

from sagaworks.adapters.rabbitmq.errors import BrokerAuthenticationFailed, BrokerUnreachable
from sagaworks.adapters.rabbitmq.frames import tolerate_undecodable_properties

__all__ = ["connect"]

_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    user: str
    vhost: str

    @classmethod
    def of(cls, url: str) -> _Target:
        parts = urlsplit(url)
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or _DEFAULT_PORTS.get(parts.scheme, 5672),
            user=unquote(parts.username) if parts.username else "guest",
            vhost=unquote(path) or "/",
        )


async def connect(url: str, *, timeout_s: float) -> AbstractRobustConnection:
    """Open a robust connection to `url` within `timeout_s` seconds, or explain why not.

    `timeout_s` also bounds every later reconnection attempt. Deliveries whose
    properties pamqp would refuse are read from then on (`frames.py`).
    """
    tolerate_undecodable_properties()
    target = _Target.of(url)
    connection = aio_pika.RobustConnection(make_url(url), fail_fast="1")
    try:
        async with asyncio.timeout(timeout_s):
            await connection.connect(timeout=timeout_s)
    except (OSError, AMQPError) as exc:
        await connection.close()
        raise _translate(exc, target, url, timeout_s) from exc
    except BaseException:
        await connection.close()
        raise
    return connection


def _translate(
    exc: OSError | AMQPError, target: _Target, url: str, timeout_s: float
) -> BrokerUnreachable | BrokerAuthenticationFailed:
    refused = _refusal(exc, target)
    if refused is not None:
        reason, advice = refused
        return BrokerAuthenticationFailed(
            host=target.host,
            port=target.port,
            user=target.user,
            vhost=target.vhost,
            url=url,
            reason=reason,
            advice=advice,
        )
    return BrokerUnreachable(
        host=target.host, port=target.port, url=url, reason=_unreachable(exc, timeout_s)
    )


def _refusal(exc: OSError | AMQPError, target: _Target) -> tuple[str, str] | None:
    """(reason, advice) if the broker answered and refused the user or the vhost."""
    if isinstance(exc, ProbableAuthenticationError):
        return (
            _text(exc, "the broker closed the connection during login"),
            "Check the user name and password",
        )
    if isinstance(exc, AuthenticationError):
        offered = exc.args[0] if exc.args else "none"
        return (
            f"the broker offers the authentication mechanisms {offered}, "
            "and the one requested is not among them",
            "Check the auth= parameter of SAGAWORKS_AMQP_URL",
        )
    if isinstance(exc, InvalidFrameError) and "Connection.OpenOk" in _text(exc, ""):
        # aiormq reports the broker's Connection.Close answer to Connection.Open this way.
        return (
            "the broker closed the connection when the vhost was opened",
            f'Check that vhost "{target.vhost}" exists (rabbitmqctl list_vhosts) and that '
            f'user "{target.user}" has permissions on it '
            f"(rabbitmqctl list_permissions -p {shlex.quote(target.vhost)})",
        )
    return None


def _unreachable(exc: OSError | AMQPError, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no AMQP session within {timeout_s:g} s (SAGAWORKS_AMQP_CONNECT_TIMEOUT_S)"
    if isinstance(exc, IncompatibleProtocolError | InvalidFrameError):
        return (
            "something answered but does not speak AMQP 0-9-1 "
            "(is this the AMQP port, and amqps:// for a TLS port?)"
        )
    if len(exc.args) == 2 and isinstance(exc.args[0], int) and exc.args[0] > 0:
        return os.strerror(exc.args[0])
    return _text(exc, type(exc).__name__)


def _text(exc: BaseException, default: str) -> str:
    """The human part of a client exception, whose last argument is usually the text."""
    if exc.args and isinstance(exc.args[-1], str) and exc.args[-1]:
        return exc.args[-1]
    return default

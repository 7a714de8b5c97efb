"""Opening the broker connection: reconnect forever later, fail fast and clearly first.

Once a worker runs, a dropped connection must heal by itself, so the
connection is aio-pika's robust one. The first connection is different: a
wrong host, a stopped broker or a bad password will not fix themselves, and
a worker that keeps retrying them hides the mistake. aio-pika's robust
connection gives up on the first attempt for the errors it knows
(`fail_fast`, forced on here whatever the URL says); the deadline below
bounds everything else, such as a host that silently drops packets.

Failures become `BrokerUnreachable`, `BrokerTlsFailed` or
`BrokerAuthenticationFailed`, whose messages name the host, port, user and
vhost but never the password.

TLS (`amqps://`) is aiormq's, configured by the URL's query, which the
worker's FastStream broker hands to aiormq unchanged too: the broker's
certificate is verified against `cafile` (else the system's CAs) and its
name against the URL's host; `certfile`/`keyfile` present a client
certificate; `no_verify_ssl=1` turns verification off. aiormq ignores these
on a plain `amqp://` URL and reports a missing file as a bare OSError, so
`check_tls_options` refuses both before any connection.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

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

from sagaworks.adapters.rabbitmq.errors import (
    BrokerAuthenticationFailed,
    BrokerTlsFailed,
    BrokerUnreachable,
    InvalidBrokerUrl,
)
from sagaworks.adapters.rabbitmq.frames import tolerate_undecodable_properties
from sagaworks.adapters.rabbitmq.liveness import ConnectionWatch, with_heartbeat

__all__ = ["TLS_FILE_OPTIONS", "broker_user", "check_tls_options", "connect"]

_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}

TLS_FILE_OPTIONS = ("cafile", "certfile", "keyfile")
"""Query parameters of an `amqps://` URL naming PEM files (`capath` names a folder)."""
_TLS_OPTIONS = (*TLS_FILE_OPTIONS, "capath", "cadata", "no_verify_ssl")


def check_tls_options(url: str) -> None:
    """Raise `InvalidBrokerUrl` if the URL's TLS options cannot work as written."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    given = [name for name in _TLS_OPTIONS if name in query]
    if given and parts.scheme != "amqps":
        raise InvalidBrokerUrl(
            url=url,
            problem=f"{', '.join(given)} only apply to TLS but the URL is {parts.scheme}://",
            remedy="use amqps:// (port 5671) or remove them",
        )
    if query.get("keyfile") and not query.get("certfile"):
        raise InvalidBrokerUrl(
            url=url,
            problem="keyfile is given without certfile",
            remedy="add certfile=<client certificate file>",
        )
    if query.get("no_verify_ssl", "0") not in {"0", "1"}:
        raise InvalidBrokerUrl(
            url=url,
            problem=f"no_verify_ssl={query['no_verify_ssl']} is neither 0 nor 1",
            remedy="leave it out (the broker's certificate is verified) or set 1 to skip that",
        )
    for name in TLS_FILE_OPTIONS:
        value = query.get(name)
        if value and not (Path(value).is_file() and os.access(value, os.R_OK)):
            raise InvalidBrokerUrl(
                url=url,
                problem=f"{name} file {value} does not exist or cannot be read",
                remedy=f"point {name}= at a readable PEM file",
            )


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


def broker_user(url: str) -> str:
    """The user a connection to `url` logs in as: what RabbitMQ accepts as its `user_id`."""
    return _Target.of(url).user


async def connect(
    url: str, *, timeout_s: float, heartbeat_s: int | None = None
) -> AbstractRobustConnection:
    """Open a robust connection to `url` within `timeout_s` seconds, or explain why not.

    `timeout_s` also bounds every later reconnection attempt. Deliveries whose
    properties pamqp would refuse are read from then on (`frames.py`). With
    `heartbeat_s`, a silent connection is noticed within about three heartbeats,
    and each loss and return is logged once (`liveness.py`).
    """
    check_tls_options(url)
    tolerate_undecodable_properties()
    target = _Target.of(url)
    opened = url if heartbeat_s is None else with_heartbeat(url, heartbeat_s)
    connection = aio_pika.RobustConnection(make_url(opened), fail_fast="1")
    try:
        async with asyncio.timeout(timeout_s):
            await connection.connect(timeout=timeout_s)
    except (OSError, AMQPError) as exc:
        await connection.close()
        raise _translate(exc, target, url, timeout_s) from exc
    except BaseException:
        await connection.close()
        raise
    if heartbeat_s is not None:  # from now on a close is a loss to report, not a bad URL
        watch = ConnectionWatch("publisher", heartbeat_s)
        connection.close_callbacks.add(watch.on_close)
        connection.reconnect_callbacks.add(watch.on_reconnect)
    return connection


def _translate(
    exc: OSError | AMQPError, target: _Target, url: str, timeout_s: float
) -> BrokerUnreachable | BrokerAuthenticationFailed | BrokerTlsFailed:
    tls = _tls_failure(exc)
    if tls is not None:
        reason, advice = tls
        return BrokerTlsFailed(
            host=target.host, port=target.port, url=url, reason=reason, advice=advice
        )
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


def _tls_failure(exc: BaseException) -> tuple[str, str] | None:
    """(reason, advice) if the TLS handshake failed; aiormq wraps the `ssl` error it got."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"the certificate the broker presented does not verify ({cause.verify_message})",
            "Check that cafile= names the CA that signed the broker's certificate, "
            "and that the URL's host is a name in that certificate",
        )
    if isinstance(cause, ssl.SSLError):
        return (
            f"the TLS handshake failed ({cause.reason or cause})",
            "Check that the port is the broker's TLS listener (5671) "
            "and the certfile=/keyfile= of the URL",
        )
    return None


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

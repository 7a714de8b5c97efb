"""Errors of the RabbitMQ adapter, worded for the operator who has to fix them.

The client library reports a refused login as a "probable authentication
error" and a topology mismatch as a closed channel with a reply text; an
operator at start-up needs to know which host, user, vhost, queue or
argument is wrong and what to do about it. Each error here carries those
facts as attributes (for code) and in its message (for people). No message
ever contains a password: URLs pass through `mask_url` before they are kept.
"""

from __future__ import annotations

import shlex
from typing import Literal

from sagaworks.settings import mask_url

__all__ = [
    "BrokerAuthenticationFailed",
    "BrokerTlsFailed",
    "BrokerUnreachable",
    "EntityKind",
    "InvalidBrokerUrl",
    "RabbitMQError",
    "TopologyConflict",
    "TopologyMissing",
]

EntityKind = Literal["queue", "exchange"]
"""What a `TopologyConflict` is about."""


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RabbitMQError(Exception):
    """Base of every error the RabbitMQ adapter raises on purpose."""


class BrokerUnreachable(RabbitMQError):
    """No AMQP session could be opened: refused, unresolvable, timed out or not AMQP."""

    def __init__(self, *, host: str, port: int, url: str, reason: str) -> None:
        self.host = host
        self.port = port
        self.masked_url = mask_url(url)
        self.reason = reason
        super().__init__(
            f"cannot reach RabbitMQ at {_endpoint(host, port)}: {reason.rstrip('.')}. "
            f"Check that RabbitMQ is running and reachable from here, and that "
            f"SAGAWORKS_AMQP_URL ({self.masked_url}) names the right host and port."
        )


class InvalidBrokerUrl(RabbitMQError):
    """A broker URL unusable as written: TLS files missing, or TLS options on a plain URL."""

    def __init__(self, *, url: str, problem: str, remedy: str) -> None:
        self.masked_url = mask_url(url)
        self.problem = problem
        super().__init__(f"invalid SAGAWORKS_AMQP_URL ({self.masked_url}): {problem}; {remedy}")


class BrokerTlsFailed(RabbitMQError):
    """The TLS handshake failed: most often a broker certificate that does not verify."""

    def __init__(self, *, host: str, port: int, url: str, reason: str, advice: str) -> None:
        self.host = host
        self.port = port
        self.masked_url = mask_url(url)
        self.reason = reason
        super().__init__(
            f"cannot open TLS to RabbitMQ at {_endpoint(host, port)}: {reason.rstrip('.')}. "
            f"{advice}. SAGAWORKS_AMQP_URL is {self.masked_url}"
        )


class BrokerAuthenticationFailed(RabbitMQError):
    """The broker answered but refused the user, or the user's access to the vhost."""

    def __init__(
        self, *, host: str, port: int, user: str, vhost: str, url: str, reason: str, advice: str
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.vhost = vhost
        self.masked_url = mask_url(url)
        self.reason = reason
        super().__init__(
            f'RabbitMQ at {_endpoint(host, port)} refused user "{user}" on vhost "{vhost}": '
            f"{reason.rstrip('.')}. {advice}. SAGAWORKS_AMQP_URL is {self.masked_url}"
        )


class TopologyConflict(RabbitMQError):
    """A queue or exchange already exists with other arguments than sagaworks declares.

    RabbitMQ never changes an existing queue's or exchange's arguments; it
    answers PRECONDITION_FAILED instead. `argument`, `existing` and `wanted`
    are parsed from the broker's reply (`None` for "not set"); when the reply
    could not be parsed `argument` is `None` and the message quotes the reply.
    """

    def __init__(
        self,
        *,
        kind: EntityKind,
        name: str,
        vhost: str,
        argument: str | None,
        existing: str | None,
        wanted: str | None,
        reply_text: str,
    ) -> None:
        self.kind = kind
        self.name = name
        self.vhost = vhost
        self.argument = argument
        self.existing = existing
        self.wanted = wanted
        self.reply_text = reply_text
        super().__init__(f"{self._problem()}: {self._remedy()}")

    def _problem(self) -> str:
        subject = f'{self.kind} "{self.name}"'
        if self.argument is None:
            return (
                f"{subject} exists with other arguments than sagaworks declares "
                f"(RabbitMQ: {self.reply_text})"
            )
        if self.existing is None:
            have = f"exists without {self.argument}"
        else:
            have = f"exists with {self.argument}={self.existing}"
        if self.wanted is None:
            want = f"sagaworks does not set {self.argument}"
        else:
            want = f"sagaworks declares {self.wanted}"
        return f"{subject} {have} but {want}"

    def _remedy(self) -> str:
        name = shlex.quote(self.name)
        vhost = shlex.quote(self.vhost)
        if self.kind == "queue":
            vhost_option = "" if self.vhost == "/" else f"-p {vhost} "
            remedy = (
                "drain and delete the queue "
                f"(rabbitmqctl delete_queue {vhost_option}{name} --if-empty) "
                "so that sagaworks re-creates it, "
                "or migrate it through a temporary queue (see docs/topology.md)"
            )
            if self.argument == "x-delivery-limit" and self.existing is not None:
                limit = "DELIVERY_LIMIT"
                if self.name.endswith("sagaworks.dead-letters"):
                    limit = "DEAD_LETTER_DELIVERY_LIMIT"
                remedy += f", or set SAGAWORKS_{limit}={self.existing}"
            return remedy
        vhost_option = "" if self.vhost == "/" else f"--vhost={vhost} "
        return (
            "find out which application declared the exchange; if it may go, delete it "
            f"(rabbitmqadmin {vhost_option}delete exchange name={name}, or the management UI; "
            "its bindings go with it) so that sagaworks re-creates it, "
            "or give sagaworks other names with SAGAWORKS_EXCHANGE_PREFIX"
        )


class TopologyMissing(RabbitMQError):
    """The worker does not declare topology, and a queue or exchange it needs does not exist."""

    def __init__(self, *, kind: EntityKind, name: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(
            f'{kind} "{name}" does not exist and this worker does not declare topology '
            '(SAGAWORKS_DECLARE_TOPOLOGY=false): run "sagaworks topology apply" as a broker user '
            "with configure permission, then start the worker again"
        )

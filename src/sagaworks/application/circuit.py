"""Circuit breakers as the use cases see them: a refusal, a state change, and its record.

A call refused by an open breaker is not a failure of the step: `CircuitOpen`
is raised instead of a port error, `HandleStepCommand` lets it through untouched
(no `Failure`, so no delayed retry is scheduled and no retry budget is spent),
and the worker keeps the delivery until the port may be tried again.

Every state change is recorded for dashboards and announced as a sagaworks
event (`sagaworks.breaker.opened|half_open|closed`, routing key
`breaker.<state>.<port>`), committed together through the outbox.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.ports import BreakerChange, BreakerLog, BreakerState
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import EVENTS_DOMAIN, Outgoing
from sagaworks.domain.messages import Envelope, Message

__all__ = [
    "BreakerClosed",
    "BreakerHalfOpen",
    "BreakerOpened",
    "CircuitOpen",
    "RecordBreakerChange",
    "breaker_event",
]


class CircuitOpen(Exception):
    """The port's breaker is open: the call was not made. Wait `retry_in_s`, then try again."""

    def __init__(self, port: str, retry_in_s: float) -> None:
        super().__init__(f'circuit breaker of port "{port}" is open; retry in {retry_in_s:.1f} s')
        self.port = port
        self.retry_in_s = retry_in_s


class _BreakerEvent(Message):
    port: str
    worker: str
    previous: BreakerState
    failures: int
    changed_at: datetime


class BreakerOpened(_BreakerEvent, type="sagaworks.breaker.opened", domain=EVENTS_DOMAIN):
    """A port failed too often: this worker stopped taking its work."""


class BreakerHalfOpen(_BreakerEvent, type="sagaworks.breaker.half_open", domain=EVENTS_DOMAIN):
    """The reset timeout elapsed: one trial call decides."""


class BreakerClosed(_BreakerEvent, type="sagaworks.breaker.closed", domain=EVENTS_DOMAIN):
    """The trial call succeeded: the port's work flows again."""


_EVENTS: dict[BreakerState, type[_BreakerEvent]] = {
    "open": BreakerOpened,
    "half_open": BreakerHalfOpen,
    "closed": BreakerClosed,
}


def breaker_event(change: BreakerChange) -> Outgoing:
    """The event announcing `change`, routed as `breaker.<state>.<port>`."""
    event = _EVENTS[change.state](
        port=change.port,
        worker=change.worker,
        previous=change.previous,
        failures=change.failures,
        changed_at=change.at,
    )
    envelope = Envelope(
        id=f"breaker/{uuid.uuid4()}",
        type=event.message_type,
        source=f"sagaworks/{change.worker}",
        time=change.at,
    )
    return Outgoing(envelope, EVENTS_DOMAIN, f"breaker.{change.state}.{change.port}", event)


class RecordBreakerChange:
    """Records a breaker change and publishes its event right after the commit."""

    def __init__(self, log: BreakerLog, relay: OutboxRelay, wire: Wire) -> None:
        self._log = log
        self._relay = relay
        self._wire = wire

    async def __call__(self, change: BreakerChange) -> None:
        rows = await self._log.record(change, self._wire.encode(breaker_event(change)))
        await self._relay.publish_now(rows)

"""Use cases on the clock: fire due timers, expire events parked too long."""

from __future__ import annotations

from sagaworks.application.apply_inputs import apply_to_locked_saga
from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.ports import Clock, Store
from sagaworks.application.registry import SagaRegistry
from sagaworks.application.stored import dead_letter
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import TimerFired

__all__ = ["ExpireParkedEvents", "FireDueTimers"]


class FireDueTimers:
    """Each due timer is claimed and applied in its own transaction."""

    def __init__(
        self, store: Store, relay: OutboxRelay, clock: Clock, registry: SagaRegistry, wire: Wire
    ) -> None:
        self._store = store
        self._relay = relay
        self._clock = clock
        self._registry = registry
        self._wire = wire

    async def __call__(self, limit: int = 200) -> int:
        fired = 0
        while fired < limit:
            async with self._store.transaction() as tx:
                now = self._clock.now()
                timer = await tx.claim_due_timer(now)
                if timer is None:
                    return fired
                definition = self._registry.get(timer.saga_type)
                locked = await tx.lock_saga(definition, timer.saga_id)
                await apply_to_locked_saga(
                    tx, self._wire, definition, locked, TimerFired(timer.name), now
                )
                rows = tx.written_outbox()
            await self._relay.publish_now(rows)
            fired += 1
        return fired


class ExpireParkedEvents:
    """Events kept past their bound go to the dead-letter store with the reason they waited."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def __call__(self, limit: int = 500) -> int:
        async with self._store.transaction() as tx:
            now = self._clock.now()
            expired = await tx.expire_parked(now, limit)
            for parked in expired:
                await tx.dead_letter(
                    dead_letter(
                        parked.inbound,
                        parked.reason,
                        "NotApplicable",
                        f"kept until {parked.expires_at.isoformat()} but the saga "
                        "never became ready for it",
                        handler=parked.saga_type,
                        saga_type=parked.saga_type,
                    ),
                    now,
                )
            return len(expired)

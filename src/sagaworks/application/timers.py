"""Use cases on the clock: fire due timers, expire events parked too long."""

from __future__ import annotations

from dataclasses import dataclass

from sagaworks.application.apply_inputs import apply_to_locked_saga
from sagaworks.application.config import EngineOptions
from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.ports import Clock, DueTimer, Store, Telemetry, TimerFailure
from sagaworks.application.registry import SagaRegistry
from sagaworks.application.stored import dead_letter
from sagaworks.application.tracing import finished_saga
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import TimerFired

__all__ = ["ExpireParkedEvents", "FailedTimer", "FireDueTimers", "TimersRun"]


@dataclass(frozen=True, slots=True)
class FailedTimer:
    """A timer that failed to apply, as recorded on its row, and the error it failed with."""

    failure: TimerFailure
    error: Exception


@dataclass(frozen=True, slots=True)
class TimersRun:
    """What one call of `FireDueTimers` did: timers applied, and timers that failed."""

    fired: int = 0
    failed: tuple[FailedTimer, ...] = ()

    @property
    def handled(self) -> int:
        return self.fired + len(self.failed)


class FireDueTimers:
    """Each due timer is claimed and applied in its own transaction.

    A timer whose application fails rolls back with its transaction; a second,
    small transaction then counts the failure on its row and moves it by a
    capped backoff (`EngineOptions.timer_retry_at`), or parks it with its error
    once `timer_max_attempts` is reached, so it never holds up the timers
    behind it. A failure to claim at all (the database is away) is raised.
    """

    def __init__(
        self,
        store: Store,
        relay: OutboxRelay,
        clock: Clock,
        registry: SagaRegistry,
        wire: Wire,
        options: EngineOptions,
        telemetry: Telemetry,
    ) -> None:
        self._store = store
        self._telemetry = telemetry
        self._relay = relay
        self._clock = clock
        self._registry = registry
        self._wire = wire
        self._options = options

    async def __call__(self, limit: int = 200) -> TimersRun:
        fired = 0
        failed: list[FailedTimer] = []
        while fired + len(failed) < limit:
            timer: DueTimer | None = None
            try:
                async with self._store.transaction() as tx:
                    now = self._clock.now()
                    timer = await tx.claim_due_timer(now)
                    if timer is None:
                        break
                    definition = self._registry.get(timer.saga_type)
                    locked = await tx.lock_saga(definition, timer.saga_id)
                    with self._telemetry.timer_fired(timer, now) as trace:
                        decision = await apply_to_locked_saga(
                            tx, self._wire, definition, locked, TimerFired(timer.name), now, trace
                        )
                    rows = tx.written_outbox()
            except Exception as error:
                if timer is None:
                    raise
                failed.append(await self._record_failure(timer, error))
                continue
            if (end := finished_saga(locked, decision)) is not None:
                self._telemetry.sagas_finished([end])
            await self._relay.publish_now(rows)
            fired += 1
        return TimersRun(fired, tuple(failed))

    async def _record_failure(self, timer: DueTimer, error: Exception) -> FailedTimer:
        now = self._clock.now()
        attempts = timer.attempts + 1
        failure = TimerFailure(
            timer,
            attempts,
            f"{type(error).__name__}: {error}",
            now,
            self._options.timer_retry_at(attempts, now),
        )
        async with self._store.transaction() as tx:
            await tx.record_timer_failure(failure)
        return FailedTimer(failure, error)


class ExpireParkedEvents:
    """Events kept past their bound with no saga to take them go to the dead-letter store.

    The store hands out only events whose saga does not exist or has ended: a
    living saga's events wait for it, whatever their bound (`apply_inputs`
    dead-letters them as `saga_ended` if it ends without them).
    """

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
                        f"kept until {parked.expires_at.isoformat()} but no living saga "
                        "was there to take it",
                        handler=parked.saga_type,
                        saga_type=parked.saga_type,
                    ),
                    now,
                )
            return len(expired)

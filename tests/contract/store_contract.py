"""What every `Store` must do, written once and run against each implementation.

`StoreContract` holds the cases; `test_store_contract.py` runs them with a
`backend` fixture per store (in memory, PostgreSQL). Decisions come from the
real `decide()` on the order-fulfilment saga, fed real inputs, so the store is
tested with what the use cases actually hand it. Whatever the `Store`
protocol does not expose (history rows, timers, dead-letter counters) is read
through a `Probe`, one per backend.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

import asyncpg
import pytest
import scenarios.order_inputs as inputs
from scenarios.order_inputs import DISPATCH_BY, T0, Kind, order_placed

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    ShipmentDispatched,
)
from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.state import OrderState
from sagaworks.adapters.memory.locks import DeadlockDetected
from sagaworks.application.ports import (
    DueTimer,
    InboundMessage,
    LockedSaga,
    OutboxRow,
    SagaClaim,
    Store,
    TimerFailure,
)
from sagaworks.application.stored import body_hash, dead_letter, fingerprint
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import (
    Decision,
    EventReceived,
    HistoryEntry,
    Input,
    OperatorCommand,
    RunStep,
    StepFinished,
    TimerFired,
    TimerSpec,
    deadline_timer,
    decide,
    retry_timer,
)
from sagaworks.domain.instance import SagaInstance, Status, saga_id_for
from sagaworks.domain.messages import Envelope, Message

__all__ = ["Backend", "DeadLetterRow", "HistoryRow", "Probe", "StoreContract", "TimerRow"]

SAGA = order_fulfilment
DEADLINE = deadline_timer("await_dispatch")


# --- what a backend gives the cases ----------------------------------------------------------


@dataclass(frozen=True)
class HistoryRow:
    seq: int
    kind: str
    step: str | None
    message_id: str | None


@dataclass(frozen=True)
class TimerRow:
    id: int
    fire_at: datetime
    attempts: int = 0
    last_error: str | None = None
    parked_at: datetime | None = None


@dataclass(frozen=True)
class DeadLetterRow:
    id: int
    message_id: str
    queue: str
    exchange: str
    routing_key: str
    message_type: str | None
    saga_type: str | None
    headers: dict[str, Any]
    body: bytes
    reason: str
    exception_type: str | None
    exception_message: str | None
    handler: str | None
    fingerprint: str
    first_failed_at: datetime
    last_failed_at: datetime
    times_failed: int
    status: str
    first_body: bytes | None


class Probe(Protocol):
    """Reads committed rows the `Store` protocol has no reason to expose."""

    async def history(self, saga_id: UUID) -> list[HistoryRow]: ...
    async def timers(self, saga_id: UUID) -> dict[str, TimerRow]: ...
    async def published_at(self, outbox_id: int) -> datetime | None: ...
    async def dead_letters(self) -> list[DeadLetterRow]: ...
    async def parked_ids(self) -> list[int]: ...
    async def inbox(self) -> set[tuple[str, str]]: ...
    async def saga_version(self, saga_id: UUID) -> int | None: ...


@dataclass
class Backend:
    name: str
    store: Store
    probe: Probe
    wire: Wire


# --- real inputs for decide() ----------------------------------------------------------------


def _received(message: Message, message_id: str, at: datetime = T0) -> EventReceived:
    envelope = Envelope(id=message_id, type=message.message_type, source="tests", time=at)
    return EventReceived(envelope, message)


def placed(order_id: str) -> EventReceived:
    return _received(order_placed(order_id), f"placed-{order_id}")


def dispatched(order_id: str) -> EventReceived:
    return _received(
        ShipmentDispatched(order_id=order_id, shipment_id="wh-1"), f"dispatched-{order_id}"
    )


def cancellation(order_id: str) -> EventReceived:
    return _received(OrderCancellationRequested(order_id=order_id), f"cancel-{order_id}")


def succeeded(step: str, *, kind: Kind = "action", attempt: int = 1) -> StepFinished:
    return inputs.succeeded(
        step, kind=kind, attempt=attempt, message_id=_command(step, kind, attempt)
    )


def failed(
    step: str, reason: str, *, kind: Kind = "action", attempt: int = 1, **why: Any
) -> StepFinished:
    """A failure carrying the id of the command it answers, as a worker records it."""
    return inputs.failed(
        step, reason, kind=kind, attempt=attempt, message_id=_command(step, kind, attempt), **why
    )


def _command(step: str, kind: Kind, attempt: int) -> str:
    return f"cmd-{step}-{kind}-{attempt}"


def inbound(message_id: str, **overrides: Any) -> InboundMessage:
    """A delivery with every attribute set, so a round trip that drops one shows."""
    values: dict[str, Any] = {
        "message_id": message_id,
        "message_type": ShipmentDispatched.message_type,
        "body": b'{"order_id": "o-1", "shipment_id": "wh-1"}',
        "headers": {"cloudEvents_specversion": "1.0", "x-trace": ["a", "b"]},
        "queue": "sagaworks.order_fulfilment",
        "exchange": "warehouse",
        "routing_key": "shipment.dispatched",
        "source": "warehouse-service",
        "time": T0 - timedelta(minutes=5),
        "correlation_id": "corr-1",
        "causation_id": "cause-1",
        "user_id": "warehouse",
    }
    values.update(overrides)
    return InboundMessage(**values)


class _Boom(Exception):
    pass


# --- the cases -------------------------------------------------------------------------------


class StoreContract:
    """Subclass it where a `backend` fixture yields a `Backend`; pytest collects the subclass."""

    # helpers

    @staticmethod
    async def apply(
        backend: Backend,
        given: Input,
        at: datetime = T0,
        *,
        order_id: str = "o-1",
        message_id: str | None = None,
    ) -> tuple[Decision, list[OutboxRow]]:
        """What a use case does: lock, decide on what was loaded, save, commit."""
        saga_id = saga_id_for(SAGA.name, order_id)
        async with backend.store.transaction() as tx:
            locked = await tx.lock_saga(SAGA, saga_id, message_id=message_id)
            decision = decide(SAGA, locked.instance, given, at)
            assert decision.outcome == "applied", decision.reason
            await tx.save(backend.wire.change(SAGA, decision))
            return decision, tx.written_outbox()

    async def to_wait(self, backend: Backend, order_id: str = "o-1") -> list[Decision]:
        """Drive one order to `await_dispatch`: started, three steps done, deadline set."""
        decisions = []
        for given in (
            placed(order_id),
            succeeded("reserve_stock"),
            succeeded("authorise_payment"),
            succeeded("book_shipment"),
        ):
            decision, _ = await self.apply(backend, given, order_id=order_id)
            decisions.append(decision)
        return decisions

    @staticmethod
    async def locked(backend: Backend, order_id: str = "o-1") -> LockedSaga:
        async with backend.store.transaction() as tx:
            return await tx.lock_saga(SAGA, saga_id_for(SAGA.name, order_id))

    @staticmethod
    async def claimable(backend: Backend, limit: int = 100) -> list[OutboxRow]:
        """Unpublished rows, left unpublished (the claim is rolled back)."""
        seen: list[OutboxRow] = []

        async def peek() -> None:
            async with backend.store.claim_unpublished(limit, 0.0) as rows:
                seen.extend(rows)
                raise _Boom

        with pytest.raises(_Boom):
            await peek()
        return seen

    # sagas: insert, load, round trip

    async def test_a_saga_nobody_saved_loads_as_none(self, backend: Backend) -> None:
        saga_id = saga_id_for(SAGA.name, "nobody")
        assert (await backend.store.load_sagas([(SAGA, saga_id)]))[0] is None
        assert await self.locked(backend, "nobody") == LockedSaga(None, False, False)

    async def test_saved_sagas_round_trip_state_status_and_progress(self, backend: Backend) -> None:
        retry_at = T0 + timedelta(minutes=1)
        steps: list[Input] = [
            placed("o-1"),
            succeeded("reserve_stock"),
            failed("authorise_payment", "PortUnavailable: 503", business=False, retry_at=retry_at),
            TimerFired(retry_timer("authorise_payment", "action", 1)),
            failed("authorise_payment", "payment_declined", business=True, attempt=2),
            failed("reserve_stock", "ledger_closed", business=True, kind="compensation"),
        ]
        seen: list[SagaInstance] = []
        for given in steps:
            decision, _ = await self.apply(backend, given)
            assert decision.instance is not None
            expected = decision.instance
            assert (await backend.store.load_sagas([(SAGA, expected.id)]))[0] == expected
            assert (await self.locked(backend)).instance == expected
            seen.append(expected)
        # The sequence really exercised every progress field.
        assert seen[0].status is Status.RUNNING
        assert isinstance(seen[0].state, OrderState)
        assert seen[0].state.dispatch_by == DISPATCH_BY
        assert seen[1].done == ("reserve_stock",)
        assert isinstance(seen[1].state, OrderState)
        assert seen[1].state.reservation_id == "res-1"
        assert seen[2].in_flight is not None
        assert seen[2].in_flight.retry_at == retry_at
        assert seen[3].in_flight is not None
        assert seen[3].in_flight.attempt == 2
        assert seen[4].status is Status.COMPENSATING
        assert seen[4].reason == "payment_declined"
        assert seen[4].in_flight is not None
        assert seen[4].in_flight.kind == "compensation"
        assert seen[5].status is Status.NEEDS_ATTENTION
        assert seen[5].error == "ledger_closed"
        assert seen[5].in_flight is None

    # inbox

    async def test_the_inbox_reports_a_message_seen_before(self, backend: Backend) -> None:
        saga_id = saga_id_for(SAGA.name, "o-1")
        async with backend.store.transaction() as tx:
            assert (await tx.lock_saga(SAGA, saga_id, message_id="m-1")).duplicate is False
            assert (await tx.lock_saga(SAGA, saga_id, message_id="m-1")).duplicate is True
        async with backend.store.transaction() as tx:
            assert (await tx.lock_saga(SAGA, saga_id, message_id="m-1")).duplicate is True
            assert (await tx.lock_saga(SAGA, saga_id, message_id="m-2")).duplicate is False
        # Dedupe is per (consumer, message id): the same id for another saga is a duplicate.
        other = saga_id_for(SAGA.name, "o-2")
        async with backend.store.transaction() as tx:
            assert (await tx.lock_saga(SAGA, other, message_id="m-1")).duplicate is True
        assert await backend.probe.inbox() == {(SAGA.name, "m-1"), (SAGA.name, "m-2")}

    # versions

    async def test_save_bumps_the_version_and_refuses_a_stale_one(self, backend: Backend) -> None:
        started, _ = await self.apply(backend, placed("o-1"))
        reserved, _ = await self.apply(backend, succeeded("reserve_stock"))
        assert reserved.instance is not None
        saga_id = reserved.instance.id
        assert await backend.probe.saga_version(saga_id) == 2
        history = await backend.probe.history(saga_id)

        with pytest.raises(RuntimeError, match="changed under its lock"):
            async with backend.store.transaction() as tx:
                await tx.save(backend.wire.change(SAGA, reserved))  # expects version 1, finds 2
        # A second insert of version 1: PostgreSQL reports the primary key clash.
        with pytest.raises((RuntimeError, asyncpg.UniqueViolationError)):
            async with backend.store.transaction() as tx:
                await tx.save(backend.wire.change(SAGA, started))

        assert await backend.probe.saga_version(saga_id) == 2
        assert await backend.probe.history(saga_id) == history
        assert (await backend.store.load_sagas([(SAGA, saga_id)]))[0] == reserved.instance

    # history

    async def test_history_is_appended_in_order_without_gaps(self, backend: Backend) -> None:
        decisions = await self.to_wait(backend)
        decision, _ = await self.apply(backend, dispatched("o-1"))
        decisions.append(decision)
        expected = [
            (entry.kind, entry.step, entry.message_id) for d in decisions for entry in d.history
        ]
        rows = await backend.probe.history(saga_id_for(SAGA.name, "o-1"))
        assert [r.seq for r in rows] == list(range(1, len(expected) + 1))
        assert [(r.kind, r.step, r.message_id) for r in rows] == expected
        assert rows[0].kind == "started"
        assert rows[-1].kind == "step_started"
        assert len(decisions) == 5
        assert len(rows) > len(decisions)  # several entries per save, numbered across saves

    # outbox

    async def test_outbox_rows_are_returned_and_claimable_until_published(
        self, backend: Backend
    ) -> None:
        started, first = await self.apply(backend, placed("o-1"))
        reserved, second = await self.apply(backend, succeeded("reserve_stock"))
        assert len(first) == len(second) == 1
        for decision, rows in ((started, first), (reserved, second)):
            (outgoing,) = decision.outgoing
            encoded = backend.wire.encode(outgoing)
            (row,) = rows
            assert (row.message_id, row.exchange, row.routing_key, row.body) == (
                encoded.message_id,
                encoded.exchange,
                encoded.routing_key,
                encoded.body,
            )
            assert dict(row.headers) == encoded.headers
            command = RunStep.model_validate_json(row.body)
            assert command.saga_id == saga_id_for(SAGA.name, "o-1")
        assert first[0].id < second[0].id

        # Fresh rows are left to publish-after-commit during the sweeper's grace period.
        async with backend.store.claim_unpublished(100, 3600.0) as rows:
            assert rows == []
        # A failed sweep leaves them unpublished; a successful one publishes them once.
        assert await self.claimable(backend) == [*first, *second]
        async with backend.store.claim_unpublished(1, 0.0) as rows:
            assert rows == first
        assert await backend.probe.published_at(first[0].id) is not None
        assert await backend.probe.published_at(second[0].id) is None
        await backend.store.mark_published([second[0].id])
        assert await backend.probe.published_at(second[0].id) is not None
        assert await self.claimable(backend) == []

    async def test_a_leased_row_is_left_to_its_worker_until_the_lease_ran_out(
        self, backend: Backend
    ) -> None:
        """An eager step's command: the sweeper publishes it only once its lease ran out."""
        rows: dict[str, list[OutboxRow]] = {}
        for order_id, lease_s in (("o-held", 3600.0), ("o-lapsed", 0.0)):
            saga_id = saga_id_for(SAGA.name, order_id)
            async with backend.store.transaction() as tx:
                locked = await tx.lock_saga(SAGA, saga_id)
                decision = decide(SAGA, locked.instance, placed(order_id), T0)
                change = backend.wire.change(SAGA, decision)
                leased = tuple(replace(p, lease_s=lease_s) for p in change.outbox)
                await tx.save(replace(change, outbox=leased))
                rows[order_id] = tx.written_outbox()
        assert await self.claimable(backend) == rows["o-lapsed"]
        await backend.store.mark_published([r.id for r in rows["o-held"]])
        assert await backend.probe.published_at(rows["o-held"][0].id) is not None
        assert await self.claimable(backend) == rows["o-lapsed"]

    async def test_a_transaction_that_wrote_nothing_returns_no_outbox_rows(
        self, backend: Backend
    ) -> None:
        async with backend.store.transaction() as tx:
            await tx.lock_saga(SAGA, saga_id_for(SAGA.name, "o-1"), message_id="m-1")
            assert tx.written_outbox() == []

    async def test_claiming_skips_rows_another_sweeper_holds(self, backend: Backend) -> None:
        _, first = await self.apply(backend, placed("o-1"))
        _, second = await self.apply(backend, placed("o-2"), order_id="o-2")
        async with backend.store.claim_unpublished(1, 0.0) as mine:
            assert mine == first
            async with backend.store.claim_unpublished(10, 0.0) as theirs:
                assert theirs == second
        assert await self.claimable(backend) == []

    # timers

    async def test_timers_are_set_cancelled_and_upserted(self, backend: Backend) -> None:
        await self.to_wait(backend, "o-1")
        saga_id = saga_id_for(SAGA.name, "o-1")
        timers = await backend.probe.timers(saga_id)
        assert {name: t.fire_at for name, t in timers.items()} == {DEADLINE: DISPATCH_BY}

        # Cancelling while waiting drops the deadline; a failed compensation sets a retry.
        await self.apply(backend, cancellation("o-1"))
        assert await backend.probe.timers(saga_id) == {}
        retry_at = T0 + timedelta(seconds=30)
        await self.apply(
            backend,
            failed(
                "book_shipment",
                "PortUnavailable",
                business=False,
                retry_at=retry_at,
                kind="compensation",
            ),
        )
        retry = retry_timer("book_shipment", "compensation", 1)
        assert {n: t.fire_at for n, t in (await backend.probe.timers(saga_id)).items()} == {
            retry: retry_at
        }

        # Setting a timer that exists moves it and keeps its row.
        await self.to_wait(backend, "o-2")
        other = saga_id_for(SAGA.name, "o-2")
        before = (await backend.probe.timers(other))[DEADLINE]
        later = DISPATCH_BY + timedelta(hours=1)
        async with backend.store.transaction() as tx:
            locked = await tx.lock_saga(SAGA, other)
            decision = decide(SAGA, locked.instance, dispatched("o-2"), T0)
            assert decision.cancel_timers == (DEADLINE,)
            moved = replace(decision, set_timers=(TimerSpec(DEADLINE, later),))
            await tx.save(backend.wire.change(SAGA, moved))
        assert before.fire_at == DISPATCH_BY
        assert await backend.probe.timers(other) == {DEADLINE: TimerRow(before.id, later)}

    async def test_claim_due_timer_returns_each_due_timer_once(self, backend: Backend) -> None:
        await self.to_wait(backend, "o-1")
        saga_id = saga_id_for(SAGA.name, "o-1")
        (timer,) = (await backend.probe.timers(saga_id)).values()

        async with backend.store.transaction() as tx:
            assert await tx.claim_due_timer(DISPATCH_BY - timedelta(seconds=1)) is None

        # A claim that rolls back leaves the timer due.
        async def claim_then_fail() -> None:
            async with backend.store.transaction() as tx:
                assert await tx.claim_due_timer(DISPATCH_BY) is not None
                raise _Boom

        with pytest.raises(_Boom):
            await claim_then_fail()
        async with backend.store.transaction() as tx:
            due = await tx.claim_due_timer(DISPATCH_BY)
            assert due is not None
            assert (due.id, due.saga_type, due.saga_id, due.name) == (
                timer.id,
                SAGA.name,
                saga_id,
                DEADLINE,
            )
            # The claim holds the saga: locking it again in the same transaction is fine.
            assert (await tx.lock_saga(SAGA, saga_id)).instance is not None
        async with backend.store.transaction() as tx:
            assert await tx.claim_due_timer(DISPATCH_BY + timedelta(days=1)) is None
        assert await backend.probe.timers(saga_id) == {}

    async def test_a_paused_sagas_timers_wait_and_its_kept_events_do_not_expire(
        self, backend: Backend
    ) -> None:
        await self.to_wait(backend, "o-1")
        saga_id = saga_id_for(SAGA.name, "o-1")
        pause = OperatorCommand("pause", "ops", "why", "operator:p", "a-1")
        await self.apply(backend, pause, message_id="operator:p")
        async with backend.store.transaction() as tx:
            await tx.park(SAGA.name, saga_id, "o-1", inbound("m-kept"), "paused", T0)
        later = DISPATCH_BY + timedelta(days=1)
        async with backend.store.transaction() as tx:
            assert await tx.claim_due_timer(later) is None
            assert await tx.expire_parked(later, 10) == []
        unpause = OperatorCommand("unpause", "ops", "why", "operator:u", "a-2")
        await self.apply(backend, unpause, message_id="operator:u")
        async with backend.store.transaction() as tx:
            due = await tx.claim_due_timer(later)
            assert due is not None
            assert due.name == DEADLINE
            # Unpaused, the saga lives on: its kept event still waits for it.
            assert await tx.expire_parked(later, 10) == []

    async def test_claim_due_timer_skips_sagas_another_transaction_holds(
        self, backend: Backend
    ) -> None:
        await self.to_wait(backend, "o-1")
        await self.to_wait(backend, "o-2")
        held = saga_id_for(SAGA.name, "o-1")
        async with backend.store.transaction() as holder:
            await holder.lock_saga(SAGA, held)
            async with backend.store.transaction() as tx:
                due = await tx.claim_due_timer(DISPATCH_BY)
                assert due is not None
                assert due.saga_id == saga_id_for(SAGA.name, "o-2")
            async with backend.store.transaction() as tx:
                assert await tx.claim_due_timer(DISPATCH_BY) is None
        async with backend.store.transaction() as tx:
            due = await tx.claim_due_timer(DISPATCH_BY)
            assert due is not None
            assert due.saga_id == held

    async def test_a_failed_timer_backs_off_then_parks_and_setting_it_again_rearms_it(
        self, backend: Backend
    ) -> None:
        await self.to_wait(backend, "o-1")
        saga_id = saga_id_for(SAGA.name, "o-1")
        (timer,) = (await backend.probe.timers(saga_id)).values()

        claimed: list[DueTimer] = []

        async def claim_and_roll_back(at: datetime) -> None:
            async with backend.store.transaction() as tx:
                due = await tx.claim_due_timer(at)
                assert due is not None
                claimed.append(due)
                raise _Boom

        async def claim_then_fail(at: datetime) -> DueTimer:
            with pytest.raises(_Boom):
                await claim_and_roll_back(at)
            return claimed[-1]

        first = await claim_then_fail(DISPATCH_BY)
        assert first.attempts == 0
        retry_at = DISPATCH_BY + timedelta(seconds=2)
        async with backend.store.transaction() as tx:
            await tx.record_timer_failure(
                TimerFailure(first, 1, "_Boom: no", DISPATCH_BY, retry_at)
            )
        assert await backend.probe.timers(saga_id) == {
            DEADLINE: TimerRow(timer.id, retry_at, 1, "_Boom: no")
        }
        async with backend.store.transaction() as tx:
            assert await tx.claim_due_timer(DISPATCH_BY + timedelta(seconds=1)) is None

        second = await claim_then_fail(retry_at)
        assert second.attempts == 1
        async with backend.store.transaction() as tx:
            await tx.record_timer_failure(TimerFailure(second, 2, "_Boom: again", retry_at, None))
        assert await backend.probe.timers(saga_id) == {
            DEADLINE: TimerRow(timer.id, retry_at, 2, "_Boom: again", retry_at)
        }
        async with backend.store.transaction() as tx:  # parked: never claimed again
            assert await tx.claim_due_timer(DISPATCH_BY + timedelta(days=365)) is None

        # Setting the timer again (a new deadline) starts it afresh.
        later = DISPATCH_BY + timedelta(hours=1)
        async with backend.store.transaction() as tx:
            locked = await tx.lock_saga(SAGA, saga_id)
            decision = decide(SAGA, locked.instance, dispatched("o-1"), T0)
            moved = replace(decision, set_timers=(TimerSpec(DEADLINE, later),))
            await tx.save(backend.wire.change(SAGA, moved))
        assert await backend.probe.timers(saga_id) == {DEADLINE: TimerRow(timer.id, later)}

    async def test_a_failure_of_a_timer_gone_meanwhile_changes_nothing(
        self, backend: Backend
    ) -> None:
        await self.to_wait(backend, "o-1")
        saga_id = saga_id_for(SAGA.name, "o-1")
        async with backend.store.transaction() as tx:
            due = await tx.claim_due_timer(DISPATCH_BY)
        assert due is not None
        async with backend.store.transaction() as tx:
            await tx.record_timer_failure(TimerFailure(due, 1, "late", DISPATCH_BY, None))
        assert await backend.probe.timers(saga_id) == {}

    async def test_history_appended_for_an_ignored_input_continues_the_sequence(
        self, backend: Backend
    ) -> None:
        await self.to_wait(backend, "o-1")
        saga_id = saga_id_for(SAGA.name, "o-1")
        before = await backend.probe.history(saga_id)
        version = await backend.probe.saga_version(saga_id)
        entries = (
            HistoryEntry("ignored", None, "late-1", {"reason": "saga_completed"}),
            HistoryEntry("ignored", None, "late-2", {"reason": "too_late"}),
        )
        async with backend.store.transaction() as tx:
            await tx.lock_saga(SAGA, saga_id)
            await tx.append_history(saga_id, T0, entries)
        rows = await backend.probe.history(saga_id)
        assert rows == [
            *before,
            HistoryRow(len(before) + 1, "ignored", None, "late-1"),
            HistoryRow(len(before) + 2, "ignored", None, "late-2"),
        ]
        assert await backend.probe.saga_version(saga_id) == version

    # locking

    async def test_lock_saga_serialises_transactions_on_one_saga(self, backend: Backend) -> None:
        saga_id = saga_id_for(SAGA.name, "o-1")

        async def second() -> LockedSaga:
            async with backend.store.transaction() as tx:
                return await tx.lock_saga(SAGA, saga_id, message_id="m-2")

        async with backend.store.transaction() as tx:
            locked = await tx.lock_saga(SAGA, saga_id, message_id="m-1")
            waiting = asyncio.create_task(second())
            await asyncio.sleep(0.2)
            assert not waiting.done(), "a second transaction got the lock of a held saga"
            # Other sagas are not held up.
            other = await asyncio.wait_for(self.locked(backend, "o-2"), 5)
            assert other.instance is None
            decision = decide(SAGA, locked.instance, placed("o-1"), T0)
            await tx.save(backend.wire.change(SAGA, decision))
            # Uncommitted work is invisible outside the transaction.
            assert (await backend.store.load_sagas([(SAGA, saga_id)]))[0] is None
            assert await self.claimable(backend) == []
        after = await asyncio.wait_for(waiting, 5)
        assert after.instance == decision.instance

    async def test_a_deadlock_fails_one_transaction_instead_of_hanging(
        self, backend: Backend
    ) -> None:
        one, two = saga_id_for(SAGA.name, "o-1"), saga_id_for(SAGA.name, "o-2")
        both_hold_one = asyncio.Barrier(2)

        async def lock_both(first: UUID, second: UUID) -> None:
            async with backend.store.transaction() as tx:
                await tx.lock_saga(SAGA, first)
                await both_hold_one.wait()
                await tx.lock_saga(SAGA, second)

        results = await asyncio.wait_for(
            asyncio.gather(lock_both(one, two), lock_both(two, one), return_exceptions=True), 10
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(failed) == 1, results
        assert isinstance(failed[0], DeadlockDetected | asyncpg.DeadlockDetectedError)

    # batches

    async def test_lock_sagas_locks_claims_and_loads_each_saga_in_claim_order(
        self, backend: Backend
    ) -> None:
        one, two, three = (saga_id_for(SAGA.name, f"o-{n}") for n in (1, 2, 3))
        started, _ = await self.apply(backend, placed("o-1"), message_id="m-1")
        async with backend.store.transaction() as tx:
            await tx.park(SAGA.name, two, "o-2", inbound("m-p"), "no_saga", T0)
        inbox_before = await backend.probe.inbox()

        async with backend.store.transaction() as tx:
            locked = await tx.lock_sagas(
                [
                    SagaClaim(SAGA, two, "m-2"),
                    SagaClaim(SAGA, one, "m-1"),
                    SagaClaim(SAGA, three),
                ]
            )
            assert locked == [
                LockedSaga(None, False, True),
                LockedSaga(started.instance, True, False),
                LockedSaga(None, False, False),
            ]
            # Every saga of the batch is held, the one nobody created yet too.
            waiting = asyncio.create_task(self.locked(backend, "o-3"))
            await asyncio.sleep(0.2)
            assert not waiting.done(), "another transaction got the lock of a batch's saga"
            again = await tx.lock_sagas([SagaClaim(SAGA, three, "m-2")])
            assert again == [LockedSaga(None, True, False)]
        assert (await asyncio.wait_for(waiting, 5)).instance is None
        assert await backend.probe.inbox() == inbox_before | {(SAGA.name, "m-2")}

    async def test_lock_sagas_reports_the_body_hash_recorded_with_a_repeated_id(
        self, backend: Backend
    ) -> None:
        one, two = (saga_id_for(SAGA.name, f"o-{n}") for n in (1, 2))
        async with backend.store.transaction() as tx:
            first = await tx.lock_sagas(
                [SagaClaim(SAGA, one, "m-1", body_hash=b"h-1"), SagaClaim(SAGA, two, "m-2")]
            )
        assert [(s.duplicate, s.first_body_hash) for s in first] == [(False, None)] * 2

        async with backend.store.transaction() as tx:
            again = await tx.lock_sagas(
                [
                    SagaClaim(SAGA, one, "m-1", body_hash=b"h-other"),
                    SagaClaim(SAGA, two, "m-2", body_hash=b"h-2"),
                ]
            )
        # The hash recorded first, whatever the repeat carries; none recorded: unknown.
        assert [(s.duplicate, s.first_body_hash) for s in again] == [(True, b"h-1"), (True, None)]

    async def test_the_letter_of_an_id_conflict_keeps_the_first_body_and_the_new_one(
        self, backend: Backend
    ) -> None:
        one, two = (saga_id_for(SAGA.name, f"o-{n}") for n in (1, 2))
        first, second, new = b'{"amount_cents": 1000}', b'{"n": 2}', b'{"amount_cents": 999999}'

        def claim(saga_id: UUID, message_id: str, body: bytes) -> SagaClaim:
            return SagaClaim(SAGA, saga_id, message_id, body_hash=body_hash(body), body=body)

        async with backend.store.transaction() as tx:
            await tx.lock_sagas([claim(one, "m-1", first), claim(two, "m-2", second)])
        async with backend.store.transaction() as tx:
            again = await tx.lock_sagas([claim(one, "m-1", new), claim(two, "m-2", second)])
            # The body recorded first comes back for the conflict only: a duplicate reads none.
            assert [(s.duplicate, s.first_body) for s in again] == [(True, first), (True, None)]
            letter = dead_letter(
                inbound("m-1", body=new),
                "id_conflict",
                "MessageIdConflict",
                "processed before with another body",
                first_body=again[0].first_body,
            )
            await tx.dead_letter(letter, T0)

        (row,) = await backend.probe.dead_letters()
        assert (row.message_id, row.reason, row.body, row.first_body) == (
            "m-1",
            "id_conflict",
            new,
            first,
        )

    async def test_lock_sagas_returns_a_known_saga_only_while_it_is_at_that_version(
        self, backend: Backend
    ) -> None:
        saga_id = saga_id_for(SAGA.name, "o-1")
        first, _ = await self.apply(backend, placed("o-1"), message_id="m-1")
        assert first.instance is not None
        async with backend.store.transaction() as tx:
            locked = await tx.lock_sagas([SagaClaim(SAGA, saga_id, "m-2", known=first.instance)])
        assert locked == [LockedSaga(first.instance, False, False)]

        second, _ = await self.apply(backend, succeeded("reserve_stock"), message_id="m-3")
        async with backend.store.transaction() as tx:
            locked = await tx.lock_sagas([SagaClaim(SAGA, saga_id, "m-4", known=first.instance)])
        assert locked == [LockedSaga(second.instance, False, False)]
        assert second.instance is not None
        assert second.instance.version == 2

    async def test_save_all_writes_every_saga_of_a_batch(self, backend: Backend) -> None:
        order_ids = ("o-1", "o-2", "o-3")
        ids = {o: saga_id_for(SAGA.name, o) for o in order_ids}
        before: dict[str, list[Decision]] = {"o-1": [], "o-2": [], "o-3": []}
        for given in (placed("o-1"), succeeded("reserve_stock"), succeeded("authorise_payment")):
            decision, _ = await self.apply(backend, given, order_id="o-1")
            before["o-1"].append(decision)
        decision, _ = await self.apply(backend, placed("o-2"), order_id="o-2")
        before["o-2"].append(decision)
        earlier = await self.claimable(backend)

        inputs: dict[str, Input] = {
            "o-3": placed("o-3"),
            "o-1": succeeded("book_shipment"),
            "o-2": succeeded("reserve_stock"),
        }
        async with backend.store.transaction() as tx:
            locked = await tx.lock_sagas([SagaClaim(SAGA, ids[o]) for o in inputs])
            batch = {
                o: decide(SAGA, lock.instance, given, T0)
                for (o, given), lock in zip(inputs.items(), locked, strict=True)
            }
            await tx.save_all([backend.wire.change(SAGA, d) for d in batch.values()])
            written = tx.written_outbox()

        nobody = saga_id_for(SAGA.name, "nobody")
        loaded = await backend.store.load_sagas(
            [(SAGA, ids["o-2"]), (SAGA, nobody), (SAGA, ids["o-3"]), (SAGA, ids["o-1"])]
        )
        assert loaded == [batch["o-2"].instance, None, batch["o-3"].instance, batch["o-1"].instance]
        assert [await backend.probe.saga_version(ids[o]) for o in order_ids] == [4, 2, 1]
        for o in order_ids:
            expected = [
                (entry.kind, entry.step, entry.message_id)
                for d in (*before[o], batch[o])
                for entry in d.history
            ]
            rows = await backend.probe.history(ids[o])
            assert [r.seq for r in rows] == list(range(1, len(expected) + 1)), o
            assert [(r.kind, r.step, r.message_id) for r in rows] == expected, o
        outgoing = [backend.wire.encode(out) for d in batch.values() for out in d.outgoing]
        assert len(outgoing) == 2
        assert sorted(r.message_id for r in written) == sorted(e.message_id for e in outgoing)
        assert {RunStep.model_validate_json(r.body).saga_id for r in written} == {
            ids["o-2"],
            ids["o-3"],
        }
        claimable = await self.claimable(backend)
        assert sorted(claimable, key=lambda r: r.id) == sorted(
            [*earlier, *written], key=lambda r: r.id
        )
        assert {n: t.fire_at for n, t in (await backend.probe.timers(ids["o-1"])).items()} == {
            DEADLINE: DISPATCH_BY
        }
        assert await backend.probe.timers(ids["o-2"]) == {}

    async def test_save_all_with_one_stale_version_writes_nothing_of_the_batch(
        self, backend: Backend
    ) -> None:
        one, two, three = (saga_id_for(SAGA.name, f"o-{n}") for n in (1, 2, 3))
        started, _ = await self.apply(backend, placed("o-1"))
        await self.apply(backend, placed("o-2"), order_id="o-2")
        reserved, _ = await self.apply(backend, succeeded("reserve_stock"), order_id="o-2")
        history = {s: await backend.probe.history(s) for s in (one, two)}
        inbox = await backend.probe.inbox()
        outbox = await self.claimable(backend)

        async def save_with_stale_last() -> None:
            async with backend.store.transaction() as tx:
                locked = await tx.lock_sagas(
                    [
                        SagaClaim(SAGA, three, "m-3"),
                        SagaClaim(SAGA, one, "m-1"),
                        SagaClaim(SAGA, two, "m-2"),
                    ]
                )
                fresh = [
                    decide(SAGA, locked[0].instance, placed("o-3"), T0),
                    decide(SAGA, locked[1].instance, succeeded("reserve_stock"), T0),
                ]
                # `reserved` was decided on version 1; the saga is at version 2 now.
                await tx.save_all([backend.wire.change(SAGA, d) for d in (*fresh, reserved)])

        with pytest.raises(RuntimeError, match=f"{two} changed under its lock") as stale:
            await save_with_stale_last()
        assert str(one) not in str(stale.value)
        assert str(three) not in str(stale.value)

        assert await backend.store.load_sagas([(SAGA, three), (SAGA, one), (SAGA, two)]) == [
            None,
            started.instance,
            reserved.instance,
        ]
        assert await backend.probe.history(three) == []
        assert {s: await backend.probe.history(s) for s in (one, two)} == history
        assert await backend.probe.inbox() == inbox
        assert await self.claimable(backend) == outbox
        async with asyncio.timeout(5), backend.store.transaction() as tx:
            assert (await tx.lock_saga(SAGA, three, message_id="m-3")).duplicate is False

    async def test_batches_sharing_sagas_in_opposite_orders_take_turns(
        self, backend: Backend
    ) -> None:
        both_ready = asyncio.Barrier(2)
        events: list[str] = []

        async def batch(name: str, order_ids: list[str]) -> None:
            async with backend.store.transaction() as tx:
                await both_ready.wait()
                locked = await tx.lock_sagas(
                    [SagaClaim(SAGA, saga_id_for(SAGA.name, o)) for o in order_ids]
                )
                events.append(f"{name} locked")
                await asyncio.sleep(0.1)
                changes = [
                    backend.wire.change(
                        SAGA,
                        decide(
                            SAGA,
                            lock.instance,
                            placed(o) if lock.instance is None else succeeded("reserve_stock"),
                            T0,
                        ),
                    )
                    for o, lock in zip(order_ids, locked, strict=True)
                ]
                await tx.save_all(changes)
                events.append(f"{name} saved")

        # Both claim the sagas they share first, in opposite orders: one of them is not lock
        # order, so taking locks in claim order would deadlock.
        await asyncio.wait_for(
            asyncio.gather(batch("a", ["o-2", "o-3", "o-1"]), batch("b", ["o-3", "o-2", "o-4"])),
            10,
        )
        assert events in (
            ["a locked", "a saved", "b locked", "b saved"],
            ["b locked", "b saved", "a locked", "a saved"],
        )
        # The second batch saw what the first committed.
        versions = [
            await backend.probe.saga_version(saga_id_for(SAGA.name, f"o-{n}")) for n in (1, 2, 3, 4)
        ]
        assert versions == [1, 2, 2, 1]

    async def test_a_saga_twice_in_one_batch_is_refused(self, backend: Backend) -> None:
        one, two = saga_id_for(SAGA.name, "o-1"), saga_id_for(SAGA.name, "o-2")
        with pytest.raises(ValueError, match=str(one)):
            async with backend.store.transaction() as tx:
                await tx.lock_sagas(
                    [SagaClaim(SAGA, one), SagaClaim(SAGA, two), SagaClaim(SAGA, one, "m-1")]
                )
        assert await backend.probe.inbox() == set()

        async def save_twice() -> None:
            async with backend.store.transaction() as tx:
                locked = await tx.lock_sagas([SagaClaim(SAGA, one)])
                started = decide(SAGA, locked[0].instance, placed("o-1"), T0)
                change = backend.wire.change(SAGA, started)
                await tx.save_all([change, change])

        with pytest.raises(ValueError, match=str(one)):
            await save_twice()
        assert (await backend.store.load_sagas([(SAGA, one)]))[0] is None
        assert await backend.probe.history(one) == []

    # parked messages

    async def test_parked_messages_round_trip_unpark_and_expire(self, backend: Backend) -> None:
        saga_id = saga_id_for(SAGA.name, "o-1")
        late = inbound("m-late")
        soon = inbound("m-soon", message_type=OrderCancellationRequested.message_type)
        async with backend.store.transaction() as tx:
            await tx.park(SAGA.name, saga_id, "o-1", late, "no_saga", T0 + timedelta(minutes=10))
            await tx.park(SAGA.name, saga_id, "o-1", soon, "no_saga", T0 + timedelta(minutes=5))
            # Parking the same message again keeps the first.
            await tx.park(
                SAGA.name, saga_id, "o-1", late, "unexpected_event", T0 + timedelta(hours=1)
            )
        async with backend.store.transaction() as tx:
            locked = await tx.lock_saga(SAGA, saga_id)
            assert locked == LockedSaga(None, False, True)
            parked = await tx.parked_for(saga_id)
        assert [p.inbound for p in parked] == [late, soon]
        assert [p.inbound.delivery_count for p in parked] == [0, 0]
        assert [(p.saga_type, p.reason, p.expires_at) for p in parked] == [
            (SAGA.name, "no_saga", T0 + timedelta(minutes=10)),
            (SAGA.name, "no_saga", T0 + timedelta(minutes=5)),
        ]
        assert parked[0].id < parked[1].id
        assert (await self.locked(backend, "o-2")).has_parked is False

        async with backend.store.transaction() as tx:
            assert await tx.expire_parked(T0 + timedelta(minutes=1), 10) == []
            first = await tx.expire_parked(T0 + timedelta(hours=1), 1)
        assert [p.inbound.message_id for p in first] == ["m-soon"]  # soonest expiry first
        assert first[0].inbound == soon

        async with backend.store.transaction() as tx:
            await tx.unpark([parked[0].id])
            assert await tx.parked_for(saga_id) == []
        assert await backend.probe.parked_ids() == []
        assert (await self.locked(backend)).has_parked is False

    async def test_expiry_keeps_events_of_a_living_saga_and_takes_those_of_an_ended_one(
        self, backend: Backend
    ) -> None:
        alive, attention, ended = "o-alive", "o-attention", "o-ended"
        await self.apply(backend, placed(alive), order_id=alive)
        for given in (
            placed(attention),
            succeeded("reserve_stock"),
            failed("authorise_payment", "payment_declined", business=True),
            failed("reserve_stock", "ledger_closed", business=True, kind="compensation"),
        ):
            await self.apply(backend, given, order_id=attention)
        for given in (placed(ended), failed("reserve_stock", "out_of_stock", business=True)):
            decision, _ = await self.apply(backend, given, order_id=ended)
        assert decision.instance is not None
        assert decision.instance.status is Status.COMPENSATED
        async with backend.store.transaction() as tx:
            for order in (alive, attention, ended, "o-none"):
                await tx.park(
                    SAGA.name,
                    saga_id_for(SAGA.name, order),
                    order,
                    inbound(f"m-{order}"),
                    "unexpected_event",
                    T0,
                )

        async with backend.store.transaction() as tx:
            expired = await tx.expire_parked(T0 + timedelta(days=365), 10)

        assert sorted(p.inbound.message_id for p in expired) == ["m-o-ended", "m-o-none"]
        assert len(await backend.probe.parked_ids()) == 2, "a living saga's events wait for it"

    async def test_expiry_skips_parked_messages_another_transaction_holds(
        self, backend: Backend
    ) -> None:
        saga_id = saga_id_for(SAGA.name, "o-1")
        async with backend.store.transaction() as tx:
            await tx.park(SAGA.name, saga_id, "o-1", inbound("m-1"), "no_saga", T0)
        async with backend.store.transaction() as holder:
            assert len(await holder.parked_for(saga_id)) == 1
            async with backend.store.transaction() as tx:
                assert await tx.expire_parked(T0 + timedelta(hours=1), 10) == []
        async with backend.store.transaction() as tx:
            assert len(await tx.expire_parked(T0 + timedelta(hours=1), 10)) == 1

    async def test_expiry_forgets_the_inbox_row_so_a_replay_is_applied(
        self, backend: Backend
    ) -> None:
        saga_id = saga_id_for(SAGA.name, "o-1")
        async with backend.store.transaction() as tx:
            claimed = await tx.lock_saga(SAGA, saga_id, message_id="m-early")
            await tx.park(SAGA.name, saga_id, "o-1", inbound("m-early"), "no_saga", T0)
        assert claimed.duplicate is False
        async with backend.store.transaction() as tx:
            assert (await tx.lock_saga(SAGA, saga_id, message_id="m-early")).duplicate is True
        async with backend.store.transaction() as tx:
            assert len(await tx.expire_parked(T0 + timedelta(hours=1), 10)) == 1
        async with backend.store.transaction() as tx:
            again = await tx.lock_saga(SAGA, saga_id, message_id="m-early")
        assert again.duplicate is False

    # dead letters

    async def test_dead_letters_upsert_per_queue_and_message(self, backend: Backend) -> None:
        message = inbound("m-bad", body=b"{not json")
        first = dead_letter(
            message,
            "malformed_json",
            "ValidationError",
            "line 1 col 2",
            handler="order_fulfilment",
            saga_type="order_fulfilment",
        )
        # The same message failing again after a replay: new headers, new cause.
        replayed = inbound("m-bad", body=b"changed", headers={"x-sagaworks-replay": 1})
        again = dead_letter(
            replayed, "schema_invalid", "ValidationError", "field 12 missing", handler="run_step"
        )
        t1, t2, t3 = T0, T0 + timedelta(minutes=3), T0 + timedelta(minutes=9)
        async with backend.store.transaction() as tx:
            await tx.dead_letter(first, t1)
        async with backend.store.transaction() as tx:
            await tx.dead_letter(again, t2)
            await tx.dead_letter(replace(first, inbound=replace(message, queue="elsewhere")), t2)
        # The dead letter delivered once more, headers unchanged: not a new failure.
        async with backend.store.transaction() as tx:
            await tx.dead_letter(replace(again, reason="oversized"), t3)

        rows = {r.queue: r for r in await backend.probe.dead_letters()}
        assert set(rows) == {"sagaworks.order_fulfilment", "elsewhere"}
        row = rows["sagaworks.order_fulfilment"]
        assert row.times_failed == 2
        assert (row.reason, row.exception_type, row.exception_message, row.handler) == (
            "schema_invalid",
            "ValidationError",
            "field 12 missing",
            "run_step",
        )
        assert row.fingerprint == fingerprint(
            "schema_invalid", "ValidationError", "field 12 missing", "run_step"
        )
        assert (row.first_failed_at, row.last_failed_at, row.status) == (t1, t2, "active")
        # Headers follow the latest failure, kept as handed over; the rest of the message is
        # kept from the first.
        assert row.headers == json.loads(json.dumps(replayed.headers, default=str))
        assert row.headers["x-sagaworks-replay"] == 1
        assert (row.body, row.saga_type) == (b"{not json", "order_fulfilment")
        assert (row.message_id, row.exchange, row.routing_key, row.message_type) == (
            "m-bad",
            "warehouse",
            "shipment.dispatched",
            "shipment.dispatched",
        )
        assert rows["elsewhere"].times_failed == 1
        assert rows["elsewhere"].fingerprint == fingerprint(
            "malformed_json", "ValidationError", "line 1 col 2", "order_fulfilment"
        )

    # atomicity

    async def test_a_transaction_that_raises_leaves_nothing_behind(self, backend: Backend) -> None:
        await self.to_wait(backend, "o-2")  # something to claim and lock, committed before
        other = saga_id_for(SAGA.name, "o-2")
        saga_id = saga_id_for(SAGA.name, "o-1")
        inbox_before = await backend.probe.inbox()

        async def everything_then_fail() -> None:
            async with backend.store.transaction() as tx:
                locked = await tx.lock_saga(SAGA, saga_id, message_id="m-1")
                await tx.save(
                    backend.wire.change(SAGA, decide(SAGA, locked.instance, placed("o-1"), T0))
                )
                assert len(tx.written_outbox()) == 1
                await tx.park(SAGA.name, saga_id, "o-1", inbound("m-p"), "no_saga", T0)
                await tx.dead_letter(dead_letter(inbound("m-d"), "oversized"), T0)
                assert await tx.claim_due_timer(DISPATCH_BY) is not None
                raise _Boom

        with pytest.raises(_Boom):
            await everything_then_fail()
        assert (await backend.store.load_sagas([(SAGA, saga_id)]))[0] is None
        assert await backend.probe.history(saga_id) == []
        assert await backend.probe.parked_ids() == []
        assert await backend.probe.dead_letters() == []
        assert await backend.probe.inbox() == inbox_before
        assert DEADLINE in await backend.probe.timers(other)
        assert {
            RunStep.model_validate_json(r.body).saga_id for r in await self.claimable(backend)
        } == {other}
        # Its locks went with it: the saga can be locked, and the message is not a duplicate.
        async with asyncio.timeout(5), backend.store.transaction() as tx:
            assert (await tx.lock_saga(SAGA, saga_id, message_id="m-1")).duplicate is False
            assert await tx.claim_due_timer(DISPATCH_BY) is not None

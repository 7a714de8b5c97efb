"""Eager steps: a step this worker can run now runs here instead of going round the broker.

When a transition commits a `RunStep` for a port this worker serves, whose
breaker is closed, while fewer than `per_port` of that port's steps run
eagerly here, its outbox row is written with a lease (in the transition's
own transaction) instead of being published, and the step runs in this
process as soon as the transaction committed. Its result goes through
`ApplyInputs` like any other (lock, inbox, decide, commit, publish); the row
is then marked published, so nobody sends it.

What the queue gave stays true. If this process dies before the result
committed, the sweeper publishes the row once its lease ran out and any
worker runs the step from the port's queue: the idempotency key makes a
second call harmless, and the saga's inbox (the command's message id) drops
a result that arrives twice. A breaker that is not closed, a port this worker
does not serve, or no spare eager capacity sends the command through the
queue as before; so does a breaker that opens before the call, and a worker
that stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sagaworks.application.circuit import CircuitOpen
from sagaworks.application.config import PortPolicy
from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.ports import OutboxRow, SagaChange
from sagaworks.domain.decide import Decision, RunStep
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import SagaInstance

__all__ = ["LEASE_FLOOR_S", "EagerStep", "EagerSteps", "leases"]

LEASE_FLOOR_S = 30.0
"""The shortest lease a port's eager steps get when no fixed lease is configured."""

_log = logging.getLogger("sagaworks.eager")


@dataclass(frozen=True, slots=True)
class EagerStep:
    """A committed step command this worker runs itself, and the saga as it left it."""

    definition: SagaDefinition[Any]
    instance: SagaInstance
    """The saga as the transition that sent the command committed it (its current version)."""
    command: RunStep
    message_id: str
    """The command's message id: the saga's inbox records the result under it, eager or queued."""
    queue: str
    """The port's queue, where the command would have gone (and goes, if this run fails)."""


def leases(
    policies: Mapping[str, PortPolicy], *, fixed_s: float | None, commit_s: float
) -> Callable[[str], float]:
    """Each port's lease: `fixed_s` when given, else the port's longest delivery plus
    `commit_s` (applying the result), and never under `LEASE_FLOOR_S`.

    A lease that runs out while the call is still going sends the command to the
    queue, and the step runs a second time: harmless, but a wasted call.
    """

    def lease_for(port: str) -> float:
        if fixed_s is not None:
            return fixed_s
        longest = policies.get(port, PortPolicy()).longest_delivery_s
        return max(LEASE_FLOOR_S, longest + commit_s)

    return lease_for


Commit = Callable[[], Awaitable[object]]
"""Applies a step's result (lock, inbox, decide, commit): a transaction, never cancelled."""

RunEagerStep = Callable[[EagerStep, OutboxRow], Awaitable[Commit]]
"""Calls the step's port and returns how to apply its result; `HandleStepCommand.run_eagerly`."""


class EagerSteps:
    """Decides which committed step commands run here, runs them, and falls back to the queue."""

    def __init__(
        self,
        relay: OutboxRelay,
        *,
        per_port: int,
        lease_for: Callable[[str], float],
        breaker_closed: Callable[[str], bool],
        queue_for: Callable[[str], str],
    ) -> None:
        """`lease_for(port)`: seconds a step of `port` keeps its command unpublished; longer
        than its call can take, or the queue would run it a second time meanwhile."""
        if per_port < 1:
            raise ValueError(f"eager steps need per_port ≥ 1, got {per_port}")
        self._relay = relay
        self._per_port = per_port
        self._lease_for = lease_for
        self._breaker_closed = breaker_closed
        self._queue_for = queue_for
        self._served: frozenset[str] = frozenset()
        self._running: Counter[str] = Counter()
        self._tasks: dict[asyncio.Task[None], OutboxRow] = {}
        self._committing: set[asyncio.Task[None]] = set()
        """Steps whose port answered and whose result is being applied: not to be cancelled."""
        self._run: RunEagerStep | None = None

    @property
    def running(self) -> int:
        """Eager steps taken and not finished yet, all ports together."""
        return sum(self._running.values())

    def bind(self, run: RunEagerStep) -> None:
        """The use case that runs a step (it needs `ApplyInputs`, which needs this)."""
        self._run = run

    def serve(self, ports: Iterable[str]) -> None:
        """Run steps of these ports here: the ports whose queues this worker consumes.

        None (at shutdown, when consuming stops): every new command goes to its queue.
        """
        self._served = frozenset(ports)

    def claim(
        self, definition: SagaDefinition[Any], decision: Decision, change: SagaChange
    ) -> tuple[SagaChange, list[EagerStep]]:
        """`change` with the step commands to run here leased, and those steps.

        Takes a place for each step; `release` gives them back if the
        transaction does not commit, `start` once it did.
        """
        if self._run is None or not self._served or decision.instance is None:
            return change, []
        steps: list[EagerStep] = []
        outbox = list(change.outbox)
        for i, (outgoing, pending) in enumerate(zip(decision.outgoing, outbox, strict=True)):
            command = outgoing.body
            if not isinstance(command, RunStep) or not self._take(command.port):
                continue
            outbox[i] = replace(pending, lease_s=self._lease_for(command.port))
            steps.append(
                EagerStep(
                    definition,
                    decision.instance,
                    command,
                    pending.message_id,
                    self._queue_for(command.port),
                )
            )
        if not steps:
            return change, []
        return replace(change, outbox=tuple(outbox)), steps

    def release(self, steps: Sequence[EagerStep]) -> None:
        """Give back the places of steps whose transaction did not commit."""
        for step in steps:
            self._give_back(step.command.port)

    def start(self, steps: Sequence[EagerStep], rows: Sequence[OutboxRow]) -> list[OutboxRow]:
        """Run the committed `steps`; returns the rest of `rows`, to publish as usual."""
        run = self._run
        assert run is not None, "claim() hands out steps only once bound"
        by_id = {step.message_id: step for step in steps}
        rest = []
        loop = asyncio.get_running_loop()
        for row in rows:
            step = by_id.pop(row.message_id, None)
            if step is None:
                rest.append(row)
                continue
            task = loop.create_task(self._execute(run, step, row), name=f"eager {row.message_id}")
            self._tasks[task] = row
            task.add_done_callback(self._forget)
        self.release(list(by_id.values()))  # a lease the store did not write: nothing to run
        return rest

    async def drain(self, deadline_s: float) -> None:
        """At shutdown: take no more steps, let running ones finish, queue the rest.

        Steps still waiting for their port after `deadline_s` are cancelled and
        their commands published to the ports' queues at once, rather than after
        their leases. A step whose result is being applied is let finish (for up to
        `deadline_s` more): cancelled, its result might commit all the same, and the
        queue would hold a command already done.
        """
        self._served = frozenset()
        if not self._tasks:
            return
        _, late = await asyncio.wait(list(self._tasks), timeout=deadline_s)
        at_port = [task for task in late if task not in self._committing]
        rows = [self._tasks[task] for task in at_port if task in self._tasks]
        for task in at_port:
            task.cancel()
        await asyncio.gather(*at_port, return_exceptions=True)
        if rows:
            await self._relay.publish_now(rows)
        committing = [task for task in late if task in self._committing]
        if committing:
            await asyncio.wait(committing, timeout=deadline_s)

    def _take(self, port: str) -> bool:
        if port not in self._served or self._running[port] >= self._per_port:
            return False
        if not self._breaker_closed(port):
            return False
        self._running[port] += 1
        return True

    def _give_back(self, port: str) -> None:
        self._running[port] -= 1
        if self._running[port] <= 0:
            del self._running[port]

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._committing.discard(task)

    async def _execute(self, run: RunEagerStep, step: EagerStep, row: OutboxRow) -> None:
        try:
            commit = await run(step, row)
            current = asyncio.current_task()
            if current is not None:
                self._committing.add(current)
            await commit()
            await self._relay.settled([row.id])
        except CircuitOpen:
            await self._send_instead(row, "the port's breaker opened")
        except Exception as error:  # noqa: BLE001 - the queue runs it; the lease is the backstop
            await self._send_instead(row, f"{type(error).__name__}: {error}")
        finally:
            self._give_back(step.command.port)

    async def _send_instead(self, row: OutboxRow, why: str) -> None:
        _log.warning(
            "eager step not run here; its command goes to the port's queue",
            extra={"message_id": row.message_id, "why": why},
        )
        await self._relay.publish_now([row])

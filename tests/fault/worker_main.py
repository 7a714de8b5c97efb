"""`sagaworks worker`, as a fault test runs it: optionally killed at one exact point.

Run as `python worker_main.py` with the worker's `SAGAWORKS_*` environment.
With `FAULT_KILL_AT=<point>` and `FAULT_KILL_ON=<n>` it patches the engine,
in this process only, so that the n-th time the worker reaches that point it
sends itself SIGKILL: no `finally`, no flush, no ack, exactly as a machine
losing power. The points (see docs/recoverability.md, "The fault suite"):

- `port_returned`: a step's port call returned; nothing committed yet;
- `committed`: a batch committed; its outbox rows not published;
- `published`: its outbox rows published and confirmed; deliveries not acked;
- `mid_batch`: a transaction of two or more sagas wrote them, not committed;
- `compensating`: a compensation's port call returned; nothing committed yet;
- `dead_letter_ingest`: a dead letter stored and committed; not acked.

Nothing in the shipped code exists for this: the patches wrap its methods.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sagaworks.adapters.postgres import store as postgres_store
from sagaworks.application.dead_letters import IngestDeadLetter
from sagaworks.application.handle_step_command import HandleStepCommand
from sagaworks.application.outbox import OutboxRelay
from sagaworks.entrypoints.cli.app import app

__all__ = ["POINTS"]


class _Countdown:
    def __init__(self, on: int) -> None:
        self.left = on

    def hit(self) -> None:
        self.left -= 1
        if self.left <= 0:
            sys.stderr.write(f"fault: SIGKILL at {os.environ['FAULT_KILL_AT']}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _after_port_call(countdown: _Countdown, kind: str | None) -> None:
    original = HandleStepCommand._call_port

    async def call_port(
        self: HandleStepCommand, definition: Any, instance: Any, command: Any, *rest: Any
    ) -> Any:
        finished = await original(self, definition, instance, command, *rest)
        if kind is None or command.kind == kind:
            countdown.hit()
        return finished

    HandleStepCommand._call_port = call_port  # type: ignore[method-assign]


def _port_returned(countdown: _Countdown) -> None:
    _after_port_call(countdown, "action")


def _compensating(countdown: _Countdown) -> None:
    _after_port_call(countdown, "compensation")


def _committed(countdown: _Countdown) -> None:
    original = OutboxRelay.publish_now

    async def publish_now(self: OutboxRelay, rows: Sequence[Any]) -> bool:
        if rows:
            countdown.hit()
        return await original(self, rows)

    OutboxRelay.publish_now = publish_now  # type: ignore[method-assign]


def _published(countdown: _Countdown) -> None:
    original = OutboxRelay.publish_now

    async def publish_now(self: OutboxRelay, rows: Sequence[Any]) -> bool:
        done = await original(self, rows)
        if rows and done:
            countdown.hit()
        return done

    OutboxRelay.publish_now = publish_now  # type: ignore[method-assign]


def _mid_batch(countdown: _Countdown) -> None:
    transaction = postgres_store._Transaction
    original = transaction.save_all

    async def save_all(self: Any, changes: Sequence[Any]) -> None:
        await original(self, changes)
        if len(changes) >= 2:
            countdown.hit()

    transaction.save_all = save_all  # type: ignore[method-assign]


def _dead_letter_ingest(countdown: _Countdown) -> None:
    original = IngestDeadLetter.__call__

    async def ingest(self: IngestDeadLetter, inbound: Any) -> Any:
        handled = await original(self, inbound)
        countdown.hit()
        return handled

    IngestDeadLetter.__call__ = ingest  # type: ignore[method-assign]


POINTS: dict[str, Callable[[_Countdown], None]] = {
    "port_returned": _port_returned,
    "committed": _committed,
    "published": _published,
    "mid_batch": _mid_batch,
    "compensating": _compensating,
    "dead_letter_ingest": _dead_letter_ingest,
}


def _dump_tasks(_signal: int, _frame: Any) -> None:
    """On SIGUSR1, print every asyncio task's stack: what a stuck worker waits for."""
    loop = asyncio.get_running_loop()
    for task in asyncio.all_tasks(loop):
        sys.stderr.write(f"task {task.get_name()}:\n")
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _dump_tasks)
    point = os.environ.get("FAULT_KILL_AT")
    if point:
        POINTS[point](_Countdown(int(os.environ["FAULT_KILL_ON"])))
    app(["worker"])

"""Locks as PostgreSQL takes them, for the in-memory store: exclusive, queued, deadlock-aware.

Every write locks what PostgreSQL would lock until its transaction ends, and
every statement yields to the event loop once, so concurrent deliveries
interleave as in production; a deadlock fails one transaction instead of
hanging the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

__all__ = ["DeadlockDetected", "Locks", "Owner", "round_trip"]


class DeadlockDetected(RuntimeError):
    """Two transactions wait for each other; PostgreSQL would abort one of them too."""


async def round_trip() -> None:
    """Let other tasks run, as they do while a statement travels to PostgreSQL and back.

    Without it a whole use case could run without ever yielding, and tests of
    concurrent deliveries would never interleave the way they do in production.
    """
    await asyncio.sleep(0)


class Owner:
    """Whoever holds locks: a transaction, or one autocommit statement."""

    def __init__(self) -> None:
        self.held: set[Hashable] = set()
        self.waiting_for: Hashable | None = None


class Locks:
    """Exclusive, re-entrant locks on keys, released together when their owner ends.

    Waiters wait on futures of the running loop, so one store can be used from
    several event loops in turn (as pytest may do).
    """

    def __init__(self) -> None:
        self._owners: dict[Hashable, Owner] = {}
        self._waiters: dict[Hashable, list[asyncio.Future[None]]] = {}

    def try_acquire(self, key: Hashable, owner: Owner) -> bool:
        holder = self._owners.get(key)
        if holder is not None and holder is not owner:
            return False
        if holder is None and self._waiters.get(key):
            return False  # someone queued first (released, but not yet woken)
        self._owners[key] = owner
        owner.held.add(key)
        return True

    async def acquire(self, key: Hashable, owner: Owner) -> None:
        while not self.try_acquire(key, owner):
            self._check_deadlock(key, owner)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, []).append(waiter)
            owner.waiting_for = key
            try:
                await waiter
            except BaseException:
                self._forget(key, waiter)
                if self._owners.get(key) is None:
                    self._wake(key)  # woken but leaving: hand the lock to the next in line
                raise
            finally:
                owner.waiting_for = None
            self._forget(key, waiter)
            if self._owners.get(key) is None:
                self._owners[key] = owner
                owner.held.add(key)
                return

    def _forget(self, key: Hashable, waiter: asyncio.Future[None]) -> None:
        queue = self._waiters.get(key, [])
        if waiter in queue:
            queue.remove(waiter)
        if not queue:
            self._waiters.pop(key, None)

    def _wake(self, key: Hashable) -> None:
        for waiter in self._waiters.get(key, ()):
            if not waiter.done():
                waiter.set_result(None)
                return

    def _check_deadlock(self, key: Hashable, owner: Owner) -> None:
        holder = self._owners.get(key)
        seen: set[int] = set()
        while holder is not None and id(holder) not in seen:
            if holder is owner:
                raise DeadlockDetected(f"deadlock detected waiting for {key!r}")
            seen.add(id(holder))
            waited = holder.waiting_for
            holder = None if waited is None else self._owners.get(waited)

    def release_all(self, owner: Owner) -> None:
        for key in owner.held:
            if self._owners.get(key) is owner:
                del self._owners[key]
                self._wake(key)
        owner.held.clear()

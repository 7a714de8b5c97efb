"""What the dead-letter use cases need from the store, as a Protocol and plain records.

Only operators' tools read dead letters: the hot path writes them through
`SagaTransaction.dead_letter` and never reads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from sagaworks.application.ports.messages import BodyDigest, OutboxRow

__all__ = [
    "AuditEntry",
    "AuditRecord",
    "DeadLetterFilter",
    "DeadLetterRepository",
    "FailureGroup",
    "StoredDeadLetter",
]


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an operator means; empty fields do not filter."""

    ids: tuple[int, ...] = ()
    statuses: tuple[str, ...] = ("active",)
    """Empty: any status."""
    reason: str | None = None
    fingerprint: str | None = None
    saga_type: str | None = None
    routing_key: str | None = None
    queue: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    text: str | None = None
    """Case-insensitive substring of the exception type or message."""

    def is_empty(self) -> bool:
        """True when nothing but the status narrows the selection."""
        return not (
            self.ids
            or self.reason
            or self.fingerprint
            or self.saga_type
            or self.routing_key
            or self.queue
            or self.since
            or self.until
            or self.text
        )


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """One row of the dead-letter store."""

    id: int
    message_id: str
    queue: str
    exchange: str
    routing_key: str
    message_type: str | None
    saga_type: str | None
    headers: Mapping[str, Any]
    body: bytes
    original_body: bytes | None
    reason: str
    exception_type: str | None
    exception_message: str | None
    handler: str | None
    fingerprint: str
    first_failed_at: datetime
    last_failed_at: datetime
    times_failed: int
    times_replayed: int
    status: str
    raw_fields: Mapping[str, bytes] = field(default_factory=dict)
    """Original bytes of the fields escaped to be stored (see `InboundMessage.raw_fields`)."""
    whole_body: BodyDigest | None = None
    """Length and SHA-256 of the whole body when `body` holds only its first bytes."""
    first_body: bytes | None = None
    """For an `id_conflict`: the body processed first under the same id; never replayed."""


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Dead letters sharing a fingerprint, with the newest one's error as the example."""

    fingerprint: str
    count: int
    first_failed_at: datetime
    last_failed_at: datetime
    reason: str
    handler: str | None
    exception_type: str | None
    exception_message: str | None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What an operator did, to be written next to the change it describes."""

    operator: str
    action: str
    batch_id: UUID
    outcome: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit row. `operator` is what the operator declared; the rest the store saw."""

    id: int
    at: datetime
    operator: str
    action: str
    batch_id: UUID | None
    dead_letter_id: int | None
    outcome: str
    detail: Mapping[str, Any]
    db_role: str | None = None
    """The database role that wrote the row (`current_user`); None where there are no roles."""
    client_addr: str | None = None
    """The database client's address (`inet_client_addr()`); None over a Unix socket."""
    client_hostname: str | None = None
    """The host the operator's tool ran on, as that tool reported it."""


class DeadLetterRepository(Protocol):
    """Reads and operator changes of the dead-letter store; each method is one transaction."""

    async def find(
        self, selection: DeadLetterFilter, *, limit: int, offset: int = 0
    ) -> list[StoredDeadLetter]:
        """Newest failure first."""
        ...

    async def count(self, selection: DeadLetterFilter) -> int: ...

    async def ids(self, selection: DeadLetterFilter) -> list[int]:
        """Every matching id, oldest first (the order replay works in)."""
        ...

    async def groups(self, selection: DeadLetterFilter, *, limit: int) -> list[FailureGroup]:
        """Largest group first."""
        ...

    async def get(self, letter_id: int) -> StoredDeadLetter | None: ...

    async def history(self, letter_id: int) -> list[AuditEntry]:
        """The letter's audit trail, oldest first."""
        ...

    async def stage_replay(
        self, letter: StoredDeadLetter, outbox_key: str, headers: Mapping[str, Any]
    ) -> OutboxRow:
        """Write (or find, when a killed run wrote it already) the replay's outbox row."""
        ...

    async def confirm_replay(self, letter_id: int, outbox_id: int, audit: AuditRecord) -> None:
        """After the broker confirmed: outbox row published, letter replayed, audit row."""
        ...

    async def abandon_replay(self, letter_id: int, outbox_id: int, audit: AuditRecord) -> None:
        """The publish failed: drop the staged row so no sweeper sends it later; audit."""
        ...

    async def save_body(self, letter_id: int, body: bytes, audit: AuditRecord) -> None:
        """Replace the body, keeping the first original in `original_body`; audit."""
        ...

    async def audit(self, letter_ids: Sequence[int | None], audit: AuditRecord) -> None: ...

    async def archive(self, letter_ids: Sequence[int], audit: AuditRecord) -> int: ...

    async def purge(self, letter_ids: Sequence[int], audit: AuditRecord) -> int:
        """Delete the letters; their audit rows stay, naming the message in `detail`."""
        ...

"""Messages too large to take: never parsed, kept as their first bytes, length and SHA-256.

A body over `EngineOptions.max_message_bytes` is refused on every queue the
worker consumes (saga, port and dead-letter queues) before anything reads it,
and stored as a dead letter (`oversized`) of at most `KEPT_BYTES`: enough to
see what it was, while a stream of huge messages cannot fill the database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace

from sagaworks.application.dead_letters import QueueOwner, where_it_failed
from sagaworks.application.ports import BodyDigest, Clock, InboundMessage, Store
from sagaworks.application.results import Handled
from sagaworks.application.stored import dead_letter

__all__ = ["KEPT_BYTES", "RejectOversized"]

KEPT_BYTES = 4096
"""How much of an oversized body the dead letter keeps."""


class RejectOversized:
    """Store an oversized delivery as a dead letter without parsing it; the caller acks.

    A delivery from the dead-letter queue is stored under the queue that
    failed it, as ingestion would store it.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        max_bytes: int,
        owners: Mapping[str, QueueOwner],
        dead_letter_queue: str,
    ) -> None:
        self.max_bytes = max_bytes
        self._store = store
        self._clock = clock
        self._owners = owners
        self._dead_letter_queue = dead_letter_queue

    async def __call__(self, inbound: InboundMessage) -> Handled:
        body = inbound.body
        whole = BodyDigest(len(body), hashlib.sha256(body).hexdigest())
        kept = replace(
            inbound,
            message_id=inbound.message_id or inbound.content_key or f"no-id:{whole.sha256}",
            body=body[:KEPT_BYTES],
        )
        if inbound.queue == self._dead_letter_queue:
            kept = where_it_failed(kept)
        owner = self._owners.get(kept.queue, QueueOwner())
        letter = dead_letter(
            kept,
            "oversized",
            "MessageTooLarge",
            f"body is {whole.length} bytes (SHA-256 {whole.sha256}); the limit is "
            f"{self.max_bytes} (SAGAWORKS_MAX_MESSAGE_BYTES); only its first "
            f"{len(kept.body)} bytes are kept",
            handler="run_step" if owner.runs_steps else owner.saga_type,
            saga_type=owner.saga_type,
            whole_body=whole,
        )
        async with self._store.transaction() as tx:
            await tx.dead_letter(letter, self._clock.now())
        return Handled("dead_lettered", "oversized")

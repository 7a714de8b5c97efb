"""How failures are grouped: one rule for every store.

Both the PostgreSQL and the in-memory store must group failures the same way,
so the fingerprint is computed here, not in either adapter: a use case hands
a store a `DeadLetter` already grouped.
"""

from __future__ import annotations

import hashlib
import re

from sagaworks.application.ports import DeadLetter, InboundMessage

__all__ = ["dead_letter", "fingerprint"]

_VOLATILE = re.compile(r"[0-9a-f]{8,}|\d+")


def fingerprint(
    reason: str, exception_type: str | None, message: str | None, handler: str | None
) -> str:
    """Groups failures that share a cause: digits and hex ids are blanked out of the message."""
    normalised = _VOLATILE.sub("#", (message or "").lower())[:300]
    raw = "\x1f".join((reason, exception_type or "", normalised, handler or ""))
    return hashlib.sha1(raw.encode(), usedforsecurity=False).hexdigest()[:16]


def dead_letter(
    inbound: InboundMessage,
    reason: str,
    exception_type: str | None = None,
    exception_message: str | None = None,
    *,
    handler: str | None = None,
    saga_type: str | None = None,
) -> DeadLetter:
    """A complete dead letter: the delivery, why it failed, and the group it falls in."""
    return DeadLetter(
        inbound,
        reason,
        exception_type,
        exception_message,
        handler,
        saga_type,
        fingerprint(reason, exception_type, exception_message, handler),
    )

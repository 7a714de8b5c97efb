"""Rules every store shares: how failures are grouped, how sagas lock and read back.

A use case hands a store a `DeadLetter` already grouped (`dead_letter`); both
the PostgreSQL and the in-memory store read a saga row back as the same
instance (`saga_from_row`) and lock a batch's sagas in one order
(`lock_key`), so these rules live here, not in either adapter.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any
from uuid import UUID

from sagaworks.application.ports import BodyDigest, DeadLetter, InboundMessage
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import InFlight, SagaInstance, Status

__all__ = [
    "body_hash",
    "dead_letter",
    "fingerprint",
    "lock_key",
    "original_bytes",
    "refuse_repeats",
    "saga_from_row",
    "storable_text",
]

_VOLATILE = re.compile(r"[0-9a-f]{8,}|\d+")


def storable_text(text: str) -> str:
    """`text` as every store can keep it: NUL written `\\u0000`, undecodable bytes `\\xNN`.

    PostgreSQL's `text` and `jsonb` refuse NUL, and a delivery's bytes that were not
    UTF-8 arrive as lone surrogates, which no UTF-8 column takes. `original_bytes`
    gives back what was escaped, so a caller can keep that too.
    """
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = original_bytes(text).decode("utf-8", "backslashreplace")
    return text.replace("\x00", "\\u0000") if "\x00" in text else text


def original_bytes(text: str) -> bytes:
    """The bytes a text field arrived as, lone surrogates back to the bytes they stand for."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _storable(text: str | None) -> str | None:
    return None if text is None else storable_text(text)


def fingerprint(
    reason: str, exception_type: str | None, message: str | None, handler: str | None
) -> str:
    """Groups failures that share a cause: digits and hex ids are blanked out of the message."""
    normalised = _VOLATILE.sub("#", (message or "").lower())[:300]
    raw = "\x1f".join((reason, exception_type or "", normalised, handler or ""))
    return hashlib.sha1(raw.encode(), usedforsecurity=False).hexdigest()[:16]


def body_hash(body: bytes) -> bytes:
    """The hash the inbox keeps with a body: the same message id with another hash conflicts."""
    return hashlib.blake2b(body, digest_size=16).digest()


def dead_letter(
    inbound: InboundMessage,
    reason: str,
    exception_type: str | None = None,
    exception_message: str | None = None,
    *,
    handler: str | None = None,
    saga_type: str | None = None,
    whole_body: BodyDigest | None = None,
    first_body: bytes | None = None,
) -> DeadLetter:
    """A complete dead letter: the delivery, why it failed, and the group it falls in.

    A delivery without an id is kept under its content key, so no id-less
    letter overwrites another and the same one delivered twice is one letter.
    An error's text may quote what the message carried (a NUL in its id), so it is
    made storable like the delivery's own fields.
    """
    if not inbound.message_id:
        key = inbound.content_key or f"no-id:{hashlib.sha256(inbound.body).hexdigest()}"
        inbound = replace(inbound, message_id=key)
    exception_type, exception_message = _storable(exception_type), _storable(exception_message)
    handler, saga_type = _storable(handler), _storable(saga_type)
    return DeadLetter(
        inbound,
        reason,
        exception_type,
        exception_message,
        handler,
        saga_type,
        fingerprint(reason, exception_type, exception_message, handler),
        whole_body,
        first_body,
    )


def lock_key(saga_id: UUID) -> int:
    """A signed 64-bit key from the saga id: the advisory lock key, and the order of batches."""
    return int.from_bytes(saga_id.bytes[:8], "big", signed=True)


def refuse_repeats(saga_ids: Iterable[UUID]) -> None:
    """A batch names each saga once; a second entry would be a second, conflicting write."""
    ids = list(saga_ids)
    if len(set(ids)) != len(ids):
        repeated = sorted({str(i) for i in ids if ids.count(i) > 1})
        raise ValueError(f"saga(s) {', '.join(repeated)} appear twice in one batch; at most once")


def saga_from_row(
    definition: SagaDefinition[Any],
    saga_id: UUID,
    *,
    correlation_key: str,
    status: str,
    state: str,
    version: int,
    progress: Mapping[str, Any],
) -> SagaInstance:
    """The instance a `saga_instances` row holds; `state` is the state model as JSON."""
    flight = progress.get("in_flight")
    stopped = progress.get("stopped")
    return SagaInstance(
        id=saga_id,
        saga_type=definition.name,
        correlation_key=correlation_key,
        correlation_id=progress.get("correlation_id") or correlation_key,
        status=Status(status),
        position=int(progress["position"]),
        state=definition.state.model_validate_json(state),
        version=version,
        in_flight=InFlight.from_json(flight) if flight else None,
        done=tuple(progress.get("done", ())),
        reason=progress.get("reason"),
        error=progress.get("error"),
        stopped=InFlight.from_json(stopped) if stopped else None,
        paused=bool(progress.get("paused", False)),
    )

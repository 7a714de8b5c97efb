"""Wiring of dead-letter ingestion into the worker: which queue, and who owns each saga queue."""

from __future__ import annotations

from sagaworks.adapters.rabbitmq.topology import (
    dead_letter_queue_name,
    port_queue_name,
    saga_queue_name,
)
from sagaworks.application.dead_letters import IngestDeadLetter, LastErrors, QueueOwner
from sagaworks.bootstrap import System, SystemClock

__all__ = ["dead_letter_ingestion"]


def dead_letter_ingestion(system: System, last_errors: LastErrors) -> tuple[str, IngestDeadLetter]:
    """The dead-letter queue's name and the use case that stores what arrives on it.

    The owners map lets a stored letter name the saga or step that failed,
    which the failure fingerprint groups by.
    """
    prefix = system.settings.exchange_prefix
    owners = {
        saga_queue_name(prefix, d.name): QueueOwner(saga_type=d.name) for d in system.registry
    }
    owners.update(
        {port_queue_name(prefix, p): QueueOwner(runs_steps=True) for p in system.registry.ports()}
    )
    ingest = IngestDeadLetter(system.store, SystemClock(), owners, last_errors)
    return dead_letter_queue_name(prefix), ingest

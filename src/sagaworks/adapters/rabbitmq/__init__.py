"""RabbitMQ adapter: connection, idempotent topology, confirmed publishing, reading deliveries.

RabbitMQ's quirks (quorum-queue arguments, PRECONDITION_FAILED on re-declare,
robust reconnects) are handled here and surface to operators as an error that
says what to do.
"""

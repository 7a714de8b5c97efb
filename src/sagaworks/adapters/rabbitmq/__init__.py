"""RabbitMQ adapter: connection, idempotent topology and their failure modes.

Everything broker-specific lives here so that a RabbitMQ quirk (quorum-queue
arguments, PRECONDITION_FAILED on re-declare, robust reconnects) is handled
in one place and surfaces to operators as an error that says what to do.
"""

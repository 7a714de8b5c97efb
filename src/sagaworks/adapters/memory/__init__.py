"""In-memory adapters: the saga store and the publisher without PostgreSQL or RabbitMQ.

They keep the semantics of the real adapters (locks, inbox dedupe, version
checks, atomic transactions, `SKIP LOCKED` claims) so use cases and sagas can
be tested with no I/O, and a shared contract suite keeps both stores honest.
"""

"""In-memory adapters: the saga store, dead-letter repository, breaker log and publisher.

They keep the semantics of the real adapters (locks, inbox dedupe, version
checks, atomic transactions, `SKIP LOCKED` claims) so use cases and sagas can
be tested with no I/O; the contract suites under `tests/contract` run each
against its PostgreSQL counterpart to keep both honest.
"""

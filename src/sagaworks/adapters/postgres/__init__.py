"""PostgreSQL adapter: schema, migrations and engine for the saga store.

Saga state, history, inbox, outbox, timers, parked messages and dead letters
all live in one database so a handled message commits atomically.
"""

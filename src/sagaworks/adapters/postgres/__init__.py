"""PostgreSQL adapter: schema, migrations, the saga store, dead letters and breaker records.

Saga state, history, inbox, outbox, timers, parked messages and dead letters
all live in one database so a handled message commits atomically.
"""

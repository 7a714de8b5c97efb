"""Retention on the real database: what `PruneDatabase` deletes, what it keeps, and how.

A database is seeded with rows on both sides of every cut-off; a prune in
batches of two must delete exactly the old, finished, settled ones, leave
every row the engine may still need, go through the history's append-only
trigger only by deleting the saga, and skip a saga a worker holds.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
import pytest
from broker_tools import delete_prefixed
from test_cli import cli_env, sagaworks

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.simulation.participants import simulated_ports
from sagaworks.adapters.memory.clock import FakeClock
from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.postgres.retention import PostgresRetention
from sagaworks.application.ports import Prunable
from sagaworks.application.retention import Prune, Pruned, PruneDatabase, RetentionPolicy
from sagaworks.application.stored import lock_key
from sagaworks.bootstrap import bootstrap
from sagaworks.entrypoints.worker import Worker
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
POLICY = RetentionPolicy(
    keep={
        Prunable.INBOX: 7 * DAY,
        Prunable.OUTBOX: timedelta(hours=1),
        Prunable.SAGAS: 30 * DAY,
        Prunable.DEAD_LETTERS: 30 * DAY,
        Prunable.BREAKERS: 7 * DAY,
    },
    batch_size=2,
    pause=timedelta(0),
)


async def add_saga(db: asyncpg.Connection, key: str, status: str, updated: datetime) -> uuid.UUID:
    saga_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO saga_instances (id, saga_type, correlation_key, status, state, "
        "state_schema_version, created_at, updated_at) "
        "VALUES ($1, 'order', $2, $3, '{}', 1, $4, $4)",
        saga_id,
        key,
        status,
        updated,
    )
    for seq in (1, 2):
        await db.execute(
            "INSERT INTO saga_history (saga_id, seq, at, kind) VALUES ($1, $2, $3, 'started')",
            saga_id,
            seq,
            updated,
        )
    await db.execute(
        "INSERT INTO timers (saga_id, name, fire_at) VALUES ($1, 'deadline', $2)", saga_id, updated
    )
    return saga_id


async def add_letter(db: asyncpg.Connection, message_id: str, status: str, at: datetime) -> int:
    letter_id: int = await db.fetchval(
        "INSERT INTO dead_letters (message_id, queue, exchange, routing_key, body, reason, "
        "fingerprint, first_failed_at, last_failed_at, status) "
        "VALUES ($1, 'q', 'x', 'r', '', 'no_saga', 'f', $2, $2, $3) RETURNING id",
        message_id,
        at,
        status,
    )
    return letter_id


async def seed(db: asyncpg.Connection, now: datetime = NOW) -> dict[str, object]:
    """Rows on both sides of every cut-off from `now`; returns the ids a test looks for."""
    old, recent = now - timedelta(days=40), now - timedelta(minutes=5)
    for i in range(5):
        await db.execute(
            "INSERT INTO inbox (consumer, message_id, processed_at) VALUES ('q', $1, $2)",
            f"old-{i}",
            old,
        )
    await db.execute(
        "INSERT INTO inbox (consumer, message_id, processed_at) VALUES ('q', 'new', $1)", recent
    )
    for i in range(3):
        await db.execute(
            "INSERT INTO outbox (message_id, exchange, routing_key, body, published_at) "
            "VALUES ($1, 'x', 'r', '', $2)",
            f"published-{i}",
            old,
        )
    await db.execute(
        "INSERT INTO outbox (message_id, exchange, routing_key, body, created_at) "
        "VALUES ('unpublished', 'x', 'r', '', $1)",
        old,
    )
    await db.execute(
        "INSERT INTO outbox (message_id, exchange, routing_key, body, published_at) "
        "VALUES ('just-published', 'x', 'r', '', $1)",
        recent,
    )
    sagas = {
        "completed-old": await add_saga(db, "o-1", "completed", old),
        "compensated-old": await add_saga(db, "o-2", "compensated", old),
        "completed-new": await add_saga(db, "o-3", "completed", recent),
        "running-old": await add_saga(db, "o-4", "running", old),
        "attention-old": await add_saga(db, "o-5", "needs_attention", old),
    }
    letters = {
        "archived-old": await add_letter(db, "m-1", "archived", old),
        "replayed-old": await add_letter(db, "m-2", "replayed", old),
        "replayed-lately": await add_letter(db, "m-3", "replayed", old),
        "active-old": await add_letter(db, "m-4", "active", old),
        "archived-new": await add_letter(db, "m-5", "archived", recent),
    }
    for name, at in (("archived-old", old), ("replayed-lately", recent)):
        await db.execute(
            "INSERT INTO dead_letter_audit (at, operator, action, dead_letter_id, outcome) "
            "VALUES ($1, 'alice', 'replay', $2, 'ok')",
            at,
            letters[name],
        )
    for worker, at in (("gone:1", old), ("live:2", recent)):
        await db.execute(
            "INSERT INTO port_breakers (port, worker, state, failures, changed_at) "
            "VALUES ('payments', $1, 'closed', 0, $2)",
            worker,
            at,
        )
    return {"sagas": sagas, "letters": letters}


@pytest.fixture
async def retention(migrated_database_url: str) -> AsyncIterator[PostgresRetention]:
    engine = create_engine(migrated_database_url, pool_size=2, max_overflow=0)
    yield PostgresRetention(engine)
    await engine.dispose()


def prune_with(retention: PostgresRetention) -> PruneDatabase:
    return PruneDatabase(retention, FakeClock(NOW), POLICY)


async def test_a_prune_deletes_exactly_what_is_old_finished_or_settled(
    db: asyncpg.Connection, retention: PostgresRetention
) -> None:
    seeded = await seed(db)
    sagas: dict[str, uuid.UUID] = seeded["sagas"]  # type: ignore[assignment]
    letters: dict[str, int] = seeded["letters"]  # type: ignore[assignment]
    heard: list[Pruned] = []

    results = await prune_with(retention)(Prune(), heard.append)

    assert {p.what: p.rows for p in results} == {
        Prunable.INBOX: 5,
        Prunable.OUTBOX: 3,
        Prunable.SAGAS: 2,
        Prunable.DEAD_LETTERS: 2,
        Prunable.BREAKERS: 1,
    }
    inbox = results[0]
    assert (inbox.batches, inbox.done) == (3, True), "5 rows in batches of 2: 2 + 2 + 1"
    assert [p.rows for p in heard if p.what is Prunable.INBOX] == [2, 4, 5]
    assert [r["message_id"] for r in await db.fetch("SELECT message_id FROM inbox")] == ["new"]
    assert sorted(r["message_id"] for r in await db.fetch("SELECT message_id FROM outbox")) == [
        "just-published",
        "unpublished",
    ]
    kept = {r["id"] for r in await db.fetch("SELECT id FROM saga_instances")}
    assert kept == {sagas["completed-new"], sagas["running-old"], sagas["attention-old"]}
    history = {r["saga_id"] for r in await db.fetch("SELECT DISTINCT saga_id FROM saga_history")}
    timers = {r["saga_id"] for r in await db.fetch("SELECT saga_id FROM timers")}
    assert history == timers == kept, "history and timers went with their saga"
    left = {r["id"] for r in await db.fetch("SELECT id FROM dead_letters")}
    assert left == {letters["replayed-lately"], letters["active-old"], letters["archived-new"]}
    audit = await db.fetch("SELECT dead_letter_id FROM dead_letter_audit ORDER BY at")
    assert [r["dead_letter_id"] for r in audit] == [None, letters["replayed-lately"]], (
        "the audit of a pruned letter stays"
    )
    breakers = await db.fetch("SELECT worker FROM port_breakers")
    assert [r["worker"] for r in breakers] == ["live:2"]

    again = await prune_with(retention)(Prune())
    assert {p.rows for p in again} == {0}


async def test_a_dry_run_counts_and_deletes_nothing(
    db: asyncpg.Connection, retention: PostgresRetention
) -> None:
    await seed(db)
    before = await db.fetchval("SELECT count(*) FROM inbox")

    results = await prune_with(retention)(Prune(dry_run=True, only=frozenset({Prunable.INBOX})))

    assert [(p.what, p.rows, p.dry_run) for p in results] == [(Prunable.INBOX, 5, True)]
    assert await db.fetchval("SELECT count(*) FROM inbox") == before


async def test_a_saga_a_worker_holds_is_left_for_the_next_run(
    db: asyncpg.Connection, retention: PostgresRetention, migrated_database_url: str
) -> None:
    seeded = await seed(db)
    held: uuid.UUID = seeded["sagas"]["completed-old"]  # type: ignore[index]
    worker = await asyncpg.connect(migrated_database_url.replace("+asyncpg", ""))
    try:
        async with worker.transaction():
            await worker.execute("SELECT pg_advisory_xact_lock($1)", lock_key(held))
            first = await prune_with(retention)(Prune(only=frozenset({Prunable.SAGAS})))
        second = await prune_with(retention)(Prune(only=frozenset({Prunable.SAGAS})))
    finally:
        await worker.close()

    assert [p.rows for p in first] == [1], "the other finished saga went"
    assert [p.rows for p in second] == [1], "the held one goes once released"


async def test_one_pruner_at_a_time(
    retention: PostgresRetention, migrated_database_url: str
) -> None:
    # Two connections: the lock's, and the one each batch runs on.
    other_engine = create_engine(migrated_database_url, pool_size=2, max_overflow=0)
    try:
        other = PostgresRetention(other_engine)
        async with retention.exclusively() as first, other.exclusively() as second:
            assert (first, second) == (True, False)
        async with other.exclusively() as after:
            assert after is True, "released when the first pruner finished"
        assert await PruneDatabase(other, FakeClock(NOW), POLICY).if_nobody_else() is not None
    finally:
        await other_engine.dispose()


async def test_db_prune_on_the_command_line(
    db: asyncpg.Connection, migrated_database_url: str, run_id: str
) -> None:
    await seed(db, datetime.now(UTC))
    env = cli_env(
        migrated_database_url,
        f"{run_id}.prune.",
        SAGAWORKS_RETAIN_INBOX_S="3600",
        SAGAWORKS_RETAIN_FINISHED_SAGAS_S="0",
        SAGAWORKS_PRUNE_BATCH_SIZE="2",
    )

    dry = await sagaworks("db", "prune", "--dry-run", "--json", env=env)
    assert dry.code == 0, dry.stderr
    assert json.loads(dry.stdout)["pruned"]["inbox"]["rows"] == 5
    assert json.loads(dry.stdout)["kept_for_ever"] == ["sagas"]
    assert await db.fetchval("SELECT count(*) FROM inbox") == 6

    run = await sagaworks("db", "prune", env=env)
    assert run.code == 0, run.stderr
    assert "inbox: 2 deleted so far" in run.stderr
    assert "sagas         kept for ever" in run.stdout
    assert await db.fetchval("SELECT count(*) FROM inbox") == 1
    assert await db.fetchval("SELECT count(*) FROM saga_instances") == 5

    nothing = await sagaworks("db", "prune", "--only", "sagas", env=env)
    assert nothing.code == 2
    assert "SAGAWORKS_RETAIN_" in nothing.stderr


async def test_concurrent_hot_path_writes_are_never_blocked_for_long(
    db: asyncpg.Connection, retention: PostgresRetention
) -> None:
    await seed(db)
    async with db.transaction():
        await db.execute("SELECT 1 FROM inbox WHERE message_id = 'old-0' FOR UPDATE")
        pruned = await asyncio.wait_for(
            prune_with(retention)(Prune(only=frozenset({Prunable.INBOX}))), 30
        )
    assert [p.rows for p in pruned] == [4], "the row a transaction holds is skipped, not awaited"


async def test_a_worker_prunes_on_its_schedule(
    db: asyncpg.Connection,
    migrated_database_url: str,
    settings_factory: Callable[..., Settings],
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    await seed(db, datetime.now(UTC))
    settings = settings_factory(
        database_url=migrated_database_url,
        prune_interval_s=0.5,
        retain_inbox_s=3600,
        retain_finished_sagas_s=0,
    )
    system = await bootstrap(settings, [order_fulfilment], simulated_ports())
    worker = Worker(system)
    await worker.start()
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while await db.fetchval("SELECT count(*) FROM inbox") > 1:
            assert asyncio.get_running_loop().time() < deadline, "the worker never pruned"
            await asyncio.sleep(0.2)
    finally:
        await worker.stop()
        await system.aclose()
        await delete_prefixed(broker, settings.exchange_prefix)

    assert await db.fetchval("SELECT message_id FROM inbox") == "new"
    assert await db.fetchval("SELECT count(*) FROM saga_instances") == 5, "sagas: kept for ever"
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 1

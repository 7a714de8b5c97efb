"""`saga list`, `saga show` and `saga stuck` on a PostgreSQL store of a few thousand sagas.

The store is filled by `saga_volume.fill` (the shape the million-saga
measurement uses). Each filter's result is checked against the same
question answered in Python over every row, so the SQL translation is
tested, not restated. The commands run as the console script does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from saga_volume import fill
from test_cli import cli_env, dsn, sagaworks

from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.postgres.saga_queries import PostgresSagaQueries
from sagaworks.application.operations import SagaFilter, SagaSort

pytestmark = pytest.mark.integration

SAGAS = 3_000


@pytest.fixture
async def store(migrated_database_url: str) -> str:
    conn = await asyncpg.connect(dsn(migrated_database_url))
    try:
        await fill(conn, SAGAS)
    finally:
        await conn.close()
    return migrated_database_url


@pytest.fixture
async def queries(store: str) -> AsyncIterator[PostgresSagaQueries]:
    engine = create_engine(store, pool_size=2, max_overflow=0)
    yield PostgresSagaQueries(engine)
    await engine.dispose()


async def every_saga(url: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn(url))
    try:
        rows = await conn.fetch(
            "SELECT id, saga_type, correlation_key, status, current_step, created_at, "
            "updated_at, progress::text AS progress, now() AS now FROM saga_instances"
        )
    finally:
        await conn.close()
    return [{**r, "progress": json.loads(r["progress"])} for r in rows]


async def listed(queries: PostgresSagaQueries, selection: SagaFilter, sort: SagaSort) -> list[Any]:
    """Every saga the filter selects, page by page, in the order listed."""
    found, offset = [], 0
    while True:
        page = await queries.find(selection, sort, limit=97, offset=offset)
        found.extend(page.items)
        if not page.more:
            return found
        offset += 97


async def test_each_filter_selects_exactly_the_sagas_it_names(
    store: str, queries: PostgresSagaQueries
) -> None:
    rows = await every_saga(store)
    now = rows[0]["now"]
    cutoff = now - timedelta(days=30)
    changed = sorted(r["updated_at"] for r in rows)[len(rows) // 2]
    cases: list[tuple[SagaFilter, Any]] = [
        (SagaFilter(), lambda r: True),
        (SagaFilter(saga_types=("refund",)), lambda r: r["saga_type"] == "refund"),
        (
            SagaFilter(saga_types=("refund",), statuses=("needs_attention", "running")),
            lambda r: r["saga_type"] == "refund" and r["status"] in ("needs_attention", "running"),
        ),
        (
            SagaFilter(current_steps=("authorise_payment",)),
            lambda r: r["current_step"] == "authorise_payment",
        ),
        (
            SagaFilter(correlation_key="ord-00000042"),
            lambda r: r["correlation_key"] == "ord-00000042",
        ),
        (
            SagaFilter(correlation_key_prefix="ord-000012"),
            lambda r: r["correlation_key"].startswith("ord-000012"),
        ),
        (SagaFilter(older_than=timedelta(days=30)), lambda r: r["created_at"] < cutoff),
        (SagaFilter(younger_than=timedelta(days=30)), lambda r: r["created_at"] >= cutoff),
        (SagaFilter(changed_before=changed), lambda r: r["updated_at"] < changed),
        (SagaFilter(changed_after=changed), lambda r: r["updated_at"] >= changed),
        (
            SagaFilter(failure="card_expired"),
            lambda r: (r["progress"].get("error") or r["progress"].get("reason")) == "card_expired",
        ),
    ]
    for selection, wanted in cases:
        expected = {r["id"] for r in rows if wanted(r)}
        got = [s.id for s in await listed(queries, selection, SagaSort())]
        assert len(got) == len(set(got)), f"{selection}: pages overlap"
        assert set(got) == expected, selection
        assert expected, f"{selection} selects nothing: the case proves nothing"


async def test_stuck_and_failure_group_filters_agree_with_the_views(
    store: str, queries: PostgresSagaQueries
) -> None:
    conn = await asyncpg.connect(dsn(store))
    try:
        by_reason = await conn.fetch(
            "SELECT reason, array_agg(saga_id) AS ids FROM sagaworks_read.stuck_sagas GROUP BY 1"
        )
        group = await conn.fetchrow(
            "SELECT d.fingerprint, array_agg(ds.saga_id) AS ids "
            "FROM sagaworks_read.dead_letter_sagas ds JOIN dead_letters d "
            "ON d.id = ds.dead_letter_id GROUP BY 1 ORDER BY 1 LIMIT 1"
        )
    finally:
        await conn.close()
    assert {r["reason"] for r in by_reason} >= {"needs_attention", "step_retrying", "dead_lettered"}
    for row in by_reason:
        selection = SagaFilter(stuck_reasons=(row["reason"],))
        got = {s.id for s in await listed(queries, selection, SagaSort())}
        assert got == set(row["ids"]), row["reason"]
        stuck = await queries.stuck(selection, limit=10_000)
        assert {s.saga_id for s in stuck} == set(row["ids"])
        assert [s.since for s in stuck] == sorted(s.since for s in stuck), "longest stuck first"
    assert group is not None
    got = {
        s.id
        for s in await listed(queries, SagaFilter(failure_group=group["fingerprint"]), SagaSort())
    }
    assert got == set(group["ids"])


async def test_listing_sorts_by_the_chosen_key_and_breaks_ties_by_id(
    queries: PostgresSagaQueries,
) -> None:
    for key, field in (
        ("created", "created_at"),
        ("key", "correlation_key"),
        ("type", "saga_type"),
    ):
        for descending in (False, True):
            items = await listed(queries, SagaFilter(), SagaSort(key, descending))  # type: ignore[arg-type]
            order = [(getattr(s, field), s.id) for s in items]
            assert order == sorted(order, reverse=descending)
            assert len(items) == SAGAS


async def test_the_commands_list_show_and_stuck_in_80_columns_and_json(
    store: str, run_id: str
) -> None:
    env = cli_env(store, f"{run_id}.saga.")

    listing = await sagaworks(
        "saga", "list", "--type", "refund", "--status", "needs_attention", "--limit", "4", env=env
    )
    assert listing.code == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["KEY", "TYPE", "STATUS", "STEP", "CHANGED"]
    assert len(lines) == 6
    assert all(" refund " in line and " needs_attention " in line for line in lines[1:5])
    assert lines[-1] == "page 1: 4 saga(s); next: --page 2"

    as_json = await sagaworks("saga", "list", "--key", "ord-00000010", "--json", env=env)
    page = json.loads(as_json.stdout)
    assert page["more"] is False
    (item,) = page["items"]
    assert item["correlation_key"] == "ord-00000010"

    shown = await sagaworks("saga", "show", "ord-00000010", env=env)
    assert shown.code == 0, shown.stderr
    assert all(len(line) <= 80 for line in shown.stdout.splitlines())
    assert f"saga {item['id']}" in shown.stdout
    assert "timeline (6)" in shown.stdout
    assert "+150ms  step_started" in shown.stdout
    detail = json.loads((await sagaworks("saga", "show", item["id"], "--json", env=env)).stdout)
    assert [e["kind"] for e in detail["timeline"]][:2] == ["started", "step_started"]
    assert detail["summary"]["id"] == item["id"]

    stuck = await sagaworks("saga", "stuck", "--stuck", "dead_lettered", "--json", env=env)
    rows = json.loads(stuck.stdout)
    assert rows
    assert {r["reason"] for r in rows} == {"dead_lettered"}
    assert all(r["command"].startswith("sagaworks dlq replay ") for r in rows)
    text = await sagaworks("saga", "stuck", "--stuck", "dead_lettered", env=env)
    assert text.stdout.startswith(f"{len(rows)} stuck saga(s): dead_lettered {len(rows)}")


async def test_operator_mistakes_end_with_one_line_saying_what_to_do(
    store: str, run_id: str
) -> None:
    env = cli_env(store, f"{run_id}.saga.")
    conn = await asyncpg.connect(dsn(store))
    try:
        await conn.execute(
            "INSERT INTO saga_instances (id, saga_type, correlation_key, status, state, "
            "state_schema_version) SELECT gen_random_uuid(), 'returns', 'ord-00000010', "
            "'running', '{}', 1"
        )
    finally:
        await conn.close()

    missing = await sagaworks("saga", "show", "no-such-order", env=env)
    assert missing.code == 1
    assert "no saga has the id or business key 'no-such-order'" in missing.stderr
    shared = await sagaworks("saga", "show", "ord-00000010", env=env)
    assert shared.code == 1
    assert "say which with --type TYPE" in shared.stderr
    chosen = await sagaworks("saga", "show", "ord-00000010", "--type", "returns", env=env)
    assert chosen.code == 0, chosen.stderr
    bad_reason = await sagaworks("saga", "list", "--stuck", "sleepy", env=env)
    assert bad_reason.code == 2
    assert "unknown stuck reason(s) sleepy" in bad_reason.stderr
    bad_age = await sagaworks("saga", "list", "--older-than", "soon", env=env)
    assert bad_age.code == 2
    assert "is not an age like 30s" in bad_age.stderr


async def test_a_database_that_is_missing_or_behind_is_named_in_one_line(
    unused_database_url: str, database_factory: Callable[[], Awaitable[str]], run_id: str
) -> None:
    # A name of this test's own: other tests of the session may create `unused_database_url`.
    never_created = unused_database_url.rsplit("/", 1)[0] + f"/sagaworks_{run_id}_never_created"
    missing = await sagaworks("saga", "list", env=cli_env(never_created, f"{run_id}.s."))
    assert missing.code == 3
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    empty = await database_factory()
    behind = await sagaworks("saga", "stuck", env=cli_env(empty, f"{run_id}.s."))
    assert behind.code == 4
    assert "sagaworks db upgrade" in behind.stderr
    assert len(behind.stderr.strip().splitlines()) == 1, behind.stderr

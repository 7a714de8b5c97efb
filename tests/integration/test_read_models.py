"""Every dashboard panel and alert rule, run on a database a real demo filled, as Grafana would.

The queries run as the read-only role the datasource uses, against the
views of `sagaworks_read` while a real worker beats. Each returns the columns
its panel needs (a `time` column and numbers for a time series, numbers for a
stat, one number for an alert), and rows wherever the demo produced data.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from grafana_files import GrafanaQuery, alert_rules, panel_queries, rule_queries
from read_model_world import DemoWorld, demo_world

from sagaworks.adapters.postgres.roles import RoleNames, apply_roles

pytestmark = pytest.mark.integration

NUMERIC = {"int2", "int4", "int8", "float4", "float8", "numeric"}
TEXT = {"text", "varchar", "name"}

MAY_BE_EMPTY = {
    "sagaworks-ports / Breakers": "the demo opens no breaker",
    "sagaworks-dead-letters-stuck / Stuck sagas": "the demo leaves no saga stuck",
    "sagaworks-dead-letters-stuck / Stuck sagas by reason": "the demo leaves no saga stuck",
}
"""Panels the demo has no data for; every other panel must show rows."""


def as_role(url: str, role: str, password: str) -> str:
    parts = urlsplit(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    netloc = f"{role}:{password}@{parts.hostname or 'localhost'}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _drop_roles(dsn: str, names: RoleNames) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for role in (*names.grantees(), names.migrator):
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await conn.execute(f'DROP OWNED BY "{role}" CASCADE')
                await conn.execute(f'DROP ROLE "{role}"')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def world(
    database_factory: Callable[[], Awaitable[str]], run_id: str
) -> AsyncIterator[DemoWorld]:
    async with demo_world(await database_factory(), run_id) as filled:
        yield filled


@pytest.fixture(scope="module")
async def readonly(world: DemoWorld, run_id: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the read-only role `sagaworks db roles` makes, as Grafana connects."""
    names = RoleNames.with_prefix(f"{run_id}_{secrets.token_hex(2)}_")
    password = secrets.token_urlsafe(12)
    await apply_roles(world.dsn, names, {names.readonly: password})
    conn = await asyncpg.connect(as_role(world.dsn, names.readonly, password))
    try:
        yield conn
    finally:
        await conn.close()
        await _drop_roles(world.dsn, names)


async def run(conn: asyncpg.Connection, query: GrafanaQuery) -> tuple[dict[str, str], list[Any]]:
    statement = await conn.prepare(query.sql)
    columns = {a.name: a.type.name for a in statement.get_attributes()}
    return columns, await statement.fetch()


@pytest.mark.parametrize("query", panel_queries(), ids=lambda q: q.where)
async def test_a_panel_query_returns_what_its_panel_draws(
    readonly: asyncpg.Connection, query: GrafanaQuery
) -> None:
    columns, rows = await run(readonly, query)
    if query.shape == "time_series":
        assert columns.get("time") == "timestamptz", columns
        values = {name: kind for name, kind in columns.items() if name not in {"time", "metric"}}
        assert values, columns
        assert set(values.values()) <= NUMERIC, columns
        assert columns.get("metric", "text") in TEXT
        times = [row["time"] for row in rows]
        assert times == sorted(times), "Grafana needs a time series in time order"
    elif query.shape == "stat":
        assert NUMERIC & set(columns.values()), f"a stat shows numbers: {columns}"
    if query.where not in MAY_BE_EMPTY:
        assert rows, f"{query.where}: no rows, though the demo produced data for it"


@pytest.mark.parametrize("query", rule_queries(), ids=lambda q: q.where)
async def test_an_alert_query_returns_one_number(
    readonly: asyncpg.Connection, query: GrafanaQuery
) -> None:
    columns, rows = await run(readonly, query)
    assert len(columns) == 1, columns
    assert set(columns.values()) <= NUMERIC, columns
    assert len(rows) == 1


def firing(rule: dict[str, Any], value: float) -> bool:
    (threshold,) = [q for q in rule["data"] if q["model"].get("type") == "threshold"]
    (condition,) = threshold["model"]["conditions"]
    evaluator = condition["evaluator"]
    (limit,) = evaluator["params"]
    return bool(value > limit if evaluator["type"] == "gt" else value < limit)


async def test_alerts_fire_for_what_the_demo_left_and_only_that(
    readonly: asyncpg.Connection,
) -> None:
    state = {}
    for group in alert_rules()["groups"]:
        for rule in group["rules"]:
            (query,) = [q for q in rule["data"] if q["datasourceUid"] != "__expr__"]
            value = await readonly.fetchval(query["model"]["rawSql"])
            state[rule["uid"]] = firing(rule, float(value))
    firing_now = {uid for uid, on in state.items() if on}
    assert firing_now == {"sagaworks-dead-letters-growing"}, (
        "the demo world has one new dead letter, a live worker, nothing stuck or late"
    )


async def test_the_outcomes_panel_counts_the_demo_sagas(
    readonly: asyncpg.Connection, world: DemoWorld
) -> None:
    (query,) = [q for q in panel_queries() if q.title == "Outcomes (last hour)"]
    _, (row,) = await run(readonly, query)
    assert (row["completed"], row["compensated"], row["needs_attention"]) == (
        world.report.completed,
        world.report.compensated,
        world.report.needs_attention,
    )


async def test_the_workers_panel_shows_the_live_worker_and_what_it_runs(
    readonly: asyncpg.Connection,
) -> None:
    (query,) = [q for q in panel_queries() if q.title == "Worker processes"]
    _, rows = await run(readonly, query)
    (row,) = rows
    assert row["status"] == "live"
    assert row["sagas"] == "order_fulfilment"
    assert row["ports"] == "inventory, payments, shipping"
    assert row["beat_age_s"] < 5.0


async def test_the_in_progress_panel_shows_the_saga_that_waits(
    readonly: asyncpg.Connection,
) -> None:
    (query,) = [q for q in panel_queries() if q.title == "Sagas in progress"]
    _, rows = await run(readonly, query)
    assert [(r["status"], r["current_step"], r["sagas"]) for r in rows] == [
        ("running", "await_dispatch", 1)
    ]


async def test_the_latency_panel_names_every_step_and_its_port(
    readonly: asyncpg.Connection,
) -> None:
    (query,) = [q for q in panel_queries() if q.title == "Step latency (last 15 min)"]
    _, rows = await run(readonly, query)
    ports = {(r["step"], r["kind"]): r["port"] for r in rows}
    assert ports[("reserve_stock", "action")] == "inventory"
    assert ports[("capture_payment", "action")] == "payments"
    assert ports[("await_dispatch", "wait")] is None
    for row in rows:
        if row["attempts"]:
            assert 0 <= row["attempt_p50_s"] <= row["attempt_p95_s"] <= row["attempt_p99_s"]

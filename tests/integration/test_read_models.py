"""Every dashboard panel and alert rule, run on a database a real demo filled, as Grafana would.

The queries run as the read-only role the datasource uses, against the
views of `sagaworks_read` while a real worker beats. Each returns the columns
its panel needs (a `time` column and numbers for a time series, numbers for a
stat, one number for an alert), and rows wherever the demo produced data.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from grafana_files import GrafanaQuery, alert_rules, panel_queries, rule_queries
from read_model_world import DEMO_ORDERS, DemoWorld, demo_world, eventually
from rich.console import Console

from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.postgres.read_models import PostgresReadModels, ReadModelSnapshot
from sagaworks.adapters.postgres.roles import RoleNames, apply_roles
from sagaworks.entrypoints.cli.top_render import render

pytestmark = pytest.mark.integration

SAGAWORKS = str(Path(sys.executable).parent / "sagaworks")
T = TypeVar("T")

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
                # Hand the tables back first: the worker of the world still uses them.
                await conn.execute(f'REASSIGN OWNED BY "{role}" TO CURRENT_USER')
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
async def readonly_url(world: DemoWorld, run_id: str) -> AsyncIterator[str]:
    """The URL of the read-only role `sagaworks db roles` makes, as Grafana connects."""
    names = RoleNames.with_prefix(f"{run_id}_{secrets.token_hex(2)}_")
    password = secrets.token_urlsafe(12)
    await apply_roles(world.dsn, names, {names.readonly: password})
    try:
        yield as_role(world.dsn, names.readonly, password)
    finally:
        await _drop_roles(world.dsn, names)


@pytest.fixture(scope="module")
async def readonly(readonly_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(readonly_url)
    try:
        yield conn
    finally:
        await conn.close()


async def sagaworks_command(*args: str, database_url: str) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("SAGAWORKS_")}
    process = await asyncio.create_subprocess_exec(
        SAGAWORKS,
        *args,
        env={**clean, "SAGAWORKS_DATABASE_URL": database_url, "SAGAWORKS_LOG_FORMAT": "json"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def tmux(*args: str, check: bool = True) -> str:
    executable = shutil.which("tmux")
    if executable is None:
        pytest.fail("the terminal test drives `sagaworks top` in tmux, which is not on PATH")
    process = await asyncio.create_subprocess_exec(
        executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 10)
    if check:
        assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def until(read: Callable[[], Awaitable[T]], holds: Callable[[T], bool]) -> T:
    """Read until `holds(value)`; fail with the last value after 20 s."""
    deadline = time.monotonic() + 20.0
    while True:
        value = await read()
        if holds(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within 20 s; last seen:\n{value}")
        await asyncio.sleep(0.2)


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


async def test_the_worker_rolls_the_history_up_and_the_outcomes_stay_the_same(
    readonly: asyncpg.Connection, world: DemoWorld
) -> None:
    """After the worker's rollup has taken in the demo's history, the panel reads the same."""
    started = await readonly.fetchval("SELECT max(at) FROM saga_history WHERE kind = 'started'")

    async def rolled_past_it() -> bool:
        mark = await readonly.fetchval("SELECT rolled_up_to FROM read_rollup_state")
        return bool(mark > started)

    # History settles for 10 s before a rollup, which comes every 5 s.
    await eventually(rolled_past_it, "the worker rolled up the demo's history", 45.0)
    assert await readonly.fetchval("SELECT sum(started) FROM read_saga_minutes") >= DEMO_ORDERS
    (query,) = [q for q in panel_queries() if q.title == "Outcomes (last hour)"]
    _, (row,) = await run(readonly, query)
    assert (row["completed"], row["compensated"]) == (
        world.report.completed,
        world.report.compensated,
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


@pytest.fixture(scope="module")
async def snapshot(world: DemoWorld) -> AsyncIterator[ReadModelSnapshot]:
    engine = create_engine(world.dsn)
    try:
        yield await PostgresReadModels(engine).snapshot()
    finally:
        await engine.dispose()


def screen(snapshot: ReadModelSnapshot, width: int = 100) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(render(snapshot))
    return console.export_text()


async def test_top_shows_what_a_person_on_call_needs(
    snapshot: ReadModelSnapshot, world: DemoWorld
) -> None:
    text = screen(snapshot)
    report = world.report
    assert f"last hour: {report.completed} completed, {report.compensated} compensated" in text
    assert "stuck: 0" in text
    assert "workers: 1 live" in text
    in_flight = next(line for line in text.splitlines() if "await_dispatch" in line)
    assert "order_fulfilment" in in_flight
    assert "running" in in_flight
    reserve = next(line for line in text.splitlines() if line.strip().startswith("reserve_stock"))
    assert "inventory" in reserve
    letters = next(line for line in text.splitlines() if "schema_invalid" in line)
    assert letters.split()[-3:] == ["1", "1", "1"], "one letter, new in the hour and the day"
    (worker,) = snapshot.workers
    assert any(worker["worker"] in line and "live" in line for line in text.splitlines())


async def test_top_fits_eighty_columns(snapshot: ReadModelSnapshot) -> None:
    lines = screen(snapshot, width=80).splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert any(line.strip().startswith("authorise_payment") for line in lines), (
        "step names are not cut"
    )


async def test_top_json_is_the_same_snapshot_for_scripts(
    world: DemoWorld, readonly_url: str
) -> None:
    code, out, err = await sagaworks_command("top", "--json", database_url=readonly_url)
    assert code == 0, err
    data = json.loads(out)
    assert data["outcomes"]["completed"] == world.report.completed
    assert [w["alive"] for w in data["workers"]] == [True]
    assert data["in_progress"][0]["current_step"] == "await_dispatch"
    assert data["dead_letter_groups"][0]["reason"] == "schema_invalid"


async def test_top_without_the_read_models_says_to_migrate(
    database_factory: Callable[[], Awaitable[str]],
) -> None:
    code, _, err = await sagaworks_command("top", "--once", database_url=await database_factory())
    assert code == 4
    assert 'run "sagaworks db upgrade"' in err


async def test_top_refreshes_in_a_real_terminal(readonly_url: str) -> None:
    session = f"sagaworks-top-{secrets.token_hex(3)}"
    command = f"env SAGAWORKS_DATABASE_URL='{readonly_url}' {SAGAWORKS} top"
    await tmux("new-session", "-d", "-s", session, "-x", "110", "-y", "60", command)
    try:

        async def pane() -> str:
            return await tmux("capture-pane", "-p", "-t", session)

        first = await until(pane, lambda text: "workers" in text and "live" in text)
        assert "sagaworks top" in first
        assert "await_dispatch" in first
        assert "schema_invalid" in first
        header = first.splitlines()[0]
        later = await until(pane, lambda text: text.splitlines()[0] != header)
        assert later.splitlines()[0].startswith("sagaworks top")
        await tmux("send-keys", "-t", session, "C-c")
        await until(
            lambda: tmux("list-sessions", "-F", "#{session_name}", check=False),
            lambda names: session not in names.split(),
        )
    finally:
        await tmux("kill-session", "-t", session, check=False)

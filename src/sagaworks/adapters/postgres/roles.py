"""Least-privilege PostgreSQL roles and the grants on sagaworks' tables.

Four login roles, named `<prefix>migrator`, `<prefix>worker`, `<prefix>operator`
and `<prefix>readonly` (docs/security.md):

- the **migrator** owns every sagaworks table and trigger function: only it
  (and superusers) can `ALTER`, `DROP` or `TRUNCATE` them;
- the **worker** reads and writes the engine's tables, but only appends to
  the saga history and the dead-letter audit;
- the **operator** reads everything and writes what `sagaworks dlq` writes
  (dead letters, replay rows in the outbox, new audit rows);
- the **readonly** role (dashboards) only reads.

`apply_roles` (what `sagaworks db roles` runs, as an administrator) creates
or updates the roles, hands existing sagaworks objects to the migrator and
sets its default privileges, so tables a later migration creates are
readable at once and writable by nobody but their owner until the grants are
reconciled. `apply_grants` reconciles the grants of every sagaworks table
with `table_grants()`; it needs only ownership, so `db upgrade` runs it too,
as the migrator, after every migration. Both are idempotent. Tables of other
applications in the same database are never touched.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stringprep
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from sagaworks.adapters.postgres.engine import connect, create_engine, sqlstate, to_asyncpg_url
from sagaworks.adapters.postgres.errors import RolesNotApplied
from sagaworks.adapters.postgres.tables import ALEMBIC_VERSION_TABLE, READ_MODELS_SCHEMA, metadata

__all__ = [
    "APPEND_ONLY_TABLES",
    "OPERATOR_WRITES",
    "RoleNames",
    "RolesReport",
    "apply_grants",
    "apply_roles",
    "reconcile_grants",
    "scram_sha_256_verifier",
    "table_grants",
]

_DML = ("SELECT", "INSERT", "UPDATE", "DELETE")
_INSUFFICIENT_PRIVILEGE = "42501"
_SCRAM_ITERATIONS = 4096

APPEND_ONLY_TABLES = frozenset({"saga_history", "dead_letter_audit", "operator_audit"})
"""Tables nobody but their owner may `UPDATE`, `DELETE` or `TRUNCATE`."""

OPERATOR_WRITES: Mapping[str, tuple[str, ...]] = {
    "dead_letters": ("INSERT", "UPDATE", "DELETE"),  # edit, replay, archive, purge
    "outbox": ("INSERT", "UPDATE", "DELETE"),  # a replay is staged, confirmed or abandoned
    "dead_letter_audit": ("INSERT",),  # every operator action is recorded
    # `sagaworks saga retry|resume|cancel|resolve|pause|unpause` take the path of a message:
    "saga_instances": ("UPDATE",),
    "saga_history": ("INSERT",),
    "inbox": ("INSERT",),
    "timers": ("INSERT", "UPDATE", "DELETE"),
    "parked_messages": ("DELETE",),  # kept events applied on unpause
    "operator_audit": ("INSERT",),
    "operator_plans": ("INSERT", "UPDATE"),
    "operator_plan_targets": ("INSERT", "UPDATE"),
}
"""What `sagaworks dlq` and `sagaworks saga` write, besides reading every table."""


@dataclass(frozen=True)
class RoleNames:
    """The four roles' names; a prefix keeps deployments (and test runs) apart."""

    migrator: str
    worker: str
    operator: str
    readonly: str

    @classmethod
    def with_prefix(cls, prefix: str) -> RoleNames:
        return cls(f"{prefix}migrator", f"{prefix}worker", f"{prefix}operator", f"{prefix}readonly")

    def grantees(self) -> tuple[str, str, str]:
        """The roles that get grants (the migrator owns instead)."""
        return (self.worker, self.operator, self.readonly)


def table_grants(names: RoleNames) -> dict[str, dict[str, tuple[str, ...]]]:
    """Every sagaworks table -> role -> the privileges it holds there, nothing else."""
    grants: dict[str, dict[str, tuple[str, ...]]] = {}
    for table in [*metadata.tables, ALEMBIC_VERSION_TABLE]:
        if table == ALEMBIC_VERSION_TABLE:
            worker: tuple[str, ...] = ("SELECT",)
        elif table in APPEND_ONLY_TABLES:
            worker = ("SELECT", "INSERT")
        else:
            worker = _DML
        grants[table] = {
            names.worker: worker,
            names.operator: ("SELECT", *OPERATOR_WRITES.get(table, ())),
            names.readonly: ("SELECT",),
        }
    return grants


def _saslprep(password: str) -> bytes:
    """RFC 4013 as PostgreSQL applies it: on a prohibited character, the raw bytes."""
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    normalised = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if not normalised or any(check(c) for c in normalised for check in prohibited):
        return password.encode()
    return normalised.encode()


def scram_sha_256_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = _SCRAM_ITERATIONS
) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password`, computed here.

    `ALTER ROLE ... PASSWORD '<verifier>'` sets the password without the
    plain text ever reaching the server, its statement log or its error log.
    """
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _quote(conn: AsyncConnection, name: str) -> str:
    return str(conn.dialect.identifier_preparer.quote_identifier(name))


async def _existing(conn: AsyncConnection, names: tuple[str, ...]) -> set[str]:
    rows = await conn.execute(
        text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"), {"names": list(names)}
    )
    return set(rows.scalars())


async def _existing_tables(conn: AsyncConnection) -> list[str]:
    rows = await conn.execute(
        text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
            "AND c.relname = ANY(:tables) ORDER BY c.relname"
        ),
        {"tables": [*metadata.tables, ALEMBIC_VERSION_TABLE]},
    )
    return list(rows.scalars())


async def apply_grants(conn: AsyncConnection, names: RoleNames) -> int:
    """Make every existing sagaworks table's grants exactly `table_grants()`; tables touched.

    Runs in the caller's transaction; roles that do not exist are skipped, so a
    deployment without them (one superuser in development) is left as it is.
    """
    present = await _existing(conn, names.grantees())
    if not present:
        return 0
    await _grant_read_models(conn, names, present)
    wanted = table_grants(names)
    tables = await _existing_tables(conn)
    for table in tables:
        quoted = _quote(conn, table)
        for role, privileges in wanted[table].items():
            if role not in present:
                continue
            grantee = _quote(conn, role)
            await conn.execute(text(f"REVOKE ALL ON TABLE {quoted} FROM {grantee}"))
            await conn.execute(
                text(f"GRANT {', '.join(privileges)} ON TABLE {quoted} TO {grantee}")
            )
    return len(tables)


async def _grant_read_models(conn: AsyncConnection, names: RoleNames, present: set[str]) -> None:
    """Operators and dashboards read every view of `sagaworks_read` (when it exists)."""
    exists = await conn.scalar(
        text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": READ_MODELS_SCHEMA}
    )
    readers = [_quote(conn, r) for r in (names.operator, names.readonly) if r in present]
    if not exists or not readers:
        return
    schema = _quote(conn, READ_MODELS_SCHEMA)
    await conn.execute(text(f"GRANT USAGE ON SCHEMA {schema} TO {', '.join(readers)}"))
    await conn.execute(
        text(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {', '.join(readers)}")
    )


@dataclass(frozen=True)
class RolesReport:
    """What `apply_roles` did, for the command's output (never a password)."""

    created: tuple[str, ...]
    passwords_set: tuple[str, ...]
    tables: int

    def summary(self, names: RoleNames) -> str:
        roles = (names.migrator, *names.grantees())
        created = ", ".join(self.created) or "none"
        passwords = ", ".join(self.passwords_set) or "none"
        return (
            f"roles {', '.join(roles)} in place (created: {created}; passwords set: {passwords}); "
            f"grants on {self.tables} tables"
        )


async def apply_roles(
    admin_url: str, names: RoleNames, passwords: Mapping[str, str | None]
) -> RolesReport:
    """Create or update the four roles and their privileges in the database of `admin_url`.

    `passwords` maps a role name to its password; a role without one keeps its
    password (a new one gets none: it can log in only by trust, peer or certificate).
    """
    engine = create_engine(admin_url, pool_size=1, max_overflow=0)
    database = make_url(to_asyncpg_url(admin_url)).database or ""
    try:
        async with connect(engine) as conn, conn.begin():
            try:
                return await _apply(conn, database, names, passwords)
            except PermissionError as exc:
                raise RolesNotApplied(admin_url) from exc
            except DBAPIError as exc:
                if sqlstate(exc) == _INSUFFICIENT_PRIVILEGE:
                    raise RolesNotApplied(admin_url) from exc
                raise
    finally:
        await engine.dispose()


async def _apply(
    conn: AsyncConnection, database: str, names: RoleNames, passwords: Mapping[str, str | None]
) -> RolesReport:
    roles = (names.migrator, *names.grantees())
    existing = await _existing(conn, roles)
    created: list[str] = []
    passwords_set: list[str] = []
    for role in roles:
        quoted = _quote(conn, role)
        if role not in existing:
            await conn.execute(text(f"CREATE ROLE {quoted}"))
            created.append(role)
        await conn.execute(
            text(
                f"ALTER ROLE {quoted} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS"
            )
        )
        password = passwords.get(role)
        if password:
            await _set_password(conn, role, quoted, password)
            passwords_set.append(role)
    migrator = _quote(conn, names.migrator)
    others = ", ".join(_quote(conn, role) for role in names.grantees())
    everyone = f"{migrator}, {others}"
    await conn.execute(text(f"GRANT CONNECT ON DATABASE {_quote(conn, database)} TO {everyone}"))
    # Creating the schema of the read models (`sagaworks_read`) takes CREATE on the database.
    await conn.execute(text(f"GRANT CREATE ON DATABASE {_quote(conn, database)} TO {migrator}"))
    schema = _quote(conn, str(await conn.scalar(text("SELECT current_schema()"))))
    await conn.execute(text(f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {migrator}"))
    await conn.execute(text(f"GRANT USAGE ON SCHEMA {schema} TO {others}"))
    await conn.execute(text(f"REVOKE CREATE ON SCHEMA {schema} FROM {others}"))
    await _hand_over(conn, names.migrator)
    defaults = f"ALTER DEFAULT PRIVILEGES FOR ROLE {migrator} IN SCHEMA {schema}"
    worker = _quote(conn, names.worker)
    readers = f"{_quote(conn, names.operator)}, {_quote(conn, names.readonly)}"
    await conn.execute(text(f"{defaults} GRANT SELECT, INSERT ON TABLES TO {worker}"))
    await conn.execute(text(f"{defaults} GRANT SELECT ON TABLES TO {readers}"))
    tables = await apply_grants(conn, names)
    return RolesReport(tuple(created), tuple(passwords_set), tables)


async def _set_password(conn: AsyncConnection, role: str, quoted: str, password: str) -> None:
    """Set the password as its verifier; no error raised here carries the statement."""
    # Base64 and '$:' only: safe inside a literal, and no plain text leaves this process.
    statement = f"ALTER ROLE {quoted} PASSWORD '{scram_sha_256_verifier(password)}'"
    try:
        await conn.exec_driver_sql(statement)
    except DBAPIError as exc:
        code = sqlstate(exc)
        if code == _INSUFFICIENT_PRIVILEGE:
            raise PermissionError(f"may not set the password of role {role}") from None
        raise RuntimeError(f"could not set the password of role {role} (SQLSTATE {code})") from None


async def _hand_over(conn: AsyncConnection, migrator: str) -> None:
    """Make the migrator own sagaworks' tables and trigger functions made by someone else."""
    owner = _quote(conn, migrator)
    for table in await _existing_tables(conn):
        await conn.execute(text(f"ALTER TABLE {_quote(conn, table)} OWNER TO {owner}"))
    functions = await conn.execute(
        text(
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = current_schema() AND p.proname LIKE 'sagaworks\\_%'"
        )
    )
    for signature in functions.scalars():
        await conn.execute(text(f"ALTER FUNCTION {signature} OWNER TO {owner}"))
    await _hand_over_read_models(conn, owner)


_ALTER_KIND = {"r": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW"}


async def _hand_over_read_models(conn: AsyncConnection, owner: str) -> None:
    """The schema `sagaworks_read`, its views and functions: the migrator's too."""
    params = {"name": READ_MODELS_SCHEMA}
    if not await conn.scalar(text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), params):
        return
    schema = _quote(conn, READ_MODELS_SCHEMA)
    await conn.execute(text(f"ALTER SCHEMA {schema} OWNER TO {owner}"))
    relations = await conn.execute(
        text(
            "SELECT c.relkind::text, c.oid::regclass::text FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :name AND c.relkind IN ('r', 'v', 'm')"
        ),
        params,
    )
    for kind, name in relations.all():
        await conn.execute(text(f"ALTER {_ALTER_KIND[kind]} {name} OWNER TO {owner}"))
    functions = await conn.execute(
        text(
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = :name"
        ),
        params,
    )
    for signature in functions.scalars():
        await conn.execute(text(f"ALTER FUNCTION {signature} OWNER TO {owner}"))


async def reconcile_grants(url: str, names: RoleNames) -> int:
    """`apply_grants` in a transaction of its own, as the role of `url` (the tables' owner)."""
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        async with connect(engine) as conn, conn.begin():
            try:
                return await apply_grants(conn, names)
            except DBAPIError as exc:
                if sqlstate(exc) == _INSUFFICIENT_PRIVILEGE:
                    raise RolesNotApplied(url) from exc
                raise
    finally:
        await engine.dispose()

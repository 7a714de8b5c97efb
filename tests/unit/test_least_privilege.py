"""Least privilege, as data: the grants per table, password verifiers, broker permissions."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from sagas.order_fulfilment.saga import order_fulfilment
from sagaworks.adapters.postgres.roles import (
    APPEND_ONLY_TABLES,
    OPERATOR_WRITES,
    RoleNames,
    scram_sha_256_verifier,
    table_grants,
)
from sagaworks.adapters.postgres.tables import ALEMBIC_VERSION_TABLE, metadata
from sagaworks.adapters.rabbitmq.topology import (
    Binding,
    QueueSpec,
    TopologySpec,
    operator_permissions,
    worker_permissions,
)
from sagaworks.application.registry import SagaRegistry
from sagaworks.bootstrap import topology_for
from sagaworks.settings import Settings

pytestmark = pytest.mark.unit

NAMES = RoleNames.with_prefix("sw_")
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_every_table_has_grants_and_the_named_exceptions_exist() -> None:
    grants = table_grants(NAMES)

    assert set(grants) == {*metadata.tables, ALEMBIC_VERSION_TABLE}
    assert set(metadata.tables) >= APPEND_ONLY_TABLES
    assert set(OPERATOR_WRITES) <= set(metadata.tables)


def test_nobody_but_the_owner_rewrites_history_or_the_audit() -> None:
    grants = table_grants(NAMES)

    for table in APPEND_ONLY_TABLES:
        for role, privileges in grants[table].items():
            assert not {"UPDATE", "DELETE", "TRUNCATE"} & set(privileges), (table, role)
    for table, by_role in grants.items():
        assert by_role[NAMES.readonly] == ("SELECT",), table
        assert all("TRUNCATE" not in p for p in by_role.values()), table
        assert NAMES.migrator not in by_role, "the migrator owns; it needs no grant"


def test_the_verifier_has_postgresql_s_format_and_a_fresh_salt() -> None:
    first = scram_sha_256_verifier("secret")
    second = scram_sha_256_verifier("secret")

    assert re.fullmatch(
        r"SCRAM-SHA-256\$4096:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+", first
    )
    assert first != second
    assert "secret" not in first
    salt = b"0123456789abcdef"
    assert scram_sha_256_verifier("x", salt=salt) == scram_sha_256_verifier("x", salt=salt)


def _spec(prefix: str) -> TopologySpec:
    orders = f"{prefix}orders"
    return TopologySpec(
        exchanges=(orders, f"{prefix}sagaworks.commands"),
        queues=(QueueSpec(f"{prefix}sagaworks.order_fulfilment", (Binding(orders, "order.#"),)),),
        dead_letter_exchange=f"{prefix}sagaworks.dlx",
        dead_letter_queue=f"{prefix}sagaworks.dead-letters",
        delivery_limit=5,
    )


def test_worker_permissions_name_exactly_its_own_entities() -> None:
    permissions = worker_permissions(_spec("t1."))

    assert permissions.configure == "^$"
    assert re.fullmatch(permissions.write, "t1.orders")
    assert re.fullmatch(permissions.write, "amq.default")
    assert not re.fullmatch(permissions.write, "orders")
    assert not re.fullmatch(permissions.write, "t1xorders")
    assert re.fullmatch(permissions.read, "t1.sagaworks.dead-letters")
    assert not re.fullmatch(permissions.read, "t2.sagaworks.dead-letters")
    assert not re.fullmatch(permissions.read, "t1.orders")
    line = permissions.rabbitmqctl("sagaworks_worker")
    assert line.startswith("rabbitmqctl set_permissions -p / sagaworks_worker '^$' ")


def test_operators_may_only_publish_replays() -> None:
    permissions = operator_permissions()

    assert (permissions.configure, permissions.read) == ("^$", "^$")
    assert re.fullmatch(permissions.write, "amq.default")


def test_the_shipped_broker_definitions_grant_what_the_code_says() -> None:
    shipped = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    granted = {p["user"]: p for p in shipped["permissions"]}
    spec = topology_for(
        Settings.load(secrets_dir=None, exchange_prefix=""), SagaRegistry([order_fulfilment])
    )

    for user, wanted in (
        ("sagaworks_worker", worker_permissions(spec)),
        ("sagaworks_operator", operator_permissions()),
    ):
        got = granted[user]
        assert (got["configure"], got["write"], got["read"]) == (
            wanted.configure,
            wanted.write,
            wanted.read,
        ), f"deploy/rabbitmq/definitions.json: paste `sagaworks topology permissions` for {user}"


def test_role_passwords_are_masked_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SAGAWORKS_"):
            monkeypatch.delenv(name)
    (tmp_path / "db_worker_password").write_text("hunter2-s3cret")

    settings = Settings.load(secrets_dir=tmp_path)

    assert settings.db_worker_password is not None
    assert settings.db_worker_password.get_secret_value() == "hunter2-s3cret"
    public = settings.as_public_dict()
    assert public["db_worker_password"] == "***"
    assert public["db_operator_password"] is None
    assert "hunter2-s3cret" not in repr(public)


def test_the_admin_url_falls_back_to_the_migration_url(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SAGAWORKS_"):
            monkeypatch.delenv(name)
    migration = "postgresql://migrator@db/sagaworks"

    alone = Settings.load(secrets_dir=None, migration_database_url=migration)
    assert alone.effective_admin_url() == migration
    admin = Settings.load(
        secrets_dir=None,
        migration_database_url=migration,
        admin_database_url="postgresql://postgres@db/sagaworks",
    )
    assert admin.effective_admin_url() == "postgresql://postgres@db/sagaworks"

"""Settings: defaults, the environment, secret files, URL checks and masking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from sagaworks.entrypoints.cli.errors import settings_error_lines
from sagaworks.settings import Settings, mask_url

pytestmark = pytest.mark.unit

SECRET = "hunter2-s3cret"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SAGAWORKS_* variable of the shell running the tests leaks into these."""
    for name in list(os.environ):
        if name.upper().startswith("SAGAWORKS_"):
            monkeypatch.delenv(name)


def test_defaults_point_at_local_services() -> None:
    settings = Settings.load(secrets_dir=None)

    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
    assert settings.database_url.get_secret_value() == (
        "postgresql://postgres@localhost:5432/sagaworks"
    )
    assert settings.migration_database_url is None
    assert settings.effective_migration_url() == settings.database_url.get_secret_value()
    assert settings.sagas == ()
    assert settings.exchange_prefix == ""


def test_missing_secrets_dir_is_not_an_error(tmp_path: Path) -> None:
    settings = Settings.load(secrets_dir=tmp_path / "absent")

    assert settings.database_url.get_secret_value().endswith("@localhost:5432/sagaworks")


def test_environment_variables_carry_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAWORKS_PREFETCH", "7")
    monkeypatch.setenv("SAGAWORKS_EXCHANGE_PREFIX", "tenant-a.")
    monkeypatch.setenv("SAGAWORKS_SAGAS", '["sagas.order_fulfilment", "shop.returns"]')
    monkeypatch.setenv("SAGAWORKS_AMQP_URL", "amqps://svc:pw@broker.example:5671/shop")
    monkeypatch.setenv("PREFETCH", "99")  # no prefix: not ours

    settings = Settings.load(secrets_dir=None)

    assert settings.prefetch == 7
    assert settings.exchange_prefix == "tenant-a."
    assert settings.sagas == ("sagas.order_fulfilment", "shop.returns")
    assert settings.amqp_url.get_secret_value() == "amqps://svc:pw@broker.example:5671/shop"


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(ValidationError, match="prefetch_count"):
        Settings.load(secrets_dir=None, prefetch_count=3)


def test_secret_file_is_read_by_field_name(tmp_path: Path) -> None:
    url = f"postgresql://worker:{SECRET}@db.internal:5432/shop"
    (tmp_path / "database_url").write_text(url + "\n")  # editors and `echo` add a newline

    settings = Settings.load(secrets_dir=tmp_path)

    assert settings.database_url.get_secret_value() == url
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


def test_environment_wins_over_a_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "database_url").write_text(f"postgresql://worker:{SECRET}@from-file/shop")
    monkeypatch.setenv("SAGAWORKS_DATABASE_URL", "postgresql://worker@from-env/shop")

    settings = Settings.load(secrets_dir=tmp_path)

    assert settings.database_url.get_secret_value() == "postgresql://worker@from-env/shop"


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("SAGAWORKS_AMQP_URL", f"http://guest:{SECRET}@localhost:5672/", "amqp://"),
        ("SAGAWORKS_DATABASE_URL", f"mysql://root:{SECRET}@localhost/shop", "postgresql://"),
        ("SAGAWORKS_MIGRATION_DATABASE_URL", f"sqlite:///{SECRET}.db", "postgresql://"),
    ],
)
def test_wrong_url_scheme_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, allowed: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ValidationError) as caught:
        Settings.load(secrets_dir=None)

    lines = settings_error_lines(caught.value)
    assert len(lines) == 1
    assert lines[0].startswith(f"{variable}: ")
    assert allowed in lines[0]
    assert SECRET not in lines[0]
    assert SECRET not in str(caught.value), "the rejected URL (and its password) must not show"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SAGAWORKS_PREFETCH", "0"),
        ("SAGAWORKS_DELIVERY_LIMIT", "0"),
        ("SAGAWORKS_GRACE_PERIOD_S", "-1"),
        ("SAGAWORKS_LOG_FORMAT", "xml"),
        ("SAGAWORKS_EXCHANGE_PREFIX", "has space"),
    ],
)
def test_out_of_range_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ValidationError) as caught:
        Settings.load(secrets_dir=None)

    (line,) = settings_error_lines(caught.value)
    assert line.startswith(f"{variable}: ")


def test_public_dict_masks_passwords_and_lists_every_setting() -> None:
    settings = Settings.load(
        secrets_dir=None,
        database_url=f"postgresql://u:{SECRET}@h/db",
        migration_database_url=f"postgresql://migrator:{SECRET}@h:6432/db?sslmode=require",
        amqp_url=f"amqps://svc:{SECRET}@broker:5671/shop",
    )

    public = settings.as_public_dict()

    assert set(public) == set(Settings.model_fields)
    assert public["database_url"] == "postgresql://u:***@h/db"
    assert public["migration_database_url"] == (
        "postgresql://migrator:***@h:6432/db?sslmode=require"
    )
    assert public["amqp_url"] == "amqps://svc:***@broker:5671/shop"
    assert SECRET not in repr(public)
    assert public["prefetch"] == settings.prefetch


def test_public_dict_keeps_unset_migration_url_empty() -> None:
    public = Settings.load(secrets_dir=None).as_public_dict()

    assert public["migration_database_url"] is None
    assert public["database_url"] == "postgresql://postgres@localhost:5432/sagaworks"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@localhost:5432/sagaworks",
        "postgresql://localhost/sagaworks",
        "amqp://broker.example/",
        "postgresql:///sagaworks?host=/var/run/postgresql",
    ],
)
def test_mask_url_leaves_urls_without_password_unchanged(url: str) -> None:
    assert mask_url(url) == url


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:p@h/db", "postgresql://u:***@h/db"),
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("postgresql://u:p@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
        ("postgresql://u:p%40ss@h/db?ssl=require", "postgresql://u:***@h/db?ssl=require"),
        ("amqp://:only-password@h/", "amqp://:***@h/"),
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked

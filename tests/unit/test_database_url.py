"""One reading of a PostgreSQL URL for both pools: TLS parameters checked and normalised."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from sagaworks.adapters.postgres.dsn import SSL_MODES, parse_database_url
from sagaworks.adapters.postgres.errors import InvalidDatabaseUrl

pytestmark = pytest.mark.unit

SECRET = "s3cret-never-shown"


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def query_of(dsn: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(dsn).query)


@pytest.mark.parametrize(
    ("url", "dsn"),
    [
        ("postgresql+asyncpg://u@h:5433/db", "postgresql://u@h:5433/db"),
        ("postgres://u@h/db", "postgres://u@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_schemes_become_what_asyncpg_reads(url: str, dsn: str) -> None:
    target = parse_database_url(url)

    assert (target.dsn, target.sslmode) == (dsn, None)


@pytest.mark.parametrize("mode", SSL_MODES[:4])
def test_ssl_is_an_alias_of_sslmode(mode: str) -> None:
    via_alias = parse_database_url(f"postgresql://u@h/db?ssl={mode}")
    via_libpq = parse_database_url(f"postgresql://u@h/db?sslmode={mode}")

    assert via_alias == via_libpq
    assert query_of(via_alias.dsn) == {"sslmode": [mode]}
    assert via_alias.sslmode == mode


def test_verify_full_keeps_every_certificate_parameter_and_other_parameters(
    pem: Path,
) -> None:
    url = (
        f"postgresql://u:{SECRET}@h/db?ssl=verify-full&sslrootcert={pem}&sslcert={pem}"
        f"&sslkey={pem}&sslpassword=k&application_name=shop"
    )

    target = parse_database_url(url)

    assert target.sslmode == "verify-full"
    assert query_of(target.dsn) == {
        "sslmode": ["verify-full"],
        "sslrootcert": [str(pem)],
        "sslcert": [str(pem)],
        "sslkey": [str(pem)],
        "sslpassword": ["k"],
        "application_name": ["shop"],
    }
    assert f"u:{SECRET}@h" in target.dsn


def test_same_value_under_both_names_is_accepted(pem: Path) -> None:
    target = parse_database_url(
        f"postgresql://u@h/db?ssl=verify-ca&sslmode=verify-ca&sslrootcert={pem}"
    )

    assert target.sslmode == "verify-ca"


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("ssl=true", "ssl=true is not a TLS mode"),
        ("sslmode=verify", "sslmode=verify is not a TLS mode"),
        ("ssl=require&sslmode=disable", "ssl=require and sslmode=disable disagree"),
        ("sslmode=verify-full", "no sslrootcert is given"),
        ("sslmode=verify-ca", "no sslrootcert is given"),
        ("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", "does not exist"),
        ("sslmode=require&sslmode=require", "sslmode is given twice"),
        ("sslrootcert={pem}", "does not check the server's certificate"),
        ("sslmode=prefer&sslrootcert={pem}", "does not check the server's certificate"),
        ("sslmode=require&sslcert={pem}&sslkey=/nonexistent.key", "does not exist"),
        ("sslmode=require&sslkey={pem}", "sslkey is given without sslcert"),
        ("sslmode=disable&sslcert={pem}", "sslmode=disable turns TLS off"),
    ],
)
def test_wrong_tls_parameters_are_one_clear_error_without_the_password(
    pem: Path, query: str, problem: str
) -> None:
    url = f"postgresql://u:{SECRET}@h/db?" + query.format(pem=pem)

    with pytest.raises(InvalidDatabaseUrl) as caught:
        parse_database_url(url)

    message = str(caught.value)
    assert problem in message
    assert message.startswith("invalid database URL postgresql://u:***@h/db: ")
    assert "SAGAWORKS_DATABASE_URL" in message
    assert SECRET not in message
    assert "\n" not in message


def test_require_with_a_root_certificate_is_kept_for_asyncpg_to_verify_the_chain(
    pem: Path,
) -> None:
    """As in libpq, `require` plus `sslrootcert` checks the chain (asyncpg does the same)."""
    target = parse_database_url(f"postgresql://u@h/db?sslmode=require&sslrootcert={pem}")

    assert query_of(target.dsn) == {"sslmode": ["require"], "sslrootcert": [str(pem)]}


def test_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(InvalidDatabaseUrl, match="mysql://"):
        parse_database_url("mysql://u@h/db")

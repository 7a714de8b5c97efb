"""One reading of a PostgreSQL URL for every connection sagaworks opens.

The worker talks to PostgreSQL through two pools: SQLAlchemy's engine
(migrations, operator commands, the sweeper) and a plain asyncpg pool (the
hot path). Left to themselves they read a URL differently: SQLAlchemy's
asyncpg dialect hands each query parameter to `asyncpg.connect()` as a
keyword (`sslmode=` is a TypeError there), while asyncpg's DSN parser takes
`ssl=` for a server setting. So both pools connect with `asyncpg.connect()`
on the DSN `parse_database_url` returns, and libpq's parameters mean the
same on every connection:

- `sslmode` (`ssl` is accepted as an alias): `disable`, `allow`, `prefer`,
  `require`, `verify-ca`, `verify-full`, as in libpq;
- `sslrootcert`: the CA file the server's certificate must chain to
  (`require` with a root certificate verifies the chain, as libpq does);
- `sslcert`, `sslkey`, `sslpassword`: a client certificate, its key, and the
  key's passphrase.

The parameters are checked here, before any connection: a wrong mode, a
missing file or a verifying mode without a CA file is one clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sagaworks.adapters.postgres.errors import InvalidDatabaseUrl

__all__ = ["SSL_MODES", "VERIFYING_MODES", "ConnectTarget", "parse_database_url"]

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""libpq's `sslmode` values, weakest first."""

VERIFYING_MODES = frozenset({"verify-ca", "verify-full"})
"""Modes that check the server's certificate: they need `sslrootcert`."""

_SCHEMES = {"postgresql+asyncpg": "postgresql", "postgresql": "postgresql", "postgres": "postgres"}
_FILES = ("sslrootcert", "sslcert", "sslkey")


@dataclass(frozen=True, slots=True)
class ConnectTarget:
    """Where and how to connect: the DSN every asyncpg connection of sagaworks is given."""

    dsn: str
    """A `postgresql://` DSN with the TLS parameters in libpq's spelling (`sslmode=`)."""
    sslmode: str | None
    """The TLS mode asked for; None leaves it to asyncpg (`prefer`, or `PGSSLMODE`)."""


def parse_database_url(url: str) -> ConnectTarget:
    """Read `url` once for every pool; `InvalidDatabaseUrl` when its TLS parameters are wrong."""
    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None:
        raise InvalidDatabaseUrl(
            url,
            f"the scheme is {parts.scheme or 'missing'}://",
            "start it with postgresql:// (or postgres://, postgresql+asyncpg://)",
        )
    params = parse_qsl(parts.query, keep_blank_values=True)
    names = [name for name, _ in params]
    for name in set(names):
        if names.count(name) > 1:
            raise InvalidDatabaseUrl(url, f"{name} is given twice", f"keep one {name}=")
    query = dict(params)
    sslmode = _mode(url, query)
    _check_files(url, query, sslmode)
    if sslmode is not None:
        query["sslmode"] = sslmode
    dsn = urlunsplit((scheme, parts.netloc, parts.path, urlencode(query, safe="/:~"), ""))
    return ConnectTarget(dsn=dsn, sslmode=sslmode)


def _mode(url: str, query: dict[str, str]) -> str | None:
    alias = query.pop("ssl", None)
    mode = query.pop("sslmode", None)
    if alias is not None and mode is not None and alias != mode:
        raise InvalidDatabaseUrl(
            url,
            f"ssl={alias} and sslmode={mode} disagree",
            "give one of them (sslmode= is libpq's name, ssl= an alias of it)",
        )
    chosen = mode if mode is not None else alias
    if chosen is not None and chosen not in SSL_MODES:
        name = "sslmode" if mode is not None else "ssl"
        raise InvalidDatabaseUrl(
            url,
            f"{name}={chosen} is not a TLS mode",
            f"use one of {', '.join(SSL_MODES)} (verify-full checks the server's certificate "
            "and name)",
        )
    return chosen


def _described(sslmode: str | None) -> str:
    return "no sslmode (asyncpg then uses prefer)" if sslmode is None else f"sslmode={sslmode}"


def _check_files(url: str, query: dict[str, str], sslmode: str | None) -> None:
    if sslmode in VERIFYING_MODES and not query.get("sslrootcert"):
        raise InvalidDatabaseUrl(
            url,
            f"sslmode={sslmode} verifies the server's certificate but no sslrootcert is given",
            "add sslrootcert=<file with the CA certificate(s) that signed the server's "
            "certificate>",
        )
    if query.get("sslrootcert") and sslmode not in VERIFYING_MODES | {"require"}:
        raise InvalidDatabaseUrl(
            url,
            f"sslrootcert is given but {_described(sslmode)} does not check the server's "
            "certificate",
            "add sslmode=verify-full (or verify-ca) so that it is checked",
        )
    if query.get("sslkey") and not query.get("sslcert"):
        raise InvalidDatabaseUrl(
            url, "sslkey is given without sslcert", "add sslcert=<client certificate file>"
        )
    if sslmode == "disable":
        stray = [name for name in (*_FILES, "sslpassword") if name in query]
        if stray:
            raise InvalidDatabaseUrl(
                url,
                f"sslmode=disable turns TLS off but {', '.join(stray)} is given",
                "remove them, or choose a TLS mode such as verify-full",
            )
    for name in _FILES:
        value = query.get(name)
        if not value:
            continue
        path = Path(value).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise InvalidDatabaseUrl(
                url,
                f"{name} file {value} does not exist or cannot be read",
                f"point {name}= at a readable PEM file",
            )

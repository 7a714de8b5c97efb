"""Errors of the PostgreSQL adapter that an operator has to act on.

Each message is one line saying what is wrong and what to do, and never shows
a password, so the CLI and the worker can print it as it is.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from sagaworks.settings import mask_url

__all__ = [
    "DatabaseUnreachable",
    "InvalidDatabaseUrl",
    "RolesNotApplied",
    "SchemaAhead",
    "SchemaBehind",
    "SchemaNotCurrent",
]

_UPGRADE_COMMAND = '"sagaworks db upgrade"'


def _public_url(url: str) -> str:
    """`url` without driver, password and query string (which may carry credentials too)."""
    parts = urlsplit(mask_url(url))
    scheme = parts.scheme.split("+", 1)[0]
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))


class DatabaseUnreachable(Exception):
    """PostgreSQL could not be used at all: not running, unreachable, login refused, no database."""

    def __init__(self, url: str, problem: str, remedy: str) -> None:
        self.url = _public_url(url)
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"cannot use PostgreSQL at {self.url}: {problem}; {remedy}")


class RolesNotApplied(Exception):
    """The role `sagaworks db roles` connected as may not create roles or grant on the tables."""

    def __init__(self, url: str) -> None:
        self.url = _public_url(url)
        super().__init__(
            f"the role of {self.url} may not create the sagaworks roles or change their grants: "
            "set SAGAWORKS_ADMIN_DATABASE_URL to a superuser (or a role with CREATEROLE that is "
            'a member of the migrations role) and run "sagaworks db roles" again'
        )


class InvalidDatabaseUrl(ValueError):
    """A database URL unusable as written: a wrong TLS mode, a missing certificate file."""

    def __init__(self, url: str, problem: str, remedy: str) -> None:
        self.url = _public_url(url)
        self.problem = problem
        self.remedy = remedy
        super().__init__(
            f"invalid database URL {self.url}: {problem}; {remedy} "
            "(in SAGAWORKS_DATABASE_URL or SAGAWORKS_MIGRATION_DATABASE_URL)"
        )


class SchemaNotCurrent(Exception):
    """The database schema revision is not the one this sagaworks was built for."""

    def __init__(self, current: str | None, head: str, message: str) -> None:
        self.current = current
        self.head = head
        super().__init__(message)


class SchemaBehind(SchemaNotCurrent):
    """The database is not migrated, or migrated to an older revision than this code needs."""

    def __init__(self, current: str | None, head: str) -> None:
        if current is None:
            message = (
                f"database schema is not migrated but this sagaworks needs {head}: "
                f"run {_UPGRADE_COMMAND}"
            )
        else:
            message = (
                f"database schema is at {current} but this sagaworks needs {head}: "
                f"run {_UPGRADE_COMMAND}"
            )
        super().__init__(current, head, message)


class SchemaAhead(SchemaNotCurrent):
    """The database was migrated by a newer sagaworks whose revision this code does not know."""

    def __init__(self, current: str, head: str) -> None:
        message = (
            f"database schema is at {current}, a revision this sagaworks (which needs {head}) "
            "does not know: deploy the newer sagaworks that migrated it, or downgrade the "
            f'database with that version ("sagaworks db downgrade {head}")'
        )
        super().__init__(current, head, message)

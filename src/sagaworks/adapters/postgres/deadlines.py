"""How long a worker's database session may wait on PostgreSQL, and PostgreSQL on it.

A network that drops packets without resetting the connection gives no error
on either side: a statement in flight waits for an answer that never comes,
and the server keeps the session, and every saga lock its open transaction
holds, for a client that is gone. Three deadlines bound that:

- `statement_timeout` (server side): PostgreSQL cancels a statement running
  longer than `statement_timeout_s`;
- the client's own deadline, `statement_timeout_s` plus a grace: asyncpg
  stops waiting for an answer that cannot arrive, and the pool drops the
  connection; the worker waits the outage out like any database error;
- `idle_in_transaction_session_timeout` (server side): a session left inside
  a transaction by a client that vanished is ended, and its locks released,
  so other workers can take its sagas.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLIENT_GRACE_S", "SessionDeadlines"]

CLIENT_GRACE_S = 2.0
"""How much longer than the server's limit the client waits: the server's cancel comes first."""


@dataclass(frozen=True)
class SessionDeadlines:
    statement_timeout_s: float
    idle_in_transaction_timeout_s: float

    @property
    def command_timeout_s(self) -> float:
        """asyncpg's per-statement deadline."""
        return self.statement_timeout_s + CLIENT_GRACE_S

    def server_settings(self) -> dict[str, str]:
        """Session parameters sent when a connection opens (milliseconds, as PostgreSQL reads)."""
        return {
            "statement_timeout": str(round(self.statement_timeout_s * 1000)),
            "idle_in_transaction_session_timeout": str(
                round(self.idle_in_transaction_timeout_s * 1000)
            ),
        }

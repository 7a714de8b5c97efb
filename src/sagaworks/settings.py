"""Every tunable of sagaworks, read once from the environment and `/run/secrets`.

Settings are plain data handed to `bootstrap`; no `SAGAWORKS_*` variable is
read anywhere else, so a test can build a `Settings` object and get a fully
wired system without touching `os.environ`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)

from sagaworks.redaction import mask_url

__all__ = ["DEFAULT_SECRETS_DIR", "Settings", "mask_url", "reference_markdown"]

DEFAULT_SECRETS_DIR = Path("/run/secrets")


class Settings(BaseSettings):
    """Effective configuration; environment variables are `SAGAWORKS_<FIELD>`."""

    model_config = SettingsConfigDict(
        env_prefix="SAGAWORKS_",
        extra="forbid",
        frozen=True,
        validate_default=True,
        hide_input_in_errors=True,  # a rejected URL may carry a password
    )

    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@localhost:5672/"),
        description="RabbitMQ URL; `amqps://` for TLS, verified against `?cafile=` "
        "(see docs/security.md).",
    )
    database_url: SecretStr = Field(
        default=SecretStr("postgresql://postgres@localhost:5432/sagaworks"),
        description="PostgreSQL URL of the worker role; "
        "`?sslmode=verify-full&sslrootcert=<CA file>` for verified TLS (see docs/security.md).",
    )
    migration_database_url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URL of the migrations role; defaults to `database_url`.",
    )
    admin_database_url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URL of an administrator (superuser, or CREATEROLE and member of "
        "the migrations role) for `sagaworks db roles` only; defaults to the migrations URL.",
    )
    db_role_prefix: str = Field(
        default="sagaworks_",
        pattern=r"^[a-z_][a-z0-9_]{0,40}$",
        description="Prefix of the PostgreSQL roles `sagaworks db roles` creates: "
        "`<prefix>migrator`, `<prefix>worker`, `<prefix>operator`, `<prefix>readonly`.",
    )
    db_migrator_password: SecretStr | None = Field(
        default=None,
        description="Password `db roles` sets on the migrations role; unset: left as it is.",
    )
    db_worker_password: SecretStr | None = Field(
        default=None,
        description="Password `db roles` sets on the worker role; unset: left as it is.",
    )
    db_operator_password: SecretStr | None = Field(
        default=None,
        description="Password `db roles` sets on the operators' role; unset: left as it is.",
    )
    db_readonly_password: SecretStr | None = Field(
        default=None,
        description="Password `db roles` sets on the read-only (dashboards) role; "
        "unset: left as it is.",
    )
    db_pool_size: int = Field(
        default=10,
        ge=1,
        le=200,
        description=(
            "Pooled connections per worker. When all are in use, work waits for one for at "
            "most the statement timeout plus the connect timeout, then is retried like an outage."
        ),
    )
    db_pool_max_overflow: int = Field(
        default=5, ge=0, le=200, description="Extra connections allowed above the pool size."
    )
    db_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Deadline for opening a database connection."
    )
    amqp_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Deadline for opening the broker connection."
    )
    amqp_heartbeat_s: int = Field(
        default=6,
        ge=1,
        le=600,
        description="AMQP heartbeat interval; a broker connection silent for about three "
        "intervals (plus one second each) is declared dead and reopened. A `heartbeat=` in "
        "the URL wins.",
    )
    amqp_publish_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Longest wait for the broker to confirm a publish; then the rows stay in "
        "the outbox and the sweeper publishes them once the broker answers again.",
    )
    db_statement_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Longest statement of a worker (its statements take milliseconds): "
        "PostgreSQL cancels it after this, and the worker gives up on an answer 2 s later "
        "(a silent network). Operator commands and migrations have no such limit.",
    )
    db_idle_in_transaction_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="PostgreSQL ends a worker's session idle this long inside a transaction "
        "(a worker cut off mid-transaction), releasing its saga locks.",
    )
    prefetch: int = Field(
        default=128,
        ge=1,
        le=10_000,
        description="Unacknowledged deliveries per consumer; a port call holds its delivery, "
        "so this is also how many calls to one port a worker makes at once.",
    )
    batch_size: int = Field(
        default=256,
        ge=1,
        le=1_000,
        description="Messages applied in one database transaction at most; 1 turns batching off.",
    )
    batch_concurrency: int = Field(
        default=1,
        ge=1,
        le=100,
        description="Batched transactions in flight at once per worker; while one commits, "
        "the next batch gathers. More helps only a database with cores to spare.",
    )
    eager_steps: bool = Field(
        default=True,
        description="Run a step whose command a transition just committed in the same worker, "
        "when it serves the port, the port's breaker is closed and it has a place free, instead "
        "of sending the command round the broker; the command stays in the outbox under a "
        "lease. `false`: every step command goes through its port's queue.",
    )
    eager_steps_per_port: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Eager steps of one port running at once in a worker; further commands go "
        "through the port's queue, where any worker can take them.",
    )
    eager_lease_s: float | None = Field(
        default=None,
        gt=0,
        le=3_600,
        description="How long an eager step's command stays unpublished: if its result has not "
        "committed by then (the worker died), the outbox sweeper sends it to the port's queue. "
        "Unset: per port, its longest delivery (every immediate attempt to its call deadline) "
        "plus the statement timeout, and at least 30 s. Set, it applies to every port as it "
        "is: keep it above each port's longest delivery, or a slow call runs a second time.",
    )
    delivery_limit: int = Field(
        default=20,
        ge=1,
        le=1_000,
        description="Returns of one message to its queue before the broker dead-letters it. "
        "A worker that dies returns every delivery it held, so this is also how many crashes "
        "in a row a healthy message outlives; changing it on an existing queue: "
        "docs/topology.md.",
    )
    dead_letter_delivery_limit: int = Field(
        default=20,
        ge=1,
        le=1_000,
        description="Deliveries of one dead letter before the broker moves it to the "
        "unstorable queue (`sagaworks dlq unstorable`); each waits out a database outage "
        "for up to a minute first.",
    )
    grace_period_s: float = Field(
        default=20.0,
        gt=0,
        description="On SIGTERM/SIGINT: time to settle in-flight work and flush the outbox.",
    )
    health_file: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "sagaworks-worker-health.json",
        description="Where the worker writes its health on every heartbeat and "
        "`sagaworks health` reads it (one file per worker process on a host).",
    )
    park_for_s: float = Field(
        default=300.0,
        gt=0,
        description="How long an event that arrived before its saga existed is kept before "
        "it is dead-lettered (`no_saga`); one whose saga exists waits as long as the saga lives.",
    )
    parked_expiry_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often events kept past their bound are looked for.",
    )
    max_message_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        description="Larger bodies are dead-lettered as `oversized`, unparsed, as their first "
        "4 KiB, length and SHA-256. Keep RabbitMQ's `max_message_size` above it.",
    )
    timer_poll_interval_s: float = Field(
        default=0.2,
        gt=0,
        le=60,
        description="How often due timers (deadlines, retries) are looked for.",
    )
    timer_max_attempts: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="Failed applications of one timer before it is parked with its error "
        "(`timers.parked_at`; see docs/recoverability.md).",
    )
    timer_retry_base_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Wait after a timer's first failed application; doubled after each further "
        "failure, up to `SAGAWORKS_TIMER_RETRY_MAX_S`.",
    )
    timer_retry_max_s: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="Longest wait between two applications of a failing timer.",
    )
    outbox_sweep_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Longest wait between sweeps for outbox rows nobody published.",
    )
    retain_inbox_s: float = Field(
        default=7 * 86400.0,
        ge=0,
        description="How long inbox rows (processed message ids) are kept; longer than any "
        "redelivery or publisher retry can arrive. 0: for ever (see docs/retention.md).",
    )
    retain_published_outbox_s: float = Field(
        default=3600.0,
        ge=0,
        description="How long outbox rows are kept after they were published. 0: for ever.",
    )
    retain_finished_sagas_s: float = Field(
        default=30 * 86400.0,
        ge=0,
        description="How long completed and compensated sagas, with their history, are kept "
        "after they ended. 0: for ever.",
    )
    retain_dead_letters_s: float = Field(
        default=30 * 86400.0,
        ge=0,
        description="How long replayed and archived dead letters are kept after their last "
        "failure or operator action (their audit rows stay). 0: for ever.",
    )
    retain_breakers_s: float = Field(
        default=7 * 86400.0,
        ge=0,
        description="How long a breaker row unchanged that long is kept (workers that are gone; "
        "a live worker writes its row again on its next change). 0: for ever.",
    )
    prune_interval_s: float = Field(
        default=900.0,
        ge=0,
        description="How often a worker prunes (one worker at a time cluster-wide); "
        "0: never, prune with `sagaworks db prune` instead.",
    )
    prune_batch_size: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Rows deleted per transaction when pruning.",
    )
    prune_pause_s: float = Field(
        default=0.05,
        ge=0,
        le=60,
        description="Rest between two pruning batches, so the hot path always gets its turn.",
    )
    read_rollup_interval_s: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="How often a worker folds new saga history into the per-minute rows the "
        "dashboards read (one worker at a time cluster-wide); 0: never, and the dashboards' "
        "history views read ever more raw history (docs/operations.md).",
    )
    read_rollup_keep_s: float = Field(
        default=86400.0,
        ge=3600,
        description="How long the per-minute rows of the dashboards are kept (the views read "
        "the last hour).",
    )
    heartbeat_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How often a worker refreshes its row in `worker_heartbeats` (one upsert); "
        "a worker silent for three intervals shows as gone.",
    )
    sagas: tuple[str, ...] = Field(
        default=(),
        description="Modules whose `SAGA` the worker runs; each also provides `build_ports()`. "
        'A JSON list in the environment: `["sagas.order_fulfilment.http_ports"]`. '
        "With none set the worker does not start (exit code 7).",
    )
    exchange_prefix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_.\-]*$",
        description="Prepended to every exchange and queue name (one broker, several tenants).",
    )
    publishers: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Who may publish each consumed event type: broker users (the AMQP `user_id`) "
        "by type, replacing what the message class declares (`publishers=`). A JSON object: "
        '`{"order.placed": ["order-service"]}`. See docs/security.md.',
    )
    profile: Literal["development", "production"] = Field(
        default="development",
        description="`production`: the worker refuses to start while a consumed event type has "
        "no allowed publishers; otherwise it warns at start-up.",
    )
    declare_topology: bool = Field(
        default=True,
        description="Declare exchanges, queues and bindings at worker start. `false` when deploy "
        "runs `sagaworks topology apply`: the worker then only checks that its queues exist, "
        "and its broker user needs no configure permission.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="`auto`: console on a terminal, JSON otherwise."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Threshold for sagaworks and library loggers."
    )

    @field_validator("publishers")
    @classmethod
    def _named_publishers(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for message_type, users in value.items():
            if not users or not all(users):
                raise ValueError(
                    f'SAGAWORKS_PUBLISHERS: "{message_type}" needs at least one broker user name, '
                    'e.g. {"order.placed": ["order-service"]}'
                )
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in {"amqp", "amqps"}:
            raise ValueError(
                f"SAGAWORKS_AMQP_URL must start with amqp:// or amqps://, not {scheme or 'nothing'}://"
            )
        return value

    @field_validator("database_url", "migration_database_url", "admin_database_url")
    @classmethod
    def _pg_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in {"postgresql", "postgres", "postgresql+asyncpg"}:
            raise ValueError(
                "database URLs must start with postgresql:// (or postgresql+asyncpg://), "
                f"not {scheme or 'nothing'}://"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Secret files are named after the field alone (`database_url`), without the prefix."""
        secrets = SecretsSettingsSource(
            settings_cls,
            secrets_dir=getattr(file_secret_settings, "secrets_dir", None),
            env_prefix="",
        )
        return init_settings, env_settings, dotenv_settings, secrets

    @classmethod
    def load(cls, secrets_dir: Path | None = DEFAULT_SECRETS_DIR, **overrides: Any) -> Settings:
        """Read the environment, then secret files (one file per field) if the folder exists."""
        if secrets_dir is not None and secrets_dir.is_dir():
            return cls(_secrets_dir=secrets_dir, **overrides)
        return cls(**overrides)

    def effective_migration_url(self) -> str:
        url = self.migration_database_url or self.database_url
        return url.get_secret_value()

    def effective_admin_url(self) -> str:
        """Where `db roles` connects: the admin URL, else the migrations URL."""
        if self.admin_database_url is not None:
            return self.admin_database_url.get_secret_value()
        return self.effective_migration_url()

    def as_public_dict(self) -> dict[str, Any]:
        """Every setting with passwords masked: what `sagaworks config show` prints."""
        public: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***" if name.endswith("_password") else mask_url(value.get_secret_value())
            public[name] = value
        return public


def reference_markdown() -> str:
    """The settings reference in docs/configuration.md, generated from the fields above."""
    lines = [
        "| variable | default | what it sets |",
        "|---|---|---|",
    ]
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            default = mask_url(default.get_secret_value())
        if isinstance(default, tuple):
            default = ",".join(default)
        shown = "(none)" if default in (None, "", {}) else f"`{default}`"
        description = (info.description or "").replace("|", "\\|")
        lines.append(f"| `SAGAWORKS_{name.upper()}` | {shown} | {description} |")
    return "\n".join(lines) + "\n"

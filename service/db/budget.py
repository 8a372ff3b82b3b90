"""The connection budget: do the pools of every worker of every instance fit in the server?

Each worker holds up to DB_POOL_MAX connections, an instance runs WEB_CONCURRENCY workers, and
APP_INSTANCES instances share the server. The server takes `max_connections` clients, less
the slots it keeps for superusers (`superuser_reserved_connections`) and, from PostgreSQL 16,
for roles granted pg_use_reserved_connections (`reserved_connections`). A budget that does not
fit starts fine and fails later, at the busiest moment, with "too many clients already": the
gunicorn master checks it at start (`on_starting`, before migrating) and refuses instead.

Behind PgBouncer the query below passes through to the server, so the limits read are the
server's own; docs/scaling.md says what to set then.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg2

from config import Settings
from service.db.schema import connect_when_up


class BudgetExceeded(RuntimeError):
    """The pools could open more connections than the server allows; the message shows the sum.

    A RuntimeError, so that gunicorn prints it as one line and exits 1 when a hook raises it.
    """


@dataclass(frozen=True)
class Budget:
    """The most server connections the service can hold, over all its instances."""

    web_concurrency: int
    pool_max: int
    instances: int
    # With replicas, each worker also holds one connection to every server for its monitor
    # (service/db/replicas.py).
    monitors: int = 0

    @classmethod
    def of(cls, settings: Settings) -> Budget:
        monitors = 1 if settings.database_replica_urls else 0
        return cls(settings.web_concurrency, settings.db_pool_max, settings.app_instances, monitors)

    @property
    def connections(self) -> int:
        return self.web_concurrency * (self.pool_max + self.monitors) * self.instances

    def __str__(self) -> str:
        pool = f"DB_POOL_MAX {self.pool_max}"
        if self.monitors:
            pool = f"(DB_POOL_MAX {self.pool_max} + {self.monitors} monitor)"
        return (
            f"WEB_CONCURRENCY {self.web_concurrency} x {pool}"
            f" x APP_INSTANCES {self.instances} = {self.connections} connections"
        )


@dataclass(frozen=True)
class ServerLimits:
    """The server's connection settings; `reserved_connections` is 0 before PostgreSQL 16."""

    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int = 0

    @property
    def allowed(self) -> int:
        """Connections an ordinary role may open."""
        return (
            self.max_connections - self.superuser_reserved_connections - self.reserved_connections
        )

    def __str__(self) -> str:
        text = (
            f"max_connections {self.max_connections}"
            f" - superuser_reserved_connections {self.superuser_reserved_connections}"
        )
        if self.reserved_connections:
            text += f" - reserved_connections {self.reserved_connections}"
        return text


def check(budget: Budget, limits: ServerLimits) -> None:
    """Raise BudgetExceeded when `budget` needs more connections than `limits` allow."""
    if budget.connections > limits.allowed:
        raise BudgetExceeded(
            f"{budget}, but the server allows {limits.allowed} ({limits}): lower WEB_CONCURRENCY,"
            " DB_POOL_MAX or APP_INSTANCES, or raise the server's max_connections"
        )


_LIMITS_SQL = (
    "SELECT current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int,"
    " coalesce(current_setting('reserved_connections', true)::int, 0)"
)


def read_limits(dsn: str, connect_timeout: int) -> ServerLimits:
    """The server's limits, on a connection of its own that is closed before returning.

    Waits for the server as the migration does (this runs first, so this is the one that
    waits); raises RuntimeError, naming the server but never its password, when it cannot.
    """
    conn = connect_when_up(dsn, connect_timeout)
    try:
        with conn.cursor() as cur:
            cur.execute(_LIMITS_SQL)
            return ServerLimits(*cur.fetchone())
    except psycopg2.Error as exc:
        raise RuntimeError(f"cannot read the server's max_connections: {exc}".strip()) from None
    finally:
        conn.close()

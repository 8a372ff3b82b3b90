"""The database schema: numbered SQL files in `service/db/migrations/`, applied once, in order.

`migrate()` runs in the gunicorn master before any worker starts (the `on_starting` hook), on a
connection of its own that it closes before returning. Several instances may start at once: a
transaction-scoped advisory lock lets one apply the files while the others wait, and then they
find nothing left to do.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import psycopg2

from config import redact_dsn
from service.db.pool import connect

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
LOCK_KEY = 0x5E71CE  # any constant shared by every instance of this service
START_WAIT_S = 30.0  # how long a starting service waits for its database to accept connections


def migrate(dsn: str, connect_timeout: int, wait_s: float = START_WAIT_S) -> list[str]:
    """Apply every migration not yet applied; return the names applied now.

    Waits up to `wait_s` for the server to accept connections (a database container often
    starts beside the service), then raises RuntimeError naming the server, never its password.
    """
    conn = connect_when_up(dsn, connect_timeout, wait_s)
    try:
        with conn, conn.cursor() as cur:
            # A migration may take longer than the service's statements may: a statement
            # timeout set for the role (docs/scaling.md) must not cut it short.
            cur.execute("SET LOCAL statement_timeout = 0")
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT version FROM schema_migrations")
            done = {version for (version,) in cur.fetchall()}
            applied = []
            for version, path in _migration_files():
                if version not in done:
                    cur.execute(path.read_text())
                    cur.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, path.name),
                    )
                    applied.append(path.name)
        return applied
    finally:
        conn.close()


def _migration_files() -> list[tuple[int, Path]]:
    files = sorted(MIGRATIONS.glob("[0-9][0-9][0-9]_*.sql"))
    return [(int(path.name[:3]), path) for path in files]


def connect_when_up(dsn: str, connect_timeout: int, wait_s: float = START_WAIT_S):
    """A connection of its own, once the server accepts one: a database container often starts
    beside the service. Raises RuntimeError after `wait_s`, naming the server, never its
    password."""
    deadline = time.monotonic() + wait_s
    delay = 0.1
    while True:
        try:
            return connect(dsn, connect_timeout, application_name="service-migrate")
        except psycopg2.OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise RuntimeError(
                    f"cannot reach the database ({redact_dsn(dsn)}) after {wait_s:g} s: "
                    f"{str(exc).strip()}"
                ) from None
            log.info("waiting for the database: %s", str(exc).strip())
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

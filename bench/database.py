"""The bench's own PostgreSQL: a throwaway cluster with one seeded database.

Every variant reads the same `users` table, created by the service's own migrations, so that
the servers differ only in how they reach it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg2

from deploy.localpg import LocalPostgres, find_bindir
from service.db import schema

DBNAME = "bench"
SELECT_USER = "SELECT id, name, email, created_at FROM users WHERE id = %s"


def start(max_connections: int) -> LocalPostgres:
    """A started cluster; the caller stops it. `max_connections` must leave room for the
    per-request variant, which opens one server connection per request in flight."""
    return LocalPostgres(settings={"max_connections": str(max_connections)}).start()


def seed(server: LocalPostgres, users: int) -> str:
    """Create the bench database with `users` users (ids 1..users); return its DSN."""
    dsn = server.create_database(DBNAME)
    schema.migrate(dsn, connect_timeout=5)
    seed_users(dsn, users)
    return dsn


def seed_users(dsn: str, users: int) -> None:
    """Insert `users` users with ids 1..users into the freshly migrated table, then VACUUM
    ANALYZE it; raise RuntimeError when the ids come out otherwise (the table was not empty)."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO users (name, email)"
                " SELECT 'User ' || g, 'user' || g || '@example.com'"
                " FROM generate_series(1, %s) AS g",
                (users,),
            )
            cur.execute("SELECT count(*), min(id), max(id) FROM users")
            found = cur.fetchone()
            if found != (users, 1, users):
                raise RuntimeError(f"seeding gave count, min, max id {found}, not 1..{users}")
            cur.execute("VACUUM ANALYZE users")
    finally:
        conn.close()


def pgbench_path() -> str:
    """pgbench beside the server's binaries, else on PATH, else in Debian's versioned folders."""
    candidates = [find_bindir() / "pgbench"]
    on_path = shutil.which("pgbench")
    if on_path:
        candidates.append(Path(on_path))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
    for path in candidates:
        if path.exists():
            return str(path)
    raise RuntimeError(
        "pgbench was not found: it comes with PostgreSQL's client programs "
        "(Debian/Ubuntu: it comes with the postgresql package)"
    )

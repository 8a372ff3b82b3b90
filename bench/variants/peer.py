"""The peer: what one might pick instead, Flask with psycopg 3 and psycopg_pool.

Honest, not handicapped: a fixed pool of DB_POOL_MAX connections per worker, opened after fork
(`peer.conf.py`), waiting up to DB_POOL_TIMEOUT for a connection as the service does;
autocommit, so a read is one round trip; rows as dicts; the statement timeout as a startup
option; psycopg's automatic server-side prepare of repeated queries left on.
"""

from __future__ import annotations

import os

from flask import Flask
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

SELECT_USER = "SELECT id, name, email, created_at FROM users WHERE id = %s"

app = Flask(__name__)
app.json.sort_keys = False
pool: ConnectionPool | None = None


def open_pool() -> None:
    """Open this worker's pool and wait until every connection is up (after fork only)."""
    global pool
    size = int(os.environ["DB_POOL_MAX"])
    pool = ConnectionPool(
        os.environ["DATABASE_URL"],
        min_size=size,
        max_size=size,
        timeout=float(os.environ["DB_POOL_TIMEOUT"]),
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            "options": "-c statement_timeout=5000",
        },
        open=True,
    )
    pool.wait()


def close_pool() -> None:
    if pool is not None:
        pool.close()


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.get("/users/<int:user_id>")
def get_user(user_id: int):
    with pool.connection() as conn:
        user = conn.execute(SELECT_USER, (user_id,)).fetchone()
    if user is None:
        return {"error": {"code": "not_found", "message": "no such user"}}, 404
    return {**user, "created_at": user["created_at"].isoformat()}


@app.errorhandler(PoolTimeout)
def busy(exc: PoolTimeout):
    return {"error": {"code": "pool_timeout", "message": str(exc)}}, 503

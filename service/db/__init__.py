"""The one way from request handlers to the database: `get_db()`.

Each gunicorn worker opens its own pool after fork (`open_pool`, from the `post_worker_init`
hook) and closes it when it exits (`close_pool`, from `worker_exit`). The pool hangs on the
app, so a test can build an app and a pool of its own.

This package knows nothing of HTTP: what its exceptions become is service/api/errors.py's
business.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from flask import Flask, current_app

from service.db.errors import (
    ClientGone,
    DatabaseUnavailable,
    PoolTimeout,
    StatementTimeout,
    TransactionAborted,
    TransactionConflict,
)
from service.db.pool import Cursor, Pool, PoolEvents

__all__ = [
    "CLIENT_GONE",
    "EVENTS",
    "WAITING_ELSEWHERE",
    "ClientGone",
    "Cursor",
    "DatabaseUnavailable",
    "Pool",
    "PoolTimeout",
    "StatementTimeout",
    "TransactionAborted",
    "TransactionConflict",
    "close_pool",
    "current_pool",
    "get_db",
    "open_pool",
]

EXTENSION = "service.db.pool"
# Where an app keeps the `PoolEvents` listener its pool should report to (create_app puts the
# metrics there); without one the pool reports nothing.
EVENTS = "service.db.events"
# Where an app keeps a callable counting requests that wait for a connection outside the pool
# (a batch loader's lookups), which DB_POOL_MAX_WAITING counts too.
WAITING_ELSEWHERE = "service.db.waiting_elsewhere"
# Where an app keeps a callable saying whether the current request's client has hung up: a
# request that waited for a connection is then not served (`ClientGone`).
CLIENT_GONE = "service.db.client_gone"


def open_pool(app: Flask) -> Pool:
    """Create this worker's pool from the app's settings, keep it on the app, and warm it up
    (best effort: a server that is down is logged, and requests connect later)."""
    settings = app.config["SETTINGS"]
    events: PoolEvents | None = app.extensions.get(EVENTS)
    pool = Pool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        timeout=settings.db_pool_timeout,
        statement_timeout_ms=settings.db_statement_timeout_ms,
        connect_timeout=settings.db_connect_timeout,
        max_lifetime=settings.db_pool_max_lifetime,
        max_waiting=settings.db_pool_max_waiting,
        leak_warn_s=settings.db_pool_leak_warn_s,
        events=events,
        waiting_elsewhere=app.extensions.get(WAITING_ELSEWHERE),
        client_gone=app.extensions.get(CLIENT_GONE),
    )
    app.extensions[EXTENSION] = pool
    pool.warm()
    return pool


def close_pool(app: Flask) -> None:
    """Close the app's pool, if it has one (see `Pool.close` for lent connections)."""
    pool = app.extensions.pop(EXTENSION, None)
    if pool is not None:
        pool.close()


def current_pool() -> Pool:
    """The pool of the app in context; RuntimeError when none was opened."""
    try:
        return current_app.extensions[EXTENSION]
    except KeyError:
        raise RuntimeError("no pool is open for this app: call service.db.open_pool(app)") from None


def get_db(
    timeout: float | None = None, *, autocommit: bool = False
) -> AbstractContextManager[Cursor]:
    """A cursor inside one transaction: commit on a clean exit, roll back on an exception,
    whatever the block wrote through and however (see `Pool.connection`).

    Waits for a free connection up to DB_POOL_TIMEOUT (or `timeout`), then raises
    `PoolTimeout`; raises `ClientGone`, having sent nothing, when the request's client hung up
    before the connection was lent.

    `autocommit=True` makes every statement its own transaction: use it for a block that runs a
    single statement (it saves the BEGIN and COMMIT round trips), or one that cannot run in a
    transaction block, never for statements that must stand or fall together.
    """
    return current_pool().connection(timeout, autocommit)

"""The one door from request handlers to the database: `get_db()`.

Each gunicorn worker opens its own pool after fork (`open_pool`, from the `post_worker_init`
hook) and closes it when it exits (`close_pool`, from `worker_exit`). The pool hangs on the
app, so a test can build an app and a pool of its own.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from flask import Flask, current_app, has_request_context, request

from service.pool import Cursor, Pool

EXTENSION = "service.pool"


def open_pool(app: Flask) -> Pool:
    """Create this worker's pool from the app's settings and warm it up (best effort)."""
    settings = app.config["SETTINGS"]
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
    )
    app.extensions[EXTENSION] = pool
    pool.warm()
    return pool


def close_pool(app: Flask) -> None:
    pool = app.extensions.pop(EXTENSION, None)
    if pool is not None:
        pool.close()


def current_pool() -> Pool:
    try:
        return current_app.extensions[EXTENSION]
    except KeyError:
        raise RuntimeError("no pool is open for this app: call service.db.open_pool(app)") from None


def get_db(timeout: float | None = None) -> AbstractContextManager[Cursor]:
    """A cursor inside one transaction: commit on a clean exit, roll back on an exception.

    Waits for a free connection up to DB_POOL_TIMEOUT (or `timeout`), then raises
    `PoolTimeout`; see `Pool.connection` for what else it raises. A connection held longer
    than DB_POOL_LEAK_WARN_S is logged with the route that holds it.
    """
    return current_pool().connection(timeout, _route())


def _route() -> str:
    if not has_request_context():
        return ""
    rule = request.url_rule
    return f"{request.method} {rule.rule if rule is not None else request.path}"

"""The one door from request handlers to the database: `get_db()`.

Each gunicorn worker opens its own pool after fork (`open_pool`, from the `post_worker_init`
hook) and closes it when it exits (`close_pool`, from `worker_exit`). The pool hangs on the
app, so a test can build an app and a pool of its own.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from flask import Flask, current_app, has_request_context, request

from service import admission, logs, metrics
from service.pool import Cursor, Pool, PoolTimeout

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
        events=_PoolEvents(),
    )
    app.extensions[EXTENSION] = pool
    pool.warm()
    return pool


class _PoolEvents(metrics.PoolMetrics):
    """The pool's events as metrics; each wait for a connection, lent or timed out, also counts
    towards the current request's `pool_wait_ms` in its access log line."""

    def checked_out(self, wait_s: float) -> None:
        super().checked_out(wait_s)
        logs.add_pool_wait(wait_s)

    def timed_out(self, wait_s: float) -> None:
        super().timed_out(wait_s)
        logs.add_pool_wait(wait_s)


def close_pool(app: Flask) -> None:
    pool = app.extensions.pop(EXTENSION, None)
    if pool is not None:
        pool.close()


def waiting(app: Flask) -> int:
    """Requests of this worker waiting in its pool for a connection (0 before it is open)."""
    pool = app.extensions.get(EXTENSION)
    return pool.waiting if pool is not None else 0


def current_pool() -> Pool:
    try:
        return current_app.extensions[EXTENSION]
    except KeyError:
        raise RuntimeError("no pool is open for this app: call service.db.open_pool(app)") from None


def get_db(
    timeout: float | None = None, *, autocommit: bool = False
) -> AbstractContextManager[Cursor]:
    """A cursor inside one transaction: commit on a clean exit, roll back on an exception.

    Waits for a free connection up to DB_POOL_TIMEOUT (or `timeout`), less what the request
    already waited at the app's door (service/admission.py), then raises `PoolTimeout`; see
    `Pool.connection` for what else it raises. A connection held longer than
    DB_POOL_LEAK_WARN_S is logged with the route that holds it.

    `autocommit=True` makes every statement its own transaction, one round trip each: use it
    for a block that runs a single statement (it needs no COMMIT), never for several
    statements that must stand or fall together.
    """
    pool = current_pool()
    return pool.connection(_budget(pool, timeout), _route(), autocommit)


def wait_budget(timeout: float | None = None) -> float:
    """How long the current request may still wait for a connection: `timeout` (default
    DB_POOL_TIMEOUT) less its wait at the app's door. Raises the pool's `PoolTimeout` when the
    door turned the request away or nothing is left, as `get_db()` does."""
    return _budget(current_pool(), timeout)


def _budget(pool: Pool, timeout: float | None) -> float:
    if timeout is None:
        timeout = pool.timeout
    ticket = admission.current.get()
    if ticket is not None:
        if ticket.refused is not None:
            raise pool.turned_away(ticket.refused)
        timeout -= ticket.waited_s
        if timeout <= 0:
            raise _out_of_time(pool)
    return timeout


def out_of_time() -> PoolTimeout:
    """The pool's 503 for a request whose wait for a connection ran out before it reached the
    pool (at the app's door, or waiting for a shared lookup's turn)."""
    return _out_of_time(current_pool())


def _out_of_time(pool: Pool) -> PoolTimeout:
    return pool.turned_away(f"no database connection became free within {pool.timeout:g} s")


def _route() -> str:
    if not has_request_context():
        return ""
    rule = request.url_rule
    return f"{request.method} {rule.rule if rule is not None else request.path}"

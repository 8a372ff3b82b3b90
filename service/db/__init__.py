"""The one way from request handlers to the database: `get_db()`.

Each gunicorn worker opens its own pool after fork (`open_pool`, from the `post_worker_init`
hook) and closes it when it exits (`close_pool`, from `worker_exit`). The pool hangs on the
app, so a test can build an app and a pool of its own.

This package knows nothing of HTTP: what its exceptions become is service/api/errors.py's
business.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

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
from service.db.replicas import (
    ON_PRIMARY,
    POSITION_SQL,
    ReadCursor,
    ReplicaEvents,
    ReplicaSet,
)
from service.db.tracing import traced_pool_args

__all__ = [
    "CLIENT_GONE",
    "EVENTS",
    "ON_PRIMARY",
    "READ_POSITION",
    "REPLICAS",
    "SEEN_POSITION",
    "TRACING",
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
    "current_replicas",
    "fetch_with_position",
    "get_db",
    "open_pool",
    "request_position",
    "seen",
    "with_position",
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
# Where an app says (True) that its pools trace their statements and waits
# (service/db/tracing.py); otherwise they are not traced.
TRACING = "service.db.tracing"
# Where an app keeps this worker's `ReplicaSet`, when DATABASE_REPLICA_URLS names replicas.
REPLICAS = "service.db.replicas"
# Where an app keeps a callable giving the WAL position the current request's reads must see
# (ON_PRIMARY: on the primary), and one told every position a block wrote or could have seen.
READ_POSITION = "service.db.read_position"
SEEN_POSITION = "service.db.seen_position"


def open_pool(app: Flask) -> Pool:
    """Create this worker's pool from the app's settings, keep it on the app, and warm it up
    (best effort: a server that is down is logged, and requests connect later)."""
    settings = app.config["SETTINGS"]
    pool = _pool(app, settings.database_url)
    app.extensions[EXTENSION] = pool
    pool.warm()
    if settings.database_replica_urls:
        replicas = ReplicaSet(
            pool,
            list(settings.database_replica_urls),
            make_pool=lambda url: _pool(app, url, replica=True),
            poll_interval_s=settings.replica_poll_interval_s,
            max_lag_s=settings.replica_max_lag_s,
            catch_up_s=settings.replica_catch_up_s,
            connect_timeout=settings.db_connect_timeout,
            events=app.extensions.get(EVENTS),
        )
        app.extensions[REPLICAS] = replicas
        replicas.start()
    return pool


def _pool(app: Flask, dsn: str, replica: bool = False) -> Pool:
    settings = app.config["SETTINGS"]
    events: PoolEvents | None = None if replica else app.extensions.get(EVENTS)
    traced = traced_pool_args(events) if app.extensions.get(TRACING) else {"events": events}
    return Pool(
        dsn,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        timeout=settings.db_pool_timeout,
        statement_timeout_ms=settings.db_statement_timeout_ms,
        connect_timeout=settings.db_connect_timeout,
        max_lifetime=settings.db_pool_max_lifetime,
        max_waiting=settings.db_pool_max_waiting,
        leak_warn_s=settings.db_pool_leak_warn_s,
        waiting_elsewhere=None if replica else app.extensions.get(WAITING_ELSEWHERE),
        client_gone=app.extensions.get(CLIENT_GONE),
        application_name="service-replica" if replica else "service",
        **traced,
    )


def close_pool(app: Flask) -> None:
    """Close the app's pool, if it has one (see `Pool.close` for lent connections)."""
    replicas = app.extensions.pop(REPLICAS, None)
    if replicas is not None:
        replicas.close()
    pool = app.extensions.pop(EXTENSION, None)
    if pool is not None:
        pool.close()


def current_pool() -> Pool:
    """The pool of the app in context; RuntimeError when none was opened."""
    try:
        return current_app.extensions[EXTENSION]
    except KeyError:
        raise RuntimeError("no pool is open for this app: call service.db.open_pool(app)") from None


def current_replicas() -> ReplicaSet | None:
    """The `ReplicaSet` of the app in context, or None when no replica is configured."""
    return current_app.extensions.get(REPLICAS)


def get_db(
    timeout: float | None = None,
    *,
    autocommit: bool = False,
    read_only: bool = False,
    at_least: Callable[[], int] | None = None,
) -> AbstractContextManager[Cursor]:
    """A cursor inside one transaction: commit on a clean exit, roll back on an exception,
    whatever the block wrote through and however (see `Pool.connection`).

    Waits for a free connection up to DB_POOL_TIMEOUT (or `timeout`), then raises
    `PoolTimeout`; raises `ClientGone`, having sent nothing, when the request's client hung up
    before the connection was lent.

    `autocommit=True` makes every statement its own transaction: use it for a block that runs a
    single statement (it saves the BEGIN and COMMIT round trips), or one that cannot run in a
    transaction block, never for statements that must stand or fall together.

    `read_only=True` is for a block that only reads; its statements run as with
    `autocommit=True`, each its own transaction. With no replica configured it runs on the
    primary and that is all. With replicas (DATABASE_REPLICA_URLS), it runs on a replica in
    rotation that has replayed the position the read must see, else on the primary
    (service/db/replicas.py); a write fails there (SQLSTATE 25006), and is not stopped on the
    primary. That position is `at_least()`, asked again just before the first statement, or
    else the request's (`app.extensions[READ_POSITION]`), or else 0. A first statement that
    fails on a replica with the connection or in a conflict with recovery runs once more
    elsewhere (`ReadCursor`): the block never sees that.

    With replicas, every block ends by reading the position it wrote (on the primary) or could
    have seen, one round trip more, into the cursor's `position`, and tells it to
    `app.extensions[SEEN_POSITION]`: that is how a client's next read sees at least as much. A
    read-only block saves that round trip when its last statement selects `with_position()`
    and reads its rows with `fetch_with_position()`.
    """
    replicas = current_replicas()
    if replicas is None:
        return current_pool().connection(timeout, autocommit or read_only)
    if read_only:
        return _read(replicas, timeout, at_least or request_position)
    return _write(replicas, timeout, autocommit)


@contextmanager
def _read(
    replicas: ReplicaSet, timeout: float | None, at_least: Callable[[], int]
) -> Iterator[ReadCursor]:
    read = ReadCursor(replicas, timeout, at_least)
    try:
        yield read
    except BaseException:
        read.close(sys.exc_info()[1])
        raise
    read.close(None)
    seen(read.position)
    events: ReplicaEvents | None = current_app.extensions.get(EVENTS)
    if events is not None:
        events.read_on(read.server)


@contextmanager
def _write(replicas: ReplicaSet, timeout: float | None, autocommit: bool) -> Iterator[Cursor]:
    with replicas.primary.connection(timeout, autocommit, POSITION_SQL) as cursor:
        yield cursor
    seen(cursor.position)
    replicas.heard_primary(cursor.position)


def request_position() -> int:
    """The position the current request's reads must see (`READ_POSITION`), else 0."""
    position = current_app.extensions.get(READ_POSITION)
    return position() if position is not None else 0


# The column a read's position comes back in (`with_position`, `fetch_with_position`).
_POSITION_COLUMN = "read_position"


def with_position(db: Cursor, columns: str) -> str:
    """`columns` for a read's SELECT list, and, in a read-only block on replicas, the position
    the read could have seen as one column more: evaluated after the statement's snapshot
    (once, an uncorrelated subquery), it is never less than what the read saw. Read the rows
    with `fetch_with_position`."""
    if db.position_sql is None:
        return columns
    return f"{columns}, (SELECT ({db.position_sql})::text) AS {_POSITION_COLUMN}"


def fetch_with_position(db: Cursor) -> list[dict]:
    """The rows of a statement that selected `with_position()`, without that column, having set
    the cursor's `position` from it. With no row, the position is left to the end of the
    block, which reads it in a round trip of its own."""
    rows = db.fetchall()
    if rows and _POSITION_COLUMN in rows[0]:
        db.took_position(rows[0][_POSITION_COLUMN])
        for row in rows:
            del row[_POSITION_COLUMN]
    return rows


def seen(position: int | None) -> None:
    """Tell the current request that it wrote or could have seen `position` (`SEEN_POSITION`)."""
    hook = current_app.extensions.get(SEEN_POSITION)
    if hook is not None and position is not None:
        hook(position)

"""The worker's connection pool: psycopg2's ThreadedConnectionPool with a fair, bounded wait.

psycopg2's pool alone is wrong for a gevent worker in two ways, and this module fixes both:

* When every connection is busy, `getconn()` raises `PoolError` at once. Here a greenlet that
  finds no free connection joins a first-come-first-served queue and waits up to the pool
  timeout, then gets `PoolTimeout`. A freed slot is handed straight to the oldest waiter, so a
  newcomer can never overtake the queue.
* `putconn()` closes a returned connection whenever the pool already holds `minconn` idle ones,
  so with `minconn < maxconn` a busy worker reconnects on most requests. Here every connection
  is kept until it breaks or outlives `max_lifetime`.

It knows nothing of Flask or HTTP; the HTTP layer maps its three exceptions to responses. It is
greenlet-safe, not thread-safe: the worker's greenlets share one OS thread and switch only at
blocking calls, which is what keeps the slot bookkeeping below free of locks.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from gevent.event import Event
from psycopg2.extras import RealDictCursor
from psycopg2.pool import ThreadedConnectionPool

log = logging.getLogger(__name__)

_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
# A replaced connection lives between 90% and 100% of max_lifetime, so that connections opened
# together (at start, after an outage) are not all replaced in the same second.
LIFETIME_JITTER = 0.1


class PoolTimeout(Exception):
    """No connection became free within the pool timeout."""


class DatabaseUnavailable(Exception):
    """The server cannot be reached, or the connection broke while in use."""


class StatementTimeout(Exception):
    """A statement ran longer than the statement timeout and was cancelled by the server."""


class PooledConnection(psycopg2.extensions.connection):
    """A psycopg2 connection that knows when it must be replaced.

    Autocommit is on so that psycopg2 sends no `BEGIN` of its own: `Pool.connection()` sends
    `BEGIN` together with the first statement, in one round trip.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.autocommit = True
        self.expires_at: float | None = None  # set when the pool first hands it out


class Cursor(RealDictCursor):
    """Rows as dicts. The first `execute()` carries `preamble` in the same round trip."""

    preamble = ""

    def execute(self, query, vars=None):
        if not self.preamble:
            return super().execute(query, vars)
        if not isinstance(query, str):
            query = query.as_string(self)
        try:
            return super().execute(self.preamble + query, vars)
        finally:
            # Sent only once the server has seen it: a query that failed to format (bad
            # parameters) sent nothing, and the next one must still begin the transaction.
            if self.connection.info.transaction_status != _IDLE:
                self.preamble = ""


class Pool:
    """Up to `max_size` connections to one database, shared by one worker's greenlets.

    `connection()` is the only way in. `timeout` bounds the wait for a free connection,
    `connect_timeout` the opening of a new one, `statement_timeout_ms` every statement.
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int,
        max_size: int,
        timeout: float,
        statement_timeout_ms: int,
        connect_timeout: int,
        max_lifetime: float,
        application_name: str = "service",
    ):
        self.max_size = max_size
        self._min_size = min_size
        self._timeout = timeout
        self._max_lifetime = max_lifetime
        # SET LOCAL, not a session setting or a startup option: it ends with the transaction,
        # so it also holds behind PgBouncer in transaction mode.
        self._preamble = f"BEGIN; SET LOCAL statement_timeout = {int(statement_timeout_ms)}; "
        self._connections = ThreadedConnectionPool(
            0,  # open nothing here: warm() does, best effort, once the worker runs
            max_size,
            dsn,
            connection_factory=PooledConnection,
            cursor_factory=Cursor,
            connect_timeout=connect_timeout,
            application_name=application_name,
            # Let the kernel find a dead server (or let the server find a dead worker) in
            # about a minute instead of the system default of two hours.
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        # psycopg2 keeps a returned connection only while fewer than `minconn` are idle.
        self._connections.minconn = max_size
        self._free = max_size  # slots held by no greenlet
        self._waiters: deque[Event] = deque()
        self._open = 0
        self._in_use = 0
        self._closed = False

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Cursor]:
        """Lend a cursor inside one transaction; commit on a clean exit, roll back otherwise.

        Waits up to `timeout` (default: the pool's) for a free connection, then raises
        `PoolTimeout`. Raises `DatabaseUnavailable` when no connection can be opened or the
        connection breaks, and `StatementTimeout` when the server cancels a statement.
        The connection always goes back; a broken one is closed and never lent again.
        """
        conn = self._checkout(self._timeout if timeout is None else timeout)
        try:
            with _translated_errors():
                cursor = conn.cursor()
                cursor.preamble = self._preamble
                yield cursor
                if not cursor.preamble:  # a transaction was begun
                    cursor.execute("COMMIT")
        finally:
            self._checkin(conn)

    def warm(self) -> None:
        """Open `min_size` connections now, so the first requests do not pay for connecting.

        Best effort: a server that is down is logged, not raised; requests connect later.
        """
        lent = []
        try:
            for _ in range(self._min_size):
                lent.append(self._checkout(self._timeout))
        except (PoolTimeout, DatabaseUnavailable) as exc:
            log.warning("could not open the pool's first connections: %s", exc)
        finally:
            for conn in lent:
                self._checkin(conn)

    def stats(self) -> dict[str, int]:
        """What the pool holds now: open connections, lent, idle, greenlets waiting."""
        return {
            "max": self.max_size,
            "size": self._open,
            "in_use": self._in_use,
            "idle": self._open - self._in_use,
            "waiting": len(self._waiters),
        }

    def close(self) -> None:
        """Close every connection, lent ones included; waiters and later callers get
        `DatabaseUnavailable`. Called when the worker exits, after in-flight requests end."""
        self._closed = True
        while self._waiters:
            self._waiters.popleft().set()
        if not self._connections.closed:
            self._connections.closeall()
        self._open = 0

    def _checkout(self, timeout: float) -> PooledConnection:
        self._acquire_slot(timeout)
        try:
            if self._closed:
                raise DatabaseUnavailable("the connection pool is closed")
            conn = self._take()
        except BaseException:
            self._release_slot()
            raise
        self._in_use += 1
        return conn

    def _take(self) -> PooledConnection:
        """An open connection within its lifetime; expired or closed idle ones are dropped."""
        while True:
            try:
                conn = self._connections.getconn()
            except psycopg2.OperationalError as exc:
                raise DatabaseUnavailable(f"cannot connect: {exc}".strip()) from exc
            now = time.monotonic()
            if conn.expires_at is None:
                self._open += 1
                conn.expires_at = now + self._max_lifetime * (1 - LIFETIME_JITTER * random.random())
                return conn
            if conn.closed or now >= conn.expires_at:
                self._discard(conn)
                continue
            return conn

    def _checkin(self, conn: PooledConnection) -> None:
        try:
            if self._closed:
                conn.close()
            elif _reusable(conn):
                self._connections.putconn(conn)
            else:
                self._discard(conn)
        finally:
            self._in_use -= 1
            self._release_slot()

    def _discard(self, conn: PooledConnection) -> None:
        self._connections.putconn(conn, close=True)
        self._open -= 1

    def _acquire_slot(self, timeout: float) -> None:
        # Critical section without a lock: no greenlet switch can happen between the test and
        # the decrement. Waiters present means the free slot is already promised to them.
        if self._free and not self._waiters:
            self._free -= 1
            return
        waiter = Event()
        self._waiters.append(waiter)
        try:
            waiter.wait(timeout)
        except BaseException:  # killed while waiting: give back a slot handed over meanwhile
            if waiter.is_set():
                self._release_slot()
            else:
                self._waiters.remove(waiter)
            raise
        if not waiter.is_set():
            self._waiters.remove(waiter)
            raise PoolTimeout(f"no database connection became free within {timeout:g} s")

    def _release_slot(self) -> None:
        # Hand the slot to the oldest waiter directly, so that no newcomer can take it first.
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self._free += 1


def _reusable(conn: PooledConnection) -> bool:
    """Open and idle, after rolling back what the block left open; anything else is broken."""
    if conn.closed:
        return False
    if conn.info.transaction_status != _IDLE:
        try:
            with conn.cursor() as cursor:
                cursor.execute("ROLLBACK")
        except psycopg2.Error:
            return False
    return conn.info.transaction_status == _IDLE


@contextmanager
def _translated_errors() -> Iterator[None]:
    try:
        yield
    except psycopg2.errors.QueryCanceled as exc:
        raise StatementTimeout("the statement timeout cancelled a query") from exc
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        raise DatabaseUnavailable(f"the database connection failed: {exc}".strip()) from exc

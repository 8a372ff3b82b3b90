"""The worker's connection pool: psycopg2's ThreadedConnectionPool, subclassed as its module
intends (`_connect`, `_getconn`, `_putconn`), with a fair, bounded wait and exact counts.

psycopg2's pool alone is wrong for a gevent worker in three ways, and the subclass fixes each:

* When every connection is lent, `getconn()` raises `PoolError` at once. Here a greenlet takes
  a permit of a `FairSemaphore` first (one per connection lent or being opened): one that finds
  none free queues, first come first served, up to the pool timeout, then gets `PoolTimeout`.
* It opens connections, and rolls back returned ones, while it holds its lock (a gevent lock
  once patched), so every checkout and return would wait behind one slow connect. Here its
  lock guards the bookkeeping alone; connects, pings and rollbacks run outside it.
* `putconn()` closes a returned connection whenever `minconn` are already idle. Here every
  connection is kept until it breaks or outlives `max_lifetime`.

The counts are never kept apart from the connections: `stats()` reads them from the base
class's own idle list and lent map. A holder killed at any point (`GreenletExit`, a
`gevent.Timeout`: while it waits, connects, pings, queries, rolls back or returns) leaves a
connection either idle and usable, or closed and gone from both: psycopg2 closes a connection
whose green wait was interrupted, and every step that may be interrupted hands the connection
back in a `finally`.

It knows nothing of Flask or HTTP. Greenlet-safe: the greenlets of a worker share one thread.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import gevent
import psycopg2
import psycopg2.extensions
from gevent.monkey import get_original
from psycopg2.extras import RealDictCursor
from psycopg2.pool import ThreadedConnectionPool

from service.db.errors import (
    ClientGone,
    DatabaseUnavailable,
    PoolTimeout,
    TransactionAborted,
    connection_lost,
    translate,
)
from service.db.lsn import parse_lsn
from service.db.semaphore import FairSemaphore

log = logging.getLogger(__name__)

_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_INERROR = psycopg2.extensions.TRANSACTION_STATUS_INERROR
# A replaced connection lives between 90% and 100% of max_lifetime, so that connections opened
# together (at start, after an outage) are not all replaced in the same second.
LIFETIME_JITTER = 0.1
# A connection idle this long is pinged before it is lent: only a round trip can tell that a
# silent network path (no FIN, no RST) has died.
PING_AFTER_IDLE_S = 10.0
# After a failed connect, new connects wait 0.05 s, 0.1 s, ... up to 1 s (with jitter), so that
# thousands of waiting greenlets do not hammer a server that is down, and a server that comes
# back is used again within about a second.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0
# The server cancels a statement at the statement timeout; the client gives up on an answer
# this much later, when the network itself has gone silent.
DEADLINE_GRACE_S = 1.0

# The real poll(2), not gevent's: a zero-timeout readiness check must not switch greenlets.
_poll = get_original("select", "poll")
_POLLIN = get_original("select", "POLLIN")


@contextmanager
def deadline(seconds: float | None, on_expiry: Callable[[], Exception]) -> Iterator[None]:
    """Bound a block that waits on the network; raise `on_expiry()` when `seconds` pass.

    Only its own timer is turned into that error: a caller's `gevent.Timeout` around the
    block passes through untouched.
    """
    timer = gevent.Timeout(seconds)
    timer.start()
    try:
        yield
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise on_expiry() from None
    finally:
        timer.close()


def connect(dsn: str, connect_timeout: float, **kwargs) -> psycopg2.extensions.connection:
    """`psycopg2.connect()` that honours `connect_timeout` once psycogreen made it green.

    libpq ignores connect_timeout in the non-blocking connect that psycogreen drives, so an
    address that accepts and never answers would hold the caller for ever; here it raises
    `psycopg2.OperationalError` like any failed connect.
    """
    with deadline(
        connect_timeout,
        lambda: psycopg2.OperationalError(f"no connection within {connect_timeout:g} s"),
    ):
        return psycopg2.connect(dsn, connect_timeout=max(1, int(connect_timeout)), **kwargs)


class PoolEvents(Protocol):
    """What a pool reports as it works, for metrics. Called inline, in the greenlet doing the
    work: every method must be quick and must not raise."""

    def checked_out(self, wait_s: float) -> None:
        """A connection was lent after `wait_s` seconds (permit wait plus any connect or ping)."""

    def timed_out(self, wait_s: float) -> None:
        """A caller got `PoolTimeout` after waiting `wait_s` seconds (0 when turned away)."""

    def discarded(self) -> None:
        """A broken, dead or expired connection was closed."""

    def connect_failed(self) -> None:
        """Opening a new connection failed."""

    def changed(self, stats: dict[str, int]) -> None:
        """`Pool.stats()` may have changed (a lend, a return, a waiter joining, the close)."""


class PooledConnection(psycopg2.extensions.connection):
    """A psycopg2 connection that knows its lifetime and the deadline of its statements."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.expires_at = 0.0
        self.idle_since = 0.0
        # Whether the session began with the statement timeout (`Pool._connect`); if not, each
        # transaction sets it with SET LOCAL.
        self.timeout_set = False
        self.deadline_s: float | None = None  # see Cursor


class Cursor(RealDictCursor):
    """Rows as dicts. A statement that gets no answer within its connection's `deadline_s` (a
    network path that died silently: the server's statement timeout cannot help when its answer
    never arrives) closes the connection and raises `DatabaseUnavailable` instead of waiting for
    TCP keepalives.

    `position` is the WAL position read at the end of a block that asked for one
    (`Pool.connection`'s `position_sql`), as an int; None before then. `position_sql` is None
    here: a plain block has no position to read in its own statements (`ReadCursor`'s has)."""

    position: int | None = None
    position_sql: str | None = None

    def execute(self, query, vars=None):
        with deadline(self.connection.deadline_s, self._give_up):
            return super().execute(query, vars)

    def executemany(self, query, vars_list):
        with deadline(self.connection.deadline_s, self._give_up):
            return super().executemany(query, vars_list)

    def callproc(self, procname, vars=None):
        with deadline(self.connection.deadline_s, self._give_up):
            return super().callproc(procname, vars)

    def _give_up(self) -> DatabaseUnavailable:
        self.connection.close()  # its state is unknown: it must never be lent again
        deadline_s = self.connection.deadline_s
        return DatabaseUnavailable(f"no answer from the database within {deadline_s:g} s")


class Pool(ThreadedConnectionPool):
    """Up to `max_size` connections to one database, shared by one worker's greenlets.

    `connection()` is the way in. `timeout` bounds the wait for a free connection,
    `connect_timeout` the opening of a new one, `statement_timeout_ms` every statement.
    `events`, when given, hears what the pool does (`PoolEvents`). `waiting_elsewhere`, when
    given, counts callers that wait for a connection outside the pool (lookups in a batch,
    service/db/batch.py), for the `max_waiting` cap. `client_gone`, when given, says whether the
    calling greenlet's client has hung up: `connection()` asks it once it holds a connection.
    `cursor_factory` makes its cursors: `Cursor` or a subclass.
    Nothing is opened here: `warm()` opens `min_size` connections, best effort.
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
        max_waiting: int = 0,
        leak_warn_s: float = 30.0,
        ping_after_idle_s: float = PING_AFTER_IDLE_S,
        application_name: str = "service",
        events: PoolEvents | None = None,
        waiting_elsewhere: Callable[[], int] | None = None,
        client_gone: Callable[[], bool] | None = None,
        cursor_factory: type[Cursor] = Cursor,
    ):
        super().__init__(
            0,  # psycopg2 would open minconn connections here, failing when the server is down
            max_size,
            dsn,
            connection_factory=PooledConnection,
            cursor_factory=cursor_factory,
            application_name=application_name,
            # Let the kernel find a dead server (or let the server find a dead worker) in
            # about a minute instead of the system default of two hours.
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        self.dsn = dsn
        self.max_size = max_size
        self._min_size = min_size
        self._timeout = timeout
        self._max_lifetime = max_lifetime
        self._max_waiting = max_waiting
        self._leak_warn_s = leak_warn_s
        self._ping_after_idle_s = ping_after_idle_s
        self._connect_timeout = float(connect_timeout)
        self._statement_timeout_ms = int(statement_timeout_ms)
        # The statement timeout, set once per connection as a startup option where the server
        # takes it, else with SET LOCAL in each transaction: see `_connect`.
        self._timeout_option = _joined_options(
            psycopg2.extensions.parse_dsn(dsn).get("options") or os.environ.get("PGOPTIONS"),
            f"-c statement_timeout={self._statement_timeout_ms}",
        )
        self._options_refused = False  # a PgBouncer said "unsupported startup parameter"
        self._fallback_logged = False
        self._deadline_s = self._statement_timeout_ms / 1000 + DEADLINE_GRACE_S
        self._permits = FairSemaphore(max_size)
        self._connect_failures = 0
        self._next_connect_at = 0.0
        self._probing = False
        self._events = events
        self._waiting_elsewhere = waiting_elsewhere
        self._client_gone = client_gone
        self._changed()

    @contextmanager
    def connection(
        self,
        timeout: float | None = None,
        autocommit: bool = False,
        position_sql: str = "",
        ask_client: bool = True,
    ) -> Iterator[Cursor]:
        """Lend a cursor inside one transaction: commit on a clean exit, roll back otherwise.

        Every way of writing through the connection is in the transaction: `execute`,
        `executemany`, `callproc`, another cursor from `cursor.connection`; a query as text,
        bytes or `psycopg2.sql`. (`copy_*` cannot run under psycogreen's wait callback:
        psycopg2 raises ProgrammingError before sending anything.) The block
        may call `commit()` or `rollback()` on the connection as psycopg2 documents: what
        follows is a new transaction, committed or rolled back at the end as above. A block
        that catches a database error and ends cleanly gets `TransactionAborted`: PostgreSQL
        aborted the transaction, and nothing of it is committed.

        With `autocommit`, each statement is a transaction of its own and nothing is rolled
        back: for a block of one statement, or of statements that cannot run in a transaction
        (VACUUM, CREATE INDEX CONCURRENTLY).

        Waits up to `timeout` (default: the pool's) for a free connection, then raises
        `PoolTimeout`; raises it at once when `max_waiting` greenlets already wait. Raises
        `ClientGone`, before anything is sent, when the caller's client hung up meanwhile (the
        pool's `client_gone`); not with `ask_client` False, for a block that carries on work
        already begun for its client (a read run again on another server). Raises
        `DatabaseUnavailable` when no connection can be opened (at once while connects back off
        after a failure) or the connection breaks, `StatementTimeout` when the server cancels a
        statement, `TransactionConflict` on a serialization failure, deadlock or lock timeout
        (service/db/errors.py); any other psycopg2 error as it is. The connection always comes
        back, rolled back; a broken one is closed and never lent again. Held longer than
        `leak_warn_s`, it is logged once with the stack of the greenlet that holds it.

        With `position_sql` (an SQL expression of type pg_lsn), once the block ended cleanly and
        its transaction committed, the same connection reads that expression, in a round trip
        of its own, into the cursor's `position`: what the block wrote or could have seen;
        unless the block set `position` itself (`service.db.with_position`).
        """
        conn = self._checkout(self._timeout if timeout is None else timeout)
        watchdog = gevent.get_hub().loop.timer(self._leak_warn_s)
        # Run in the holder's context, so that the warning's log line carries its request id.
        watchdog.start(
            contextvars.copy_context().run, _warn_leak, gevent.getcurrent(), self._leak_warn_s
        )
        try:
            if ask_client and self._client_gone is not None and self._client_gone():
                raise ClientGone("the client hung up while its request waited")
            with _translated_errors(conn):
                conn.autocommit = autocommit  # the connection is idle: no round trip
                cursor = conn.cursor()
                if not autocommit and not conn.timeout_set:
                    cursor.execute(
                        "SET LOCAL statement_timeout = %s", (self._statement_timeout_ms,)
                    )
                yield cursor
                if not autocommit:
                    _commit(conn)
                if position_sql and cursor.position is None:
                    conn.autocommit = True  # idle now: no round trip, and no BEGIN for this
                    cursor.execute(f"SELECT ({position_sql})::text AS position")
                    cursor.position = parse_lsn(cursor.fetchone()["position"])
        finally:
            watchdog.close()
            self._checkin(conn)

    def warm(self) -> None:
        """Open `min_size` connections now, so the first requests do not pay for connecting.

        Best effort: a server that is down is logged, not raised; requests connect later.
        """
        lent = []
        try:
            for _ in range(self._min_size):  # not a request: lent without reporting it
                lent.append(self._lend(self._timeout))
        except (PoolTimeout, DatabaseUnavailable) as exc:
            log.warning("could not open the pool's first connections: %s", exc)
        finally:
            for conn in lent:
                self._checkin(conn)

    @property
    def timeout(self) -> float:
        """How long `connection()` waits for a free connection by default."""
        return self._timeout

    @property
    def connect_timeout(self) -> float:
        """How long opening a connection may take (DB_CONNECT_TIMEOUT)."""
        return self._connect_timeout

    @property
    def statement_deadline_s(self) -> float:
        """How long a statement may go unanswered before its connection is given up: the
        statement timeout and DEADLINE_GRACE_S."""
        return self._deadline_s

    @property
    def waiting(self) -> int:
        """Greenlets waiting for a free connection now."""
        return self._permits.waiting

    def stats(self) -> dict[str, int]:
        """What the pool holds now: open connections, lent, idle, greenlets waiting. Read from
        psycopg2's own lists, so they count exactly the connections open at the server."""
        in_use, idle = len(self._used), len(self._pool)
        return {
            "max": self.max_size,
            "size": in_use + idle,
            "in_use": in_use,
            "idle": idle,
            "waiting": self._permits.waiting,
        }

    def close(self) -> None:
        """Close the idle connections; waiters and later callers get `DatabaseUnavailable`, and
        a lent connection is closed when it comes back. Called when the worker exits.

        A lent connection is left to its holder: closing it while its greenlet waits for a
        query's answer would block the whole worker (psycopg2 holds the connection's lock across
        the green wait), and a worker that exits before it comes back closes its socket anyway.
        """
        with self._lock:  # the bookkeeping: no I/O inside
            self.closed = True
            idle, self._pool = self._pool, []
        for conn in idle:
            conn.close()
        self._permits.wake_all()
        self._changed()

    # psycopg2's subclassing surface. Each runs under `self._lock` when called through
    # getconn()/putconn(), or takes it itself, and does no I/O while it holds it.

    def _getconn(self, key=None) -> PooledConnection | None:
        """An idle connection, now lent; None when none is idle (the caller then opens one
        with `_connect`, outside the lock: psycopg2's would connect while holding it)."""
        if not self._pool:
            return None
        return super()._getconn(key)

    def _connect(self, key=None) -> PooledConnection:
        """Open a connection (outside the lock) and lend it under `key`, or keep it idle when
        `key` is None. Raises `DatabaseUnavailable`, paced by the backoff after a failure."""
        conn = self._open_connection()
        with self._lock:  # the bookkeeping: no I/O inside
            if self.closed:
                conn.close()
                raise DatabaseUnavailable("the connection pool is closed")
            if key is None:
                self._pool.append(conn)
            else:
                self._used[key] = conn
                self._rused[id(conn)] = key
        return conn

    def _putconn(self, conn, key=None, close=False) -> None:
        """Take a lent connection back: idle again if it is open, idle in no transaction and
        the pool is open; else closed and forgotten. Never raises for a closed pool."""
        key = self._rused.pop(id(conn))
        del self._used[key]
        if close or self.closed or conn.closed or conn.info.transaction_status != _IDLE:
            conn.close()
            if not self.closed and self._events is not None:
                self._events.discarded()
        else:
            conn.idle_since = time.monotonic()
            self._pool.append(conn)

    # Lending and taking back.

    def _checkout(self, timeout: float) -> PooledConnection:
        started = time.monotonic()
        try:
            conn = self._lend(timeout)
        except BaseException as exc:
            self._changed()
            if isinstance(exc, PoolTimeout) and self._events is not None:
                self._events.timed_out(time.monotonic() - started)
            raise
        self._changed()
        if self._events is not None:
            self._events.checked_out(time.monotonic() - started)
        return conn

    def _lend(self, timeout: float) -> PooledConnection:
        """A live connection within its lifetime, lent; the caller must `_checkin` it."""
        self._acquire_permit(timeout)
        try:
            while True:
                if self.closed:  # checked again after each ping, which may outlast the close
                    raise DatabaseUnavailable("the connection pool is closed")
                conn = self.getconn()
                if conn is None:  # nothing idle: open one, lent at once
                    with self._lock:
                        key = self._getkey()
                    conn = self._connect(key)
                    conn.deadline_s = self._deadline_s
                    return conn
                try:
                    usable = self._usable(conn)
                except BaseException:  # killed mid-ping: psycopg2 closed it
                    self.putconn(conn, close=True)
                    raise
                if usable:
                    return conn
                self.putconn(conn, close=True)
        except BaseException:
            self._permits.release()
            raise

    def _checkin(self, conn: PooledConnection) -> None:
        """Roll back what the block left open (outside the lock), then hand the connection to
        `putconn`; a kill during the rollback, which closes it, still hands it back."""
        try:
            if not conn.closed and conn.info.transaction_status != _IDLE:
                try:
                    conn.rollback()
                except psycopg2.Error:
                    conn.close()
            if not conn.closed:
                conn.autocommit = True  # idle in autocommit: a ping begins no transaction
        finally:
            self.putconn(conn)
            self._permits.release()
            self._changed()

    def _usable(self, conn: PooledConnection) -> bool:
        """Whether an idle connection is within its lifetime and still has a server behind it.

        A backend that was terminated or shut down has sent its last message and closed the
        socket: an idle connection with anything to read is dead (one poll, no round trip).
        Only a connection idle for `ping_after_idle_s` pays for a `SELECT 1`.
        """
        now = time.monotonic()
        if conn.closed or now >= conn.expires_at:
            return False
        poller = _poll()
        poller.register(conn.fileno(), _POLLIN)
        if poller.poll(0):
            return False
        if now - conn.idle_since < self._ping_after_idle_s:
            return True
        try:
            with (
                deadline(self._connect_timeout, _NoAnswer),
                conn.cursor(cursor_factory=psycopg2.extensions.cursor) as cursor,
            ):
                cursor.execute("SELECT 1")
        except (psycopg2.Error, _NoAnswer):
            return False
        return True

    def waiting_cap_reached(self) -> str | None:
        """Why one more caller may not wait for a connection (`max_waiting` already wait, in
        the pool or elsewhere), or None when it may."""
        if not self._max_waiting:
            return None
        waiting = self._permits.waiting
        if self._waiting_elsewhere is not None:
            waiting += self._waiting_elsewhere()
        if waiting < self._max_waiting:
            return None
        return f"{waiting} requests already wait for a connection"

    def turned_away(self, reason: str) -> PoolTimeout:
        """The `PoolTimeout` for a caller that got no connection before it reached the pool (a
        lookup whose batch got no turn in time, or past the waiting cap), counted as the pool
        counts its own."""
        if self._events is not None:
            self._events.timed_out(0.0)
        return PoolTimeout(reason)

    def _acquire_permit(self, timeout: float) -> None:
        if self._permits.try_acquire():
            return
        refused = self.waiting_cap_reached()
        if refused is not None:
            raise PoolTimeout(refused)
        if not self._permits.acquire(timeout, joined=self._changed):
            raise PoolTimeout(f"no database connection became free within {timeout:g} s")

    # Opening connections.

    def _open_connection(self) -> PooledConnection:
        """A new connection, or `DatabaseUnavailable`; paced by the backoff after a failure,
        when one greenlet at a time probes the server and the rest fail at once."""
        wait = self._next_connect_at - time.monotonic()
        if wait > 0:
            raise DatabaseUnavailable(f"the database is unreachable; next connect in {wait:.2f} s")
        if self._probing:
            raise DatabaseUnavailable("the database is unreachable; another request is retrying")
        probing = self._connect_failures > 0
        self._probing = probing
        try:
            conn = self._connect_with_timeout()
        except psycopg2.OperationalError as exc:
            self._connect_failed()
            raise DatabaseUnavailable(f"cannot connect: {exc}".strip()) from exc
        finally:
            if probing:
                self._probing = False
        self._connect_failures = 0
        conn.expires_at = time.monotonic() + self._max_lifetime * (
            1 - LIFETIME_JITTER * random.random()
        )
        return conn

    def _connect_with_timeout(self) -> PooledConnection:
        """A new connection that knows whether its statements get the statement timeout.

        Sent as a startup option, the timeout is set once, when the server starts the session,
        and statements go as they are. PgBouncer keeps one server session for many clients, so
        it never passes the option on: Debian 12's (1.18) refuses it ("unsupported startup
        parameter"), and with `ignore_startup_parameters` one drops it in silence. The server is
        therefore asked what the timeout is; where it is not ours (unless a role or database
        setting already gives the same value: docs/scaling.md), each transaction sets it with
        SET LOCAL, and autocommit statements run under the server's own setting.
        """
        if not self._options_refused:
            try:
                conn = connect(
                    *self._args,
                    self._connect_timeout,
                    options=self._timeout_option,
                    **self._kwargs,
                )
            except psycopg2.OperationalError as exc:
                if "unsupported startup parameter" not in str(exc):
                    raise
                self._options_refused = True
                log.info("statement timeout: the server refused it at connect (%s)", exc)
            else:
                conn.timeout_set = self._has_statement_timeout(conn)
                return conn
        conn = connect(*self._args, self._connect_timeout, **self._kwargs)
        conn.timeout_set = self._has_statement_timeout(conn)
        return conn

    def _has_statement_timeout(self, conn: PooledConnection) -> bool:
        conn.autocommit = True  # idle connections are: see `_checkin`
        try:
            with (
                deadline(self._connect_timeout, _NoAnswer),
                conn.cursor(cursor_factory=psycopg2.extensions.cursor) as cursor,
            ):
                cursor.execute("SELECT current_setting('statement_timeout', true)")
                (setting,) = cursor.fetchone()
        except _NoAnswer:
            conn.close()
            raise psycopg2.OperationalError(
                f"no answer within {self._connect_timeout:g} s after connecting"
            ) from None
        except psycopg2.Error as exc:
            conn.close()
            raise psycopg2.OperationalError(f"cannot read statement_timeout: {exc}") from exc
        took = _milliseconds(setting) == self._statement_timeout_ms
        if not took and not self._fallback_logged:
            self._fallback_logged = True
            log.warning(
                "statement timeout: the server's is %s, not %d ms (PgBouncer?): transactions set "
                "it with SET LOCAL, and autocommit statements run under the server's own; set it "
                "for the role to bound them too (docs/scaling.md)",
                setting,
                self._statement_timeout_ms,
            )
        return took

    def _connect_failed(self) -> None:
        if self._events is not None:
            self._events.connect_failed()
        self._connect_failures += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(self._connect_failures - 1, 10))
        self._next_connect_at = time.monotonic() + delay * random.uniform(0.5, 1.0)

    def _changed(self) -> None:
        if self._events is not None:
            self._events.changed(self.stats())


def _commit(conn: PooledConnection) -> None:
    """Commit the block's transaction, or refuse to pretend: PostgreSQL answers COMMIT in an
    aborted transaction with ROLLBACK, and psycopg2 raises nothing for it."""
    status = conn.info.transaction_status
    if status == _INERROR:
        raise TransactionAborted(
            "a statement in this transaction failed and the block went on: nothing was committed"
        )
    if status != _IDLE:
        conn.commit()


@contextmanager
def _translated_errors(conn: PooledConnection) -> Iterator[None]:
    """psycopg2's errors as service/db/errors.py sorts them; a lost connection is closed."""
    try:
        yield
    except psycopg2.Error as exc:
        if connection_lost(exc) or isinstance(exc, psycopg2.InterfaceError):
            conn.close()
        ours = translate(exc)
        if ours is None:
            raise
        raise ours from exc


def _joined_options(*options: str | None) -> str:
    """libpq's `options`: the DSN's own (or PGOPTIONS) first, so that ours is added to them,
    not put in their place."""
    return " ".join(option for option in options if option)


def _milliseconds(setting: str | None) -> int | None:
    """A `statement_timeout` as the server shows it ("5s", "5000ms", "0") in milliseconds."""
    units = {"ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
    if not setting:
        return None
    for unit in sorted(units, key=len, reverse=True):
        number = setting[: -len(unit)]
        if setting.endswith(unit) and number.isdigit():
            return int(number) * units[unit]
    return int(setting) if setting.isdigit() else None


class _NoAnswer(Exception):
    """A ping got no answer in time."""


def _warn_leak(holder: gevent.Greenlet, held_s: float) -> None:
    frame = getattr(holder, "gr_frame", None)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else "(not available)\n"
    log.warning(
        "a database connection has been held for over %g s; the stack that holds it:\n%s",
        held_s,
        stack.rstrip("\n"),
    )

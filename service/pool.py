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
blocking calls, which is what keeps the slot bookkeeping (service/slots.py) free of locks.
(psycopg2's pool keeps its own lock; it is never held across a switch, since this pool opens
connections outside it.)
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import gevent
import psycopg2
import psycopg2.errors
import psycopg2.extensions
from gevent.monkey import get_original
from psycopg2.extras import RealDictCursor
from psycopg2.pool import ThreadedConnectionPool

from service.slots import Slots

log = logging.getLogger(__name__)

_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
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


class PoolTimeout(Exception):
    """No connection became free within the pool timeout."""


class DatabaseUnavailable(Exception):
    """The server cannot be reached, or the connection broke while in use."""


class StatementTimeout(Exception):
    """A statement ran longer than the statement timeout and was cancelled by the server."""


class PoolEvents(Protocol):
    """What a pool reports as it works, for metrics. Called inline, in the greenlet doing the
    work: every method must be quick and must not raise."""

    def checked_out(self, wait_s: float) -> None:
        """A connection was lent after `wait_s` seconds (slot wait plus any connect or ping)."""

    def timed_out(self, wait_s: float) -> None:
        """A request got `PoolTimeout` after waiting `wait_s` seconds (0 when turned away)."""

    def discarded(self) -> None:
        """A broken, dead or expired connection was closed."""

    def connect_failed(self) -> None:
        """Opening a new connection failed."""

    def changed(self, stats: dict[str, int]) -> None:
        """`Pool.stats()` may have changed (a lend, a return, a waiter joining, the close)."""


class PooledConnection(psycopg2.extensions.connection):
    """A psycopg2 connection that knows when it must be replaced.

    Autocommit is on so that psycopg2 sends no `BEGIN` of its own: `Pool.connection()` sends
    `BEGIN` together with the first statement, in one round trip.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.autocommit = True
        self.expires_at: float | None = None  # set when the pool first hands it out
        self.idle_since = 0.0
        # Whether the session began with the statement timeout (`Pool._connect`); if not,
        # every transaction sets it with SET LOCAL.
        self.timeout_set = False


class Cursor(RealDictCursor):
    """Rows as dicts. The first `execute()` carries `preamble` in the same round trip.

    With `deadline_s` set, a statement that gets no answer in that time (a network path that
    died silently: the server's statement timeout cannot help when its answer never arrives)
    closes the connection and raises `DatabaseUnavailable` instead of waiting for TCP
    keepalives.
    """

    preamble = ""
    deadline_s: float | None = None

    def execute(self, query, vars=None):
        if self.deadline_s is None:
            return self._execute(query, vars)
        with deadline(self.deadline_s, self._give_up):
            return self._execute(query, vars)

    def _give_up(self) -> DatabaseUnavailable:
        self.connection.close()  # its state is unknown: it must never be lent again
        return DatabaseUnavailable(f"no answer from the database within {self.deadline_s:g} s")

    def _execute(self, query, vars):
        if not self.preamble:
            return super().execute(query, vars)
        if not isinstance(query, str):
            query = query.as_string(self)
        try:
            return super().execute(self.preamble + query, vars)
        finally:
            # Sent only once the server has seen it: a query that failed to format (bad
            # parameters) sent nothing, and the next one must still begin the transaction.
            # An autocommit preamble ends its own transaction: it stays, for every statement.
            if self.connection.info.transaction_status != _IDLE:
                self.preamble = ""


class Pool:
    """Up to `max_size` connections to one database, shared by one worker's greenlets.

    `connection()` is the only way in. `timeout` bounds the wait for a free connection,
    `connect_timeout` the opening of a new one, `statement_timeout_ms` every statement.
    `events`, when given, hears what the pool does (`PoolEvents`); without it nothing is reported.
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
    ):
        self.max_size = max_size
        self._min_size = min_size
        self._timeout = timeout
        self._max_lifetime = max_lifetime
        self._max_waiting = max_waiting
        self._leak_warn_s = leak_warn_s
        self._ping_after_idle_s = ping_after_idle_s
        self._connect_timeout = float(connect_timeout)
        # The statement timeout, set once per connection where the server takes it as a startup
        # option, else with SET LOCAL in every transaction: see `_connect`.
        self._statement_timeout_ms = int(statement_timeout_ms)
        self._timeout_option = _joined_options(
            psycopg2.extensions.parse_dsn(dsn).get("options") or os.environ.get("PGOPTIONS"),
            f"-c statement_timeout={self._statement_timeout_ms}",
        )
        self._options_refused = False  # a PgBouncer said "unsupported startup parameter"
        self._fallback_logged = False
        set_local = f"SET LOCAL statement_timeout = {self._statement_timeout_ms}; "
        # Several statements in one query string run as one implicit transaction, which
        # SET LOCAL applies to and which commits when the string ends.
        self._preambles = {
            # (timeout set at the start, autocommit): what goes before the first statement
            (True, True): "",
            (True, False): "BEGIN; ",
            (False, True): set_local,
            (False, False): f"BEGIN; {set_local}",
        }
        self._deadline_s = statement_timeout_ms / 1000 + DEADLINE_GRACE_S
        self._dsn = dsn
        self._connect_kwargs = dict(
            connection_factory=PooledConnection,
            cursor_factory=Cursor,
            application_name=application_name,
            # Let the kernel find a dead server (or let the server find a dead worker) in
            # about a minute instead of the system default of two hours.
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        # It holds the idle connections. It would open new ones itself while holding its lock
        # (a gevent lock once patched), making every checkout and return wait behind one slow
        # connect; `_take()` opens them outside it and hands them over.
        self._connections = ThreadedConnectionPool(0, max_size, dsn)
        # psycopg2 keeps a returned connection only while fewer than `minconn` are idle.
        self._connections.minconn = max_size
        self._slots = Slots(max_size)  # one per connection lent or that may be opened
        self._open = 0
        self._in_use = 0
        self._closed = False
        self._connect_failures = 0
        self._next_connect_at = 0.0
        self._probing = False
        self._events = events
        self._changed()

    @contextmanager
    def connection(
        self, timeout: float | None = None, label: str = "", autocommit: bool = False
    ) -> Iterator[Cursor]:
        """Lend a cursor inside one transaction; commit on a clean exit, roll back otherwise.

        With `autocommit`, each statement is a transaction of its own instead, sent together
        with its statement timeout in one round trip: for a block of a single statement that
        is the same guarantee for half the round trips (no separate COMMIT).

        Waits up to `timeout` (default: the pool's) for a free connection, then raises
        `PoolTimeout`; raises it at once when `max_waiting` greenlets already wait. Raises
        `DatabaseUnavailable` when no connection can be opened (at once while connects are
        backing off after a failure) or the connection breaks, and `StatementTimeout` when the
        server cancels a statement. The connection always goes back; a broken one is closed
        and never lent again. Held longer than `leak_warn_s`, it is logged once with `label`.
        """
        conn = self._checkout(self._timeout if timeout is None else timeout)
        watchdog = gevent.get_hub().loop.timer(self._leak_warn_s)
        # Run in the holder's context, so that the warning's log line carries its request id.
        watchdog.start(contextvars.copy_context().run, _warn_leak, label, self._leak_warn_s)
        try:
            with _translated_errors():
                cursor = conn.cursor()
                cursor.preamble = self._preambles[conn.timeout_set, autocommit]
                cursor.deadline_s = self._deadline_s
                yield cursor
                if not autocommit and not cursor.preamble:  # a transaction was begun
                    cursor.execute("COMMIT")
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
    def statement_deadline_s(self) -> float:
        """How long a statement may go unanswered before its connection is given up: the
        statement timeout and DEADLINE_GRACE_S."""
        return self._deadline_s

    @property
    def waiting(self) -> int:
        """Greenlets waiting for a free connection now."""
        return self._slots.waiting

    def turned_away(self, reason: str) -> PoolTimeout:
        """The `PoolTimeout` for a request that got no connection before it reached the pool
        (the app's door, service/admission.py), counted as the pool counts its own. The wait
        it reports is 0: the door's wait is already on the request's access line."""
        if self._events is not None:
            self._events.timed_out(0.0)
        return PoolTimeout(reason)

    def stats(self) -> dict[str, int]:
        """What the pool holds now: open connections, lent, idle, greenlets waiting."""
        return {
            "max": self.max_size,
            "size": self._open,
            "in_use": self._in_use,
            "idle": self._open - self._in_use,
            "waiting": self.waiting,
        }

    def close(self) -> None:
        """Close the idle connections; waiters and later callers get `DatabaseUnavailable`, and
        a lent connection is closed when it comes back. Called when the worker exits.

        A lent connection is left to its holder: closing it while its greenlet waits for a
        query's answer would block the whole worker (psycopg2 holds the connection's lock across
        the green wait), and a worker that exits before it comes back closes its socket anyway.
        """
        self._closed = True
        self._slots.wake_all()
        idle = self._connections._pool
        while idle:  # a lent one, or one being pinged, is counted off when it comes back
            idle.pop().close()
            self._open -= 1
        self._changed()

    def _checkout(self, timeout: float) -> PooledConnection:
        started = time.monotonic()
        try:
            conn = self._lend(timeout)
        except BaseException as exc:
            self._changed()
            if isinstance(exc, PoolTimeout) and self._events is not None:
                self._events.timed_out(time.monotonic() - started)
            raise
        try:
            self._changed()
            if self._events is not None:
                self._events.checked_out(time.monotonic() - started)
        except BaseException:  # a listener that fails must not cost a connection
            self._checkin(conn)
            raise
        return conn

    def _lend(self, timeout: float) -> PooledConnection:
        self._acquire_slot(timeout)
        try:
            conn = self._take()
        except BaseException:
            self._slots.give()
            raise
        self._in_use += 1
        return conn

    def _take(self) -> PooledConnection:
        """A live connection within its lifetime: an idle one that passes the checks below, or
        a new one. Dead, expired and closed idle connections are dropped on the way."""
        while True:
            if self._closed:  # checked again after each ping, which may outlast the close
                raise DatabaseUnavailable("the connection pool is closed")
            if not self._connections._pool:  # nothing idle: open one, outside the pool's lock
                self._connections._pool.append(self._open_connection())
            conn = self._connections.getconn()  # never connects: an idle one is there
            now = time.monotonic()
            if conn.expires_at is None:
                self._open += 1
                self._connect_failures = 0
                conn.expires_at = now + self._max_lifetime * (1 - LIFETIME_JITTER * random.random())
                return conn
            if now >= conn.expires_at or not self._alive(conn, now - conn.idle_since):
                self._discard(conn)
                continue
            return conn

    def _open_connection(self) -> PooledConnection:
        """A new connection, or `DatabaseUnavailable`; paced by the backoff after a failure,
        when one greenlet at a time probes the server and the rest fail at once."""
        self._check_backoff()
        probing = self._connect_failures > 0
        self._probing = self._probing or probing
        try:
            return self._connect()
        except psycopg2.OperationalError as exc:
            self._connect_failed()
            raise DatabaseUnavailable(f"cannot connect: {exc}".strip()) from exc
        finally:
            if probing:
                self._probing = False

    def _connect(self) -> PooledConnection:
        """A new connection that knows how its statements get the statement timeout.

        Sent as a startup option, the timeout is set once, when the server starts the session,
        and the statements go as they are: SET LOCAL in every transaction cost PostgreSQL 11-25%
        of its throughput on a one-row SELECT (pgbench, select-only, on this machine). PgBouncer
        keeps one server session for many clients, so it never passes the option on: Debian
        12's (1.18) refuses it ("unsupported startup parameter"), and with
        `ignore_startup_parameters` one drops it in silence. The server is therefore asked
        whether the timeout came from this client's start; if not, or if the option was
        refused, the connection sets it with SET LOCAL in every transaction, as before.
        """
        if not self._options_refused:
            try:
                conn = connect(
                    self._dsn,
                    self._connect_timeout,
                    options=self._timeout_option,
                    **self._connect_kwargs,
                )
            except psycopg2.OperationalError as exc:
                if "unsupported startup parameter" not in str(exc):
                    raise
                self._options_refused = True
                self._fallback_logged = True
                log.info("statement timeout: SET LOCAL in every transaction (%s)", str(exc).strip())
            else:
                conn.timeout_set = self._took_timeout_option(conn)
                return conn
        conn = connect(self._dsn, self._connect_timeout, **self._connect_kwargs)
        conn.timeout_set = False
        return conn

    def _took_timeout_option(self, conn: PooledConnection) -> bool:
        try:
            with deadline(self._connect_timeout, _NoAnswer), conn.cursor() as cursor:
                cursor.execute(
                    "SELECT setting, source FROM pg_settings WHERE name = 'statement_timeout'"
                )
                row = cursor.fetchone()
        except _NoAnswer:
            conn.close()
            raise psycopg2.OperationalError(
                f"no answer within {self._connect_timeout:g} s after connecting"
            ) from None
        except psycopg2.OperationalError:
            conn.close()
            raise
        except psycopg2.Error as exc:  # a server or proxy that cannot say: SET LOCAL it is
            row = {"error": str(exc).strip()}
        took = row == {"setting": str(self._statement_timeout_ms), "source": "client"}
        if not took and not self._fallback_logged:
            self._fallback_logged = True
            log.info("statement timeout: SET LOCAL in every transaction (the server said %s)", row)
        return took

    def _alive(self, conn: PooledConnection, idle_s: float) -> bool:
        """Whether an idle connection still has a server behind it.

        A backend that was terminated or shut down has sent its last message and closed the
        socket: an idle connection with anything to read is dead (one poll, no round trip).
        Only a connection idle for `ping_after_idle_s` pays for a `SELECT 1`.
        """
        if conn.closed:
            return False
        poller = _poll()
        poller.register(conn.fileno(), _POLLIN)
        if poller.poll(0):
            return False
        if idle_s < self._ping_after_idle_s:
            return True
        try:
            with deadline(self._connect_timeout, _NoAnswer), conn.cursor() as cursor:
                cursor.execute("SELECT 1")
        except (psycopg2.Error, _NoAnswer):
            return False
        return True

    def _check_backoff(self) -> None:
        wait = self._next_connect_at - time.monotonic()
        if wait > 0:
            raise DatabaseUnavailable(f"the database is unreachable; next connect in {wait:.2f} s")
        if self._probing:
            raise DatabaseUnavailable("the database is unreachable; another request is retrying")

    def _connect_failed(self) -> None:
        if self._events is not None:
            self._events.connect_failed()
        self._connect_failures += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(self._connect_failures - 1, 10))
        self._next_connect_at = time.monotonic() + delay * random.uniform(0.5, 1.0)

    def _checkin(self, conn: PooledConnection) -> None:
        try:
            if self._closed:
                conn.close()
                self._open -= 1
            elif _reusable(conn):
                conn.idle_since = time.monotonic()
                self._connections.putconn(conn)
            else:
                self._discard(conn)
        finally:
            self._in_use -= 1
            self._slots.give()
            self._changed()

    def _discard(self, conn: PooledConnection) -> None:
        self._connections.putconn(conn, close=True)
        self._open -= 1
        if self._events is not None:
            self._events.discarded()

    def _acquire_slot(self, timeout: float) -> None:
        if self._slots.take_now():
            return
        if self._max_waiting and self._slots.waiting >= self._max_waiting:
            raise PoolTimeout(f"{self._slots.waiting} requests already wait for a connection")
        if not self._slots.wait(timeout, joined=self._changed):
            raise PoolTimeout(f"no database connection became free within {timeout:g} s")

    def _changed(self) -> None:
        if self._events is not None:
            self._events.changed(self.stats())


def _joined_options(*options: str | None) -> str:
    """libpq's `options`: the DSN's own (or PGOPTIONS) first, so that ours is added to them,
    not put in their place."""
    return " ".join(option for option in options if option)


class _NoAnswer(Exception):
    """A ping got no answer in time."""


def _warn_leak(label: str, held_s: float) -> None:
    log.warning("a database connection has been held for over %g s by %s", held_s, label or "?")


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

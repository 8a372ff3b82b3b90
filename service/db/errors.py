"""What the database layer raises, and which failure of PostgreSQL's is which.

A psycopg2 error is sorted by its SQLSTATE class, never by its Python type alone (psycopg2
raises `OperationalError` for a lost connection, a deadlock and a full disk alike):

* class 08, 57P01-57P03, or none at all on a lost socket: `DatabaseUnavailable`; the
  connection is closed.
* 57014 (query_canceled: the statement timeout): `StatementTimeout`; the connection is kept.
* 40001, 40P01, 55P03 (serialization failure, deadlock, lock not available):
  `TransactionConflict`; the connection is kept.
* anything else (a unique violation, a syntax error, a full disk, ...): the psycopg2 error
  itself; the connection is kept.

A connection kept is rolled back before it is lent again.
The HTTP layer maps each class (and so each subclass) to one response; this module knows
nothing of HTTP.
"""

from __future__ import annotations

import psycopg2

# admin_shutdown, crash_shutdown, cannot_connect_now: the server is going or not yet there.
_SHUTDOWN = frozenset({"57P01", "57P02", "57P03"})
# serialization_failure, deadlock_detected, lock_not_available: the same transaction, run
# again, may well succeed.
_CONFLICT = frozenset({"40001", "40P01", "55P03"})
_QUERY_CANCELED = "57014"


class PoolTimeout(Exception):
    """No connection became free within the wait allowed (or too many already wait)."""


class ClientGone(Exception):
    """The caller's client hung up while the caller waited for a connection (or before): the
    connection was handed back unused, and nothing was sent to the server."""


class DatabaseUnavailable(Exception):
    """The server cannot be reached, or the connection broke while in use."""


class StatementTimeout(Exception):
    """A statement ran longer than the statement timeout and the server cancelled it."""


class TransactionConflict(Exception):
    """The transaction lost to a concurrent one (serialization failure, deadlock, lock not
    available) and was rolled back: running it again may succeed."""


class TransactionAborted(Exception):
    """A block caught a database error and went on: PostgreSQL had aborted its transaction,
    so nothing was committed. A programming error in the block."""


def translate(exc: psycopg2.Error) -> Exception | None:
    """Our exception for `exc`, or None when the psycopg2 error should propagate as it is."""
    code = exc.pgcode
    if isinstance(exc, psycopg2.InterfaceError) or connection_lost(exc):
        return DatabaseUnavailable(f"the database connection failed: {exc}".strip())
    if code == _QUERY_CANCELED:
        return StatementTimeout("the statement timeout cancelled a query")
    if code in _CONFLICT:
        return TransactionConflict(f"the transaction conflicted with another ({code})")
    return None


def connection_lost(exc: psycopg2.Error) -> bool:
    """Whether `exc` says that the connection itself is gone (its SQLSTATE class is 08 or the
    server shuts down; or libpq lost the socket, which leaves no SQLSTATE)."""
    code = exc.pgcode
    if code is None:
        return isinstance(exc, psycopg2.OperationalError)
    return code.startswith("08") or code in _SHUTDOWN

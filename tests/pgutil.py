"""PostgreSQL outside any pool, for tests: a plain autocommit cursor, a database of one's own,
users to seed it with, the server's view of its connections (`pg_stat_activity`), and a sampler
that watches the server while a test runs."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import gevent
import psycopg2
import psycopg2.extensions
from gevent.event import Event

T = TypeVar("T")
APP_NAME = "service"  # the application_name service.db.Pool gives its connections


@contextmanager
def autocommit(dsn: str) -> Iterator[psycopg2.extensions.cursor]:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    conn.autocommit = True
    try:
        yield conn.cursor()
    finally:
        conn.close()


@contextmanager
def fresh_database(server_dsn: str, prefix: str) -> Iterator[str]:
    """An empty database (no schema, nobody else's connections), dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with autocommit(server_dsn) as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield psycopg2.extensions.make_dsn(server_dsn, dbname=name)
    finally:
        with autocommit(server_dsn) as cur:
            cur.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def seed_users(cur: psycopg2.extensions.cursor, n: int) -> list[int]:
    """Insert `n` users, `user 1` <user1@example.com> to `user n` <usern@example.com>; returns
    their ids in the order inserted (ascending)."""
    cur.execute(
        "WITH seeded AS ("
        " INSERT INTO users (name, email)"
        " SELECT 'user ' || i, 'user' || i || '@example.com' FROM generate_series(1, %s) AS i"
        " RETURNING id"
        ") SELECT id FROM seeded ORDER BY id",
        (n,),
    )
    return [user_id for (user_id,) in cur.fetchall()]


def backends(
    cur: psycopg2.extensions.cursor,
    application_name: str | None = None,
    *,
    state: str | None = None,
) -> list[dict]:
    """The connections to the cursor's database other than its own, as `pg_stat_activity`
    shows them: pid, application_name, client_port, state (None while a backend starts),
    wait_event_type and query. Only `application_name`'s, and only those in `state`, if given."""
    cur.execute(
        "SELECT pid, application_name, client_port, state, wait_event_type, query"
        " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND (%(name)s IS NULL OR application_name = %(name)s)"
        " AND (%(state)s IS NULL OR state = %(state)s)",
        {"name": application_name, "state": state},
    )
    names = [column.name for column in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def waiting_on_lock(cur: psycopg2.extensions.cursor, application_name: str) -> int:
    """How many of `application_name`'s connections to the cursor's database wait on a lock."""
    return sum(b["wait_event_type"] == "Lock" for b in backends(cur, application_name))


def backend_starts(
    cur: psycopg2.extensions.cursor, application_name: str
) -> list[tuple[int, float, float]]:
    """(pid, started, now) of each of `application_name`'s connections to the cursor's
    database, in epoch seconds of the server's clock: when its backend started, and the
    statement's time, at which it was still there."""
    cur.execute(
        "SELECT pid, extract(epoch FROM backend_start)::float8, extract(epoch FROM now())::float8"
        " FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
        (application_name,),
    )
    return cur.fetchall()


class Sampler(Generic[T]):
    """Calls `sample(cursor)` over and over on a connection of its own, until the block ends
    (or `limit_s` passes), keeping every result in `samples`."""

    def __init__(self, dsn: str, sample: Callable[[psycopg2.extensions.cursor], T], limit_s=60.0):
        self.dsn = dsn
        self.sample = sample
        self.limit_s = limit_s
        self.samples: list[T] = []
        self._stop = Event()

    def __enter__(self) -> Sampler[T]:
        self._greenlet = gevent.spawn(self._run)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._greenlet.get(timeout=10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        with autocommit(self.dsn) as cur:
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.samples.append(self.sample(cur))
                self._stop.wait(0.005)


@contextmanager
def users_locked(
    dsn: str, application_name: str = "", mode: str = "ACCESS EXCLUSIVE"
) -> Iterator[None]:
    """Hold a lock on `users` for the block: with ACCESS EXCLUSIVE every statement on it waits,
    with EXCLUSIVE every write and reads go on. The lock holder's connection goes by
    `application_name`, if given."""
    conn = psycopg2.connect(dsn, connect_timeout=5, application_name=application_name)
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = '5s'")
            cur.execute(f"LOCK TABLE users IN {mode} MODE")
        yield
    finally:
        conn.rollback()
        conn.close()


@contextmanager
def only_connection_held(app) -> Iterator[None]:
    """Another greenlet holds the app's one pooled connection (DB_POOL_MAX=1) for the block."""
    from service import db  # the service's, as the app under test uses it

    held, release = Event(), Event()

    def hold():
        with app.app_context(), db.get_db() as cur:
            cur.execute("SELECT 1")
            held.set()
            release.wait(60)

    holder = gevent.spawn(hold)
    assert held.wait(10), "the holder took no connection within 10 s"
    try:
        yield
    finally:
        release.set()
        holder.join(timeout=5)
    assert holder.successful()

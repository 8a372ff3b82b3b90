"""PostgreSQL outside any pool, for tests: a plain autocommit cursor, a database of one's own,
and a sampler that watches the server while a test runs."""

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
def users_locked(dsn: str) -> Iterator[None]:
    """Hold ACCESS EXCLUSIVE on `users` for the block: every statement on it waits."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = '5s'")
            cur.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
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
            release.wait()

    holder = gevent.spawn(hold)
    held.wait()
    try:
        yield
    finally:
        release.set()
        holder.join(timeout=5)
    assert holder.successful()

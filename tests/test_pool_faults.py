"""The pool when the network or the server misbehaves: dead idle connections are replaced
before anyone uses them, connects back off while the server is away, the wait queue can be
capped, and a connection held too long is reported."""

import logging
import time

import gevent
import psycopg2.extensions
import pytest
from gunicorn_proc import wait_until
from loadgen import join_all
from pgutil import backends

from service.db import DatabaseUnavailable, PoolTimeout
from tests.tcpproxy import TcpProxy


@pytest.fixture
def proxy(database_url):
    params = psycopg2.extensions.parse_dsn(database_url)
    proxy = TcpProxy(params.get("host", "127.0.0.1"), int(params.get("port", 5432))).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def proxied_url(database_url, proxy):
    return psycopg2.extensions.make_dsn(database_url, host="127.0.0.1", port=proxy.port)


def backend_pids(pool, n):
    """Check out n connections at once and return their backend pids."""
    pids, ready, done = [], gevent.event.Event(), gevent.event.Event()

    def one():
        with pool.connection() as db:
            db.execute("SELECT pg_backend_pid() AS pid")
            pids.append(db.fetchone()["pid"])
            if len(pids) == n:
                ready.set()
            done.wait(10)

    jobs = [gevent.spawn(one) for _ in range(n)]
    ready.wait(5)
    done.set()
    join_all(jobs, 30, "the greenlets")
    return set(pids)


def test_idle_connections_killed_by_the_server_are_replaced_unnoticed(make_pool, admin):
    pool = make_pool(max_size=3)
    old = backend_pids(pool, 3)
    admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s) AS pid", (list(old),))

    wait_until(
        lambda: not old & {b["pid"] for b in backends(admin)}, 5, "the terminated backends to go"
    )

    new = backend_pids(pool, 3)  # raises if any checkout hands out a dead connection
    assert not new & old
    assert pool.stats() == {"max": 3, "size": 3, "in_use": 0, "idle": 3, "waiting": 0}


def test_a_silently_dead_idle_connection_is_pinged_and_replaced(make_pool, proxied_url, proxy):
    pool = make_pool(proxied_url, max_size=1, connect_timeout=1, ping_after_idle_s=0.05)
    with pool.connection() as db:
        db.execute("SELECT pg_backend_pid() AS pid")
        old = db.fetchone()["pid"]
    proxy.cut()  # the link goes silent: no FIN, nothing to read, a ping never returns
    gevent.sleep(0.1)  # idle past the ping threshold

    started = time.monotonic()
    with gevent.Timeout(5), pool.connection() as db:
        db.execute("SELECT pg_backend_pid() AS pid")
        assert db.fetchone()["pid"] != old
    assert time.monotonic() - started < 3  # one ping timeout (1 s) and a connect


def test_a_statement_on_a_link_that_dies_silently_ends_after_its_deadline(
    make_pool, proxied_url, proxy
):
    pool = make_pool(proxied_url, max_size=1, statement_timeout_ms=300)
    started = time.monotonic()
    with gevent.Timeout(5), pytest.raises(DatabaseUnavailable), pool.connection() as db:
        db.execute("SELECT 1")
        proxy.cut()  # the server's statement timeout fires, but its answer never arrives
        db.execute("SELECT pg_sleep(2)")
    assert 1.2 < time.monotonic() - started < 2.5  # 0.3 s statement timeout + 1 s grace
    assert pool.stats() == {"max": 1, "size": 0, "in_use": 0, "idle": 0, "waiting": 0}


def test_connects_back_off_while_the_server_refuses(make_pool, proxied_url, proxy):
    pool = make_pool(proxied_url, max_size=5, connect_timeout=1)
    proxy.refuse()
    outcomes = []

    def client():
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                with pool.connection(timeout=1) as db:
                    db.execute("SELECT 1")
                outcomes.append("ok")
            except DatabaseUnavailable:
                outcomes.append("unavailable")
            gevent.sleep(0.01)

    join_all([gevent.spawn(client) for _ in range(200)], 30, "the greenlets")

    assert len(outcomes) > 5000 and set(outcomes) == {"unavailable"}
    # One probe at a time, one per backoff step (0.05 s doubling to 1 s, with jitter): about
    # seven attempts (about fifteen when every waiting slot probed), not one per request.
    assert proxy.accepted < 12


def test_the_pool_is_used_again_within_a_second_of_the_server_returning(
    make_pool, proxied_url, proxy
):
    pool = make_pool(proxied_url, max_size=2, connect_timeout=1)
    proxy.refuse()
    for _ in range(6):  # back off to the longest delay
        with pytest.raises(DatabaseUnavailable), pool.connection() as db:
            db.execute("SELECT 1")
        gevent.sleep(0.3)
    proxy.restore()
    back = time.monotonic()

    def lends() -> bool:
        try:
            with pool.connection() as db:
                db.execute("SELECT 1")
        except DatabaseUnavailable:
            return False
        return True

    wait_until(lends, 2, "the pool to lend a connection again")
    assert time.monotonic() - back < 1.1


def test_a_server_that_never_answers_a_connect_gives_database_unavailable_in_time(
    make_pool, silent_port
):
    pool = make_pool(f"host=127.0.0.1 port={silent_port}", connect_timeout=1)
    started = time.monotonic()
    with gevent.Timeout(5), pytest.raises(DatabaseUnavailable), pool.connection():
        pass
    assert 0.9 < time.monotonic() - started < 2
    assert pool.stats()["in_use"] == 0


def test_a_slow_connect_does_not_hold_up_idle_connections(make_pool, proxied_url, proxy):
    pool = make_pool(proxied_url, max_size=2, connect_timeout=2)
    handed_back, connecting = gevent.event.Event(), gevent.event.Event()

    def holder():
        with pool.connection() as db:
            db.execute("SELECT 1")
            connecting.wait(5)
        handed_back.set()

    def connector():  # finds nothing idle, connects, and the server never answers
        connecting.set()
        with pytest.raises(DatabaseUnavailable), pool.connection():
            pass

    first = gevent.spawn(holder)
    wait_until(lambda: pool.stats()["in_use"] == 1, 5, "the first connection lent")
    proxy.stall()
    second = gevent.spawn(connector)
    started = time.monotonic()
    handed_back.wait(5)
    with pool.connection() as db:  # the returned connection, not a wait behind the connect
        db.execute("SELECT 1")
    assert time.monotonic() - started < 0.5
    join_all([first, second], 30, "the greenlets")


def test_waiters_beyond_max_waiting_get_pool_timeout_at_once(make_pool):
    pool = make_pool(max_size=1, max_waiting=2, timeout=5)
    release = gevent.event.Event()

    def holder():
        with pool.connection() as db:
            db.execute("SELECT 1")
            release.wait(10)

    jobs = [gevent.spawn(holder) for _ in range(3)]  # one holds, two wait
    wait_until(lambda: pool.stats()["waiting"] == 2, 5, "two waiters")
    started = time.monotonic()
    with pytest.raises(PoolTimeout), pool.connection():
        pass
    assert time.monotonic() - started < 0.1
    release.set()
    assert len(gevent.joinall(jobs, timeout=10, raise_error=True)) == len(jobs)
    assert pool.stats()["in_use"] == 0


def test_callers_waiting_elsewhere_count_towards_max_waiting(make_pool):
    """Lookups waiting in a batch (service/db/batch.py) wait for a connection too."""
    elsewhere = [1]
    pool = make_pool(max_size=1, max_waiting=2, timeout=5, waiting_elsewhere=lambda: elsewhere[0])
    release = gevent.event.Event()

    def holder():
        with pool.connection() as db:
            db.execute("SELECT 1")
            release.wait(10)

    jobs = [gevent.spawn(holder) for _ in range(2)]  # one holds, one waits: 2 with elsewhere's
    wait_until(lambda: pool.stats()["waiting"] == 1, 5, "one waiter")
    assert pool.waiting_cap_reached() == "2 requests already wait for a connection"
    with pytest.raises(PoolTimeout, match="2 requests already wait"), pool.connection():
        pass
    elsewhere[0] = 0
    assert pool.waiting_cap_reached() is None
    release.set()
    assert len(gevent.joinall(jobs, timeout=10, raise_error=True)) == len(jobs)


def test_a_connection_held_too_long_is_reported_once_with_the_stack_that_holds_it(
    make_pool, caplog
):
    pool = make_pool(max_size=1, leak_warn_s=0.1)

    def slow_report_query():
        with pool.connection() as db:
            db.execute("SELECT pg_sleep(0.35)")

    with caplog.at_level(logging.WARNING, logger="service.db.pool"):
        gevent.spawn(slow_report_query).get(timeout=5)
        with pool.connection() as db:
            db.execute("SELECT 1")
        gevent.sleep(0.2)  # past the threshold after the second holder returned its connection
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    # The holder's stack, from the function that took the connection to where it waits now.
    assert "in slow_report_query" in warnings[0]
    assert 'db.execute("SELECT pg_sleep(0.35)")' in warnings[0]
    assert __file__ in warnings[0]

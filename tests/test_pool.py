"""The pool against a real server: green waits, fair queueing, timeouts, no leaks, no churn."""

import math
import os
import subprocess
import sys
import time

import gevent
import psycopg2
import psycopg2.extensions
import pytest
from gevent.event import Event
from gunicorn_proc import REPO, wait_until
from loadgen import join_all
from pgutil import backends

from service.db import DatabaseUnavailable, PoolTimeout, StatementTimeout


def backend_pid(pool, **kwargs):
    with pool.connection(**kwargs) as db:
        db.execute("SELECT pg_backend_pid() AS pid")
        return db.fetchone()["pid"]


def hold(pool, release: Event, got: list, name):
    with pool.connection() as db:
        got.append(name)
        db.execute("SELECT 1")
        release.wait(10)


def test_rows_are_dicts_and_a_clean_block_commits(make_pool, admin):
    pool = make_pool()
    with pool.connection() as db:
        db.execute("INSERT INTO users (name, email) VALUES ('a', 'a@x.io') RETURNING name")
        assert db.fetchone() == {"name": "a"}
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == 1


def test_an_exception_rolls_back_and_returns_the_connection(make_pool, admin):
    pool = make_pool(max_size=1)
    pid = backend_pid(pool)
    with pytest.raises(ZeroDivisionError), pool.connection() as db:
        db.execute("INSERT INTO users (name, email) VALUES ('a', 'a@x.io')")
        raise ZeroDivisionError
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == 0
    assert pool.stats()["in_use"] == 0
    assert backend_pid(pool) == pid  # the same connection, back and reused


def test_a_database_error_leaves_no_transaction_open(make_pool, admin):
    pool = make_pool(max_size=1)
    with pytest.raises(psycopg2.errors.UndefinedTable), pool.connection() as db:
        db.execute("SELECT * FROM no_such_table")
    # None: a backend still starting, not yet idle nor busy.
    assert [b for b in backends(admin, "test-pool") if b["state"] not in ("idle", None)] == []
    assert backend_pid(pool) > 0


def test_every_statement_has_the_statement_timeout(make_pool):
    pool = make_pool(statement_timeout_ms=100)
    with pool.connection() as db:
        db.execute("SELECT current_setting('statement_timeout') AS t")
        assert db.fetchone()["t"] == "100ms"
        db.execute("SELECT current_setting('statement_timeout') AS t")
        assert db.fetchone()["t"] == "100ms"
    started = time.monotonic()
    with pytest.raises(StatementTimeout), pool.connection() as db:
        db.execute("SELECT pg_sleep(5)")
    assert time.monotonic() - started < 2
    assert pool.stats()["in_use"] == 0


def test_in_autocommit_every_statement_has_the_timeout_and_commits_alone(make_pool, admin):
    pool = make_pool(statement_timeout_ms=100)
    with pytest.raises(ZeroDivisionError), pool.connection(autocommit=True) as db:
        db.execute("SELECT current_setting('statement_timeout') AS t")
        assert db.fetchone()["t"] == "100ms"
        db.execute("INSERT INTO users (name, email) VALUES ('a', 'a@x.io') RETURNING name")
        assert db.fetchone() == {"name": "a"}
        db.execute("SELECT current_setting('statement_timeout') AS t, now() AS at")
        first = db.fetchone()
        db.execute("SELECT now() AS at")
        assert first["t"] == "100ms" and db.fetchone()["at"] > first["at"]  # two transactions
        raise ZeroDivisionError
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == 1  # committed on its own: nothing to roll back
    started = time.monotonic()
    with pytest.raises(StatementTimeout), pool.connection(autocommit=True) as db:
        db.execute("SELECT pg_sleep(5)")
    assert time.monotonic() - started < 2
    assert pool.stats()["in_use"] == 0


def running_query(admin, application_name: str) -> str:
    """The text the server received for the statement a pool's connection is running."""
    active = backends(admin, application_name, state="active")
    return active[0]["query"] if active else ""


@pytest.mark.parametrize("autocommit", [True, False])
def test_a_direct_connection_starts_with_the_timeout_and_sends_statements_as_they_are(
    make_pool, admin, autocommit
):
    """The timeout is a startup option, so no SET LOCAL travels with each statement."""
    pool = make_pool(statement_timeout_ms=2500)
    with pool.connection(autocommit=autocommit) as db:
        db.execute("SELECT setting, source FROM pg_settings WHERE name = 'statement_timeout'")
        assert db.fetchone() == {"setting": "2500", "source": "client"}

    sleeper = gevent.spawn(nap, pool, autocommit)
    wait_until(lambda: running_query(admin, "test-pool"), 5, "the nap to run")
    assert running_query(admin, "test-pool") == "SELECT pg_sleep(0.5)"
    sleeper.get(timeout=5)


def nap(pool, autocommit):
    with pool.connection(autocommit=autocommit) as db:
        db.execute("SELECT pg_sleep(0.5)")


def test_the_database_urls_own_options_are_kept_beside_the_timeout(make_pool, database_url):
    dsn = psycopg2.extensions.make_dsn(database_url, options="-c work_mem=7MB")
    pool = make_pool(dsn, statement_timeout_ms=2500)
    with pool.connection(autocommit=True) as db:
        db.execute(
            "SELECT current_setting('work_mem') AS w, current_setting('statement_timeout') AS t"
        )
        assert db.fetchone() == {"w": "7MB", "t": "2500ms"}


def test_a_query_that_fails_to_format_still_runs_in_the_transaction(make_pool):
    pool = make_pool(statement_timeout_ms=100)
    with pool.connection() as db:
        with pytest.raises(IndexError):
            db.execute("SELECT %s, %s", (1,))  # psycopg2 sends nothing
        db.execute("SELECT current_setting('statement_timeout') AS t")
        assert db.fetchone()["t"] == "100ms"


def test_greenlets_share_few_connections_without_blocking_the_loop(make_pool):
    n, k, nap = 20, 4, 0.2
    pool = make_pool(max_size=k)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])

    def nap_once():
        with pool.connection() as db:
            db.execute("SELECT pg_sleep(%s)", (nap,))

    started = time.monotonic()
    join_all([gevent.spawn(nap_once) for _ in range(n)], 30, "the greenlets")
    elapsed = time.monotonic() - started
    ticker.kill()
    ideal = math.ceil(n / k) * nap  # 1.0 s; a blocking driver needs n * nap = 4 s
    assert ideal * 0.9 <= elapsed < ideal * 2
    assert len(ticks) > elapsed / 0.01 * 0.5  # the loop kept running meanwhile
    assert pool.stats() == {"max": k, "size": k, "in_use": 0, "idle": k, "waiting": 0}


def test_waiters_are_served_first_come_first_served(make_pool):
    pool = make_pool(max_size=2)
    release, order = Event(), []
    holders = [gevent.spawn(hold, pool, release, order, f"holder{i}") for i in range(2)]
    wait_until(lambda: len(order) == 2, 5, "both connections lent")
    waiters = []
    for i in range(6):
        waiters.append(gevent.spawn(hold, pool, Event(), order, i))
        # each joins the queue before the next one starts
        wait_until(lambda n=i + 1: pool.stats()["waiting"] == n, 5, f"waiter {i} queued")
    for greenlet in waiters:
        greenlet.args[1].set()  # each waiter releases as soon as it has a connection
    release.set()
    join_all(holders + waiters, 30, "the greenlets")
    # The two holders connected at once, in either order; the queue is served in order.
    assert sorted(order[:2]) == ["holder0", "holder1"]
    assert order[2:] == [0, 1, 2, 3, 4, 5]


def test_a_newcomer_does_not_overtake_the_queue(make_pool):
    pool = make_pool(max_size=1)
    first_release, order = Event(), []
    holder = gevent.spawn(hold, pool, first_release, order, "holder")
    wait_until(lambda: pool.stats()["in_use"] == 1, 5, "the holder served")
    waiter = gevent.spawn(hold, pool, Event(), order, "waiter")
    wait_until(lambda: pool.stats()["waiting"] == 1, 5, "the waiter queued")
    waiter.args[1].set()
    first_release.set()  # the slot is handed to "waiter" before this greenlet yields
    with pool.connection() as db:
        order.append("newcomer")
        db.execute("SELECT 1")
    join_all([holder, waiter], 30, "the greenlets")
    assert order == ["holder", "waiter", "newcomer"]


def test_waiters_get_pool_timeout_after_the_deadline(make_pool):
    pool = make_pool(max_size=1)
    release = Event()
    holder = gevent.spawn(hold, pool, release, [], "holder")
    wait_until(lambda: pool.stats()["in_use"] == 1, 5, "the holder served")
    started = time.monotonic()
    with pytest.raises(PoolTimeout), pool.connection(timeout=0.3):
        pass
    waited = time.monotonic() - started
    assert 0.3 <= waited < 1.0
    assert pool.stats()["waiting"] == 0
    release.set()
    join_all([holder], 10, "the holder")
    assert backend_pid(pool) > 0  # the slot of the timed-out waiter was not lost


def test_a_killed_waiter_leaves_the_queue(make_pool):
    pool = make_pool(max_size=1)
    release = Event()
    holder = gevent.spawn(hold, pool, release, [], "holder")
    wait_until(lambda: pool.stats()["in_use"] == 1, 5, "the holder served")
    waiter = gevent.spawn(hold, pool, Event(), [], "waiter")
    wait_until(lambda: pool.stats()["waiting"] == 1, 5, "the waiter queued")
    waiter.kill()
    assert pool.stats()["waiting"] == 0
    release.set()
    join_all([holder], 10, "the holder")
    assert pool.stats()["in_use"] == 0
    assert backend_pid(pool, timeout=0.5) > 0


def test_a_greenlet_killed_mid_query_does_not_leak_its_connection(make_pool, admin):
    pool = make_pool(max_size=1)
    sleeper = gevent.spawn(backend_pid_after_sleep, pool)

    def sleeping():
        active = backends(admin, "test-pool", state="active")
        return len([b for b in active if "pg_sleep" in b["query"]]) == 1

    wait_until(sleeping, 5, "the query running")
    sleeper.kill()
    assert pool.stats() == {"max": 1, "size": 0, "in_use": 0, "idle": 0, "waiting": 0}
    assert backend_pid(pool, timeout=0.5) > 0


def backend_pid_after_sleep(pool):
    with pool.connection() as db:
        db.execute("SELECT pg_sleep(10)")


def test_a_connection_killed_in_use_is_discarded(make_pool, admin):
    pool = make_pool(max_size=1)
    pid = backend_pid(pool)
    with pytest.raises(DatabaseUnavailable), pool.connection() as db:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        db.execute("SELECT 1")
    assert pool.stats()["size"] == 0
    assert backend_pid(pool) != pid


def test_a_closed_connection_is_never_lent_again(make_pool):
    pool = make_pool(max_size=1)
    with pytest.raises(DatabaseUnavailable), pool.connection() as db:  # the commit fails
        db.execute("SELECT pg_backend_pid() AS pid")
        pid = db.fetchone()["pid"]
        db.connection.close()
    assert pool.stats()["size"] == 0
    assert backend_pid(pool) != pid


def test_connections_are_replaced_after_their_lifetime(make_pool):
    pool = make_pool(max_size=1, max_lifetime=0.3)
    pid = backend_pid(pool)
    assert backend_pid(pool) == pid
    gevent.sleep(0.35)
    assert backend_pid(pool) != pid
    assert pool.stats()["size"] == 1


def test_an_unreachable_server_gives_database_unavailable(make_pool):
    pool = make_pool(dsn="postgresql://nobody@127.0.0.1:1/none", max_size=2)
    with pytest.raises(DatabaseUnavailable), pool.connection():
        pass
    assert pool.stats() == {"max": 2, "size": 0, "in_use": 0, "idle": 0, "waiting": 0}


def test_warm_opens_min_size_connections(make_pool):
    pool = make_pool(min_size=3, max_size=5)
    pool.warm()
    assert pool.stats() == {"max": 5, "size": 3, "in_use": 0, "idle": 3, "waiting": 0}


def test_warm_survives_an_unreachable_server(make_pool):
    pool = make_pool(dsn="postgresql://nobody@127.0.0.1:1/none", min_size=2)
    pool.warm()
    assert pool.stats()["size"] == 0


def test_a_closed_pool_refuses_checkouts(make_pool):
    pool = make_pool()
    backend_pid(pool)
    pool.close()
    with pytest.raises(DatabaseUnavailable), pool.connection():
        pass


# A worker's last moments on a quick stop (SIGINT, SIGQUIT): the pool closes while a request
# still runs a query. Run apart, so that a worker frozen by the close fails the test instead of
# freezing the test run.
CLOSE_WHILE_A_QUERY_RUNS = """
import sys
import time
from gevent import monkey; monkey.patch_all()
from psycogreen.gevent import patch_psycopg; patch_psycopg()
import os
import gevent.event
sys.path.insert(0, "tests")
from gunicorn_proc import wait_until
from pgutil import autocommit, backends
from service.db.pool import Pool

pool = Pool(os.environ["DATABASE_URL"], min_size=0, max_size=2, timeout=5,
            statement_timeout_ms=5000, connect_timeout=5, max_lifetime=3600,
            application_name="test-pool-close")
running = gevent.event.Event()

def slow_request():
    with pool.connection() as cur:
        running.set()
        cur.execute("SELECT pg_sleep(3)")

with pool.connection(), pool.connection():  # two open: one stays idle beside the one lent below
    pass
request = gevent.spawn(slow_request)
running.wait(5)
started = time.monotonic()
pool.close()
print("closed in", round(time.monotonic() - started, 3), flush=True)
# The idle connection is gone from the server, the lent one still runs its query.
with autocommit(os.environ["DATABASE_URL"]) as admin:
    # within 1 s: well before the query ends
    wait_until(lambda: len(backends(admin, "test-pool-close")) == 1, 1, "the lent one alone")
print("lent", "running" if not request.ready() else "done", flush=True)
request.join(10)
print("request", "ok" if request.successful() else repr(request.exception), flush=True)
print("stats", pool.stats(), flush=True)
"""


def test_closing_the_pool_while_a_query_runs_leaves_that_connection_to_its_holder(
    database_url, admin
):
    done = subprocess.run(
        [sys.executable, "-c", CLOSE_WHILE_A_QUERY_RUNS],
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert float(lines["closed"].removeprefix("in ")) < 0.5  # not after the query
    # The idle one closed at once (the script waited for that), the lent one left to its query.
    assert lines["lent"] == "running"
    assert lines["request"] == "ok"  # it ran to its end
    assert lines["stats"] == str({"max": 2, "size": 0, "in_use": 0, "idle": 0, "waiting": 0})
    assert backends(admin, "test-pool-close") == []


def test_no_connection_churn_under_steady_load(make_pool, admin):
    """psycopg2's pool alone closes returned connections above minconn; ours keeps them."""
    pool = make_pool(min_size=1, max_size=5)

    def count_pids(n):
        return {backend_pid(pool) for _ in range(n)}

    def server_pids():
        return {b["pid"] for b in backends(admin, "test-pool", state="idle")}

    seen = set()
    for pids in join_all([gevent.spawn(count_pids, 20) for _ in range(50)], 30, "the batch"):
        seen |= pids
    before = server_pids()
    assert len(before) == 5
    for pids in join_all([gevent.spawn(count_pids, 20) for _ in range(50)], 30, "the batch"):
        seen |= pids
    assert server_pids() == before
    assert seen == before  # 2,000 checkouts, five connections, none ever replaced

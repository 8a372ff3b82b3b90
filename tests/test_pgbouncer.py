"""Scale-out: three instances of the service through one PgBouncer in transaction pooling mode.

The instances start together against an empty database, so their migrations (one transaction
under a transaction-scoped advisory lock) race each other through PgBouncer. Then 300 mixed
requests spread over them: the service's 24 pooled connections (3 instances x 2 workers x 4)
end at PgBouncer, which lends them POOL_SIZE server connections, never more.

PgBouncer never passes the statement timeout's startup option on. The instances' database
gives its role the same timeout (`ALTER ROLE ... IN DATABASE ... SET`, docs/scaling.md), so
their one-statement requests end at it too. Without that, a transaction block sets it with SET
LOCAL, and a statement in autocommit runs as it would against the server directly: VACUUM and
CREATE INDEX CONCURRENTLY work through PgBouncer.

PgBouncer is a requirement of the suite (`make test` installs it, tests/system-packages):
without it these tests fail, they do not skip. `make test-quick` leaves them out (marker
`pgbouncer`).
"""

import time
from collections import Counter
from itertools import cycle

import gevent
import psycopg2
import psycopg2.extensions
import pytest
from gevent.event import Event
from gunicorn_proc import Gunicorn, request, wait_until
from pgbouncer import PgBouncer
from pgutil import Sampler, autocommit, backends, fresh_database, seed_users, users_locked
from psycopg2 import sql

from service.db import DatabaseUnavailable, Pool, StatementTimeout
from service.db.budget import read_limits

POOL_SIZE = 6  # PgBouncer's server connections for the service's database
LOCKER = "test-locker"  # the application_name of a test's own lock holder
INSTANCES = 3
STATEMENT_TIMEOUT_MS = 500
INSTANCE_ENV = {
    "WEB_CONCURRENCY": "2",
    "DB_POOL_MAX": "4",
    "APP_INSTANCES": str(INSTANCES),
    "DB_POOL_TIMEOUT": "10",
    "DB_STATEMENT_TIMEOUT_MS": str(STATEMENT_TIMEOUT_MS),
}

pytestmark = pytest.mark.pgbouncer


@pytest.fixture(scope="module")
def server_database(database_url):
    """An empty database on the real server, reached directly (not through PgBouncer), whose
    role has the instances' statement timeout."""
    with fresh_database(database_url, "bouncer") as url:
        with autocommit(url) as cur:
            dbname = psycopg2.extensions.parse_dsn(url)["dbname"]
            cur.execute(
                sql.SQL("ALTER ROLE CURRENT_USER IN DATABASE {} SET statement_timeout = {}").format(
                    sql.Identifier(dbname), sql.Literal(STATEMENT_TIMEOUT_MS)
                )
            )
        yield url


@pytest.fixture
def plain_database(database_url):
    """An empty database with no statement timeout of its own, on the real server."""
    with fresh_database(database_url, "plain") as url:
        yield url


@pytest.fixture(scope="module")
def bouncer(database_url):
    if not psycopg2.extensions.parse_dsn(database_url).get("password"):
        pytest.fail("PgBouncer's auth_file needs the server's password in TEST_DATABASE_URL")
    with PgBouncer(database_url, pool_size=POOL_SIZE) as bouncer:
        yield bouncer


@pytest.fixture(scope="module")
def instances(bouncer, server_database, tmp_path_factory):
    """Three instances started at once, each with its own gunicorn master and workers."""
    dbname = psycopg2.extensions.parse_dsn(server_database)["dbname"]
    logs = tmp_path_factory.mktemp("pgbouncer")
    started = [
        Gunicorn(bouncer.dsn(dbname), logs / f"instance{i}.log", **INSTANCE_ENV)
        for i in range(INSTANCES)
    ]
    try:
        for gunicorn in started:
            gunicorn.start()
        for gunicorn in started:
            gunicorn.wait_ready()
        yield started
    finally:  # stopped together: each takes about a second to drain
        stopping = [gevent.spawn(g.terminate) for g in started if g.proc is not None]
        codes = [greenlet.get() for greenlet in stopping]
    assert codes == [0] * INSTANCES


def test_migrations_run_once_through_pgbouncer_while_three_instances_start(
    instances, server_database
):
    applied = [gunicorn.log_lines("schema: ") for gunicorn in instances]
    assert all(len(lines) == 1 for lines in applied), applied
    assert sum("001_users.sql" in lines[0] for lines in applied) == 1, applied
    with autocommit(server_database) as cur:
        cur.execute("SELECT version, name FROM schema_migrations")
        assert cur.fetchall() == [(1, "001_users.sql")]


def test_the_budget_guard_reads_the_servers_limits_through_pgbouncer(
    bouncer, server_database, instances
):
    dbname = psycopg2.extensions.parse_dsn(server_database)["dbname"]
    assert read_limits(bouncer.dsn(dbname), 5) == read_limits(server_database, 5)
    for gunicorn in instances:
        [line] = gunicorn.log_lines("connection budget: ")
        assert "x APP_INSTANCES 3 = 24 connections" in line


def test_300_concurrent_requests_through_pgbouncer_all_succeed_within_its_pool(
    instances, server_database
):
    with autocommit(server_database) as cur:
        ids = seed_users(cur, 30)
    requests = [
        ("GET", f"/users/{ids[i % len(ids)]}", None)
        if i % 2
        else ("POST", "/users", {"name": f"new {i}", "email": f"new{i}@example.com"})
        for i in range(300)
    ]
    ports = cycle(gunicorn.port for gunicorn in instances)
    go, connected = Event(), []

    # The real server's connections to the database, other than the sampler's and the lock
    # holder's: PgBouncer's.
    def bouncers(cur) -> int:
        return sum(b["application_name"] != LOCKER for b in backends(cur))

    with Sampler(server_database, bouncers) as sampler:
        # The requests pile up behind a lock for a while, so that the sampler sees them all
        # wanting the server at once, however quickly they are then answered.
        with users_locked(server_database, LOCKER):
            clients = [
                gevent.spawn(request, next(ports), method, path, body, go=go, connected=connected)
                for method, path, body in requests
            ]
            wait_until(lambda: len(connected) == len(requests), 20, "300 open connections")
            go.set()
            wait_until(lambda: len(sampler.samples) >= 10, 10, "the sampler to see the pile-up")
        finished = gevent.joinall(clients, timeout=40)
    assert len(finished) == len(requests)

    replies = [client.get() for client in clients]
    assert Counter(reply.status for reply in replies) == {200: 150, 201: 150}
    assert len(sampler.samples) >= 10, "the sampler barely ran"
    # 24 pooled connections wanted the server at once; PgBouncer lent them at most its 6 (how
    # many it opened depends on how quickly one-round-trip requests hand them back).
    assert 1 <= max(sampler.samples) <= POOL_SIZE
    with autocommit(server_database) as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone()[0] == 30 + 150


def test_a_stalled_query_ends_at_the_statement_timeout_through_pgbouncer(
    instances, server_database, bouncer
):
    port = instances[0].port
    locker = psycopg2.connect(server_database)  # on the real server, not through PgBouncer
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        reply = request(port, "GET", "/users")
        elapsed = time.monotonic() - started
    finally:
        locker.rollback()
        locker.close()

    assert (reply.status, reply.json["error"]["code"]) == (503, "statement_timeout")
    assert reply.headers["Retry-After"] == "1"
    # The server cancelled it (the client's own deadline is a second later).
    assert STATEMENT_TIMEOUT_MS / 1000 <= elapsed < STATEMENT_TIMEOUT_MS / 1000 + 0.8
    assert request(port, "GET", "/users").status == 200  # lock gone: served again

    # PgBouncer refused the timeout as a startup option; each pool found the role's instead
    # and sends statements as they are.
    for instance in instances:
        workers = int(INSTANCE_ENV["WEB_CONCURRENCY"])
        refused = instance.log_lines("statement timeout: the server refused it at connect")
        assert len(refused) == workers and "unsupported startup parameter" in refused[0]
        assert instance.log_lines("statement timeout: the server's is") == []


def bouncer_pool(dsn: str) -> Pool:
    return Pool(
        dsn,
        min_size=0,
        max_size=2,
        timeout=5,
        statement_timeout_ms=STATEMENT_TIMEOUT_MS,
        connect_timeout=5,
        max_lifetime=3600,
    )


@pytest.mark.parametrize("ignore_startup_parameters", ["", "options"], ids=["refused", "dropped"])
def test_statements_that_cannot_run_in_a_transaction_work_through_pgbouncer_as_directly(
    database_url, plain_database, ignore_startup_parameters
):
    """PgBouncer either refuses the timeout's startup option or, with
    `ignore_startup_parameters = options`, drops it in silence. Either way nothing is added to
    an autocommit statement, so one that refuses a transaction block runs; a transaction block
    gets the timeout with SET LOCAL, and is bounded by it."""
    dbname = psycopg2.extensions.parse_dsn(plain_database)["dbname"]
    with autocommit(plain_database) as cur:
        cur.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
    with PgBouncer(
        database_url, pool_size=2, ignore_startup_parameters=ignore_startup_parameters
    ) as bouncer:
        for dsn in (plain_database, bouncer.dsn(dbname)):
            pool = bouncer_pool(dsn)
            try:
                with pool.connection(autocommit=True) as db:
                    db.execute("VACUUM items")
                    db.execute("CREATE INDEX CONCURRENTLY items_name ON items (name)")
                    db.execute("DROP INDEX CONCURRENTLY items_name")
                with pool.connection() as db:
                    db.execute("SELECT current_setting('statement_timeout') AS t")
                    assert db.fetchone() == {"t": f"{STATEMENT_TIMEOUT_MS}ms"}
                started = time.monotonic()
                with pytest.raises(StatementTimeout), pool.connection() as db:
                    db.execute("SELECT pg_sleep(5)")
                assert time.monotonic() - started < STATEMENT_TIMEOUT_MS / 1000 + 0.8
            finally:
                pool.close()


def test_through_pgbouncer_an_autocommit_statement_runs_under_the_servers_own_timeout(
    database_url, plain_database
):
    """Where the role has none, only the client's deadline (the statement timeout and a
    second) bounds it: it gets DatabaseUnavailable and its connection is dropped."""
    dbname = psycopg2.extensions.parse_dsn(plain_database)["dbname"]
    with PgBouncer(database_url, pool_size=2) as bouncer:
        pool = bouncer_pool(bouncer.dsn(dbname))
        try:
            with pool.connection(autocommit=True) as db:
                db.execute("SELECT current_setting('statement_timeout') AS t")
                assert db.fetchone() == {"t": "0"}
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable), pool.connection(autocommit=True) as db:
                db.execute("SELECT pg_sleep(5)")
            assert 1.4 <= time.monotonic() - started < 3
        finally:
            pool.close()

"""Scale-out: three instances of the service through one PgBouncer in transaction pooling mode.

The instances start together against an empty database, so their migrations (one transaction
under a transaction-scoped advisory lock) race each other through PgBouncer. Then 300 mixed
requests spread over them: the service's 24 pooled connections (3 instances x 2 workers x 4)
end at PgBouncer, which lends them POOL_SIZE server connections, never more. A query stalled
behind a lock still ends at the statement timeout: `SET LOCAL` travels with its transaction,
also behind a PgBouncer that drops the timeout's startup option in silence.
"""

import http.client
import json
import time
from collections import Counter
from itertools import cycle

import gevent
import psycopg2
import psycopg2.extensions
import pytest
from gevent.event import Event
from gunicorn_proc import HOST, Gunicorn, call, wait_until
from pgbouncer import INSTALL_HINT, PgBouncer, find_pgbouncer
from pgutil import Sampler, autocommit, fresh_database

from service.budget import read_limits
from service.pool import Pool, StatementTimeout

POOL_SIZE = 6  # PgBouncer's server connections for the service's database
INSTANCES = 3
STATEMENT_TIMEOUT_MS = 500
INSTANCE_ENV = {
    "WEB_CONCURRENCY": "2",
    "DB_POOL_MAX": "4",
    "APP_INSTANCES": str(INSTANCES),
    "DB_POOL_TIMEOUT": "10",
    "DB_STATEMENT_TIMEOUT_MS": str(STATEMENT_TIMEOUT_MS),
}

pytestmark = pytest.mark.skipif(find_pgbouncer() is None, reason=INSTALL_HINT)


@pytest.fixture(scope="module")
def server_database(database_url):
    """An empty database on the real server, reached directly (not through PgBouncer)."""
    with fresh_database(database_url, "bouncer") as url:
        yield url


@pytest.fixture(scope="module")
def bouncer(database_url):
    if not psycopg2.extensions.parse_dsn(database_url).get("password"):
        pytest.skip("PgBouncer's auth_file needs the server's password in the database URL")
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


def server_backends(cur) -> int:
    """Connections to this database on the real server, other than this one: PgBouncer's."""
    cur.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return cur.fetchone()[0]


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
        cur.execute(
            "INSERT INTO users (name, email)"
            " SELECT 'seed ' || i, 'seed' || i || '@example.com' FROM generate_series(1, 30) i"
            " RETURNING id"
        )
        ids = [row[0] for row in cur.fetchall()]
    requests = [
        ("GET", f"/users/{ids[i % len(ids)]}", None)
        if i % 2
        else ("POST", "/users", {"name": f"new {i}", "email": f"new{i}@example.com"})
        for i in range(300)
    ]
    ports = cycle(gunicorn.port for gunicorn in instances)
    go, connected = Event(), []
    with Sampler(server_database, server_backends) as sampler:
        clients = [
            gevent.spawn(call, next(ports), method, path, body, go=go, connected=connected)
            for method, path, body in requests
        ]
        wait_until(lambda: len(connected) == len(requests), 20, "300 open connections")
        go.set()
        finished = gevent.joinall(clients, timeout=40)
    assert len(finished) == len(requests)

    results = [client.get() for client in clients]
    assert Counter(status for status, _ in results) == {200: 150, 201: 150}
    assert len(sampler.samples) >= 10, "the sampler barely ran"
    # 24 pooled connections wanted the server at once; PgBouncer lent them at most its 6 (how
    # many it opened depends on how quickly one-round-trip requests hand them back).
    assert 1 <= max(sampler.samples) <= POOL_SIZE
    with autocommit(server_database) as cur:
        cur.execute("SELECT count(*) FROM users")
        assert cur.fetchone()[0] == 30 + 150


def get_with_headers(port: int, path: str) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def test_a_stalled_query_ends_at_the_statement_timeout_through_pgbouncer(
    instances, server_database, bouncer
):
    port = instances[0].port
    locker = psycopg2.connect(server_database)  # on the real server, not through PgBouncer
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        status, headers, body = get_with_headers(port, "/users")
        elapsed = time.monotonic() - started
    finally:
        locker.rollback()
        locker.close()

    assert (status, body["error"]["code"]) == (503, "statement_timeout")
    assert headers["Retry-After"] == "1"
    # The server cancelled it (the client's own deadline is a second later).
    assert STATEMENT_TIMEOUT_MS / 1000 <= elapsed < STATEMENT_TIMEOUT_MS / 1000 + 0.8
    assert get_with_headers(port, "/users")[0] == 200  # lock gone: served again

    # PgBouncer refused the timeout as a startup option, so the pools set it with SET LOCAL
    # (service/pool.py), which ended with its transaction: every server connection kept the
    # default.
    for instance in instances:
        refused = instance.log_lines("statement timeout: SET LOCAL in every transaction")
        workers = int(INSTANCE_ENV["WEB_CONCURRENCY"])
        assert len(refused) == workers and "unsupported startup parameter" in refused[0]
    dbname = psycopg2.extensions.parse_dsn(server_database)["dbname"]
    holders = [psycopg2.connect(bouncer.dsn(dbname)) for _ in range(POOL_SIZE)]
    try:
        timeouts = []
        for conn in holders:  # each holds its transaction, so each has a server of its own
            with conn.cursor() as cur:
                cur.execute("SHOW statement_timeout")
                timeouts.append(cur.fetchone()[0])
        assert timeouts == ["0"] * POOL_SIZE
    finally:
        for conn in holders:
            conn.close()


def test_a_pgbouncer_that_drops_the_startup_option_still_gets_the_timeout_with_every_query(
    database_url, server_database
):
    """`ignore_startup_parameters = options` accepts the option and drops it: the pool must see
    that the server never set the timeout, and send SET LOCAL with every statement."""
    dbname = psycopg2.extensions.parse_dsn(server_database)["dbname"]
    with PgBouncer(database_url, pool_size=2, ignore_startup_parameters="options") as dropping:
        pool = Pool(
            dropping.dsn(dbname),
            min_size=0,
            max_size=2,
            timeout=5,
            statement_timeout_ms=STATEMENT_TIMEOUT_MS,
            connect_timeout=5,
            max_lifetime=3600,
        )
        try:
            with pool.connection(autocommit=True) as db:
                db.execute("SELECT current_setting('statement_timeout') AS t")
                assert db.fetchone() == {"t": f"{STATEMENT_TIMEOUT_MS}ms"}
            started = time.monotonic()
            with pytest.raises(StatementTimeout), pool.connection(autocommit=True) as db:
                db.execute("SELECT pg_sleep(5)")
            assert time.monotonic() - started < STATEMENT_TIMEOUT_MS / 1000 + 0.8
        finally:
            pool.close()

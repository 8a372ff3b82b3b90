"""End to end: the production command, real HTTP on 127.0.0.1, a real PostgreSQL behind it.

One gunicorn (2 workers, 4 connections each) serves the load tests of this module; the tests
that stop a server, or start one with a bad setting, run their own. A lock on `users` held by
the test is how requests are made to pile up inside the service: every request that got a
connection waits on the lock with it, every other one waits for a connection.
"""

import http.client
import json
import signal
import socket
import time
from collections import Counter
from contextlib import contextmanager, suppress

import gevent
import gevent.pool
import psycopg2
import psycopg2.extensions
import pytest
from gevent.event import Event
from gunicorn_proc import (
    HOST,
    MISSING_USER,
    Gunicorn,
    access_lines,
    children,
    metric,
    refuses_connections,
    request,
    socket_ports,
    wait_until,
)
from pgutil import (
    APP_NAME,
    Sampler,
    autocommit,
    backends,
    seed_users,
    users_locked,
    waiting_on_lock,
)

WORKERS = 2
POOL_MAX = 4
BUDGET = WORKERS * POOL_MAX  # server connections the service may hold in all
SERVER_ENV = {
    "WEB_CONCURRENCY": str(WORKERS),
    "DB_POOL_MAX": str(POOL_MAX),
    "DB_POOL_TIMEOUT": "10",
    "DB_STATEMENT_TIMEOUT_MS": "10000",
}
GRACEFUL_TIMEOUT_S = 25  # gunicorn.conf.py


@pytest.fixture(scope="module")
def server(database_url, tmp_path_factory):
    log = tmp_path_factory.mktemp("e2e") / "gunicorn.log"
    with Gunicorn(database_url, log, **SERVER_ENV) as gunicorn:
        yield gunicorn


def lock_waits(cur) -> tuple[int, int]:
    """The service's connections, and how many of them wait on a lock."""
    found = backends(cur, APP_NAME)
    return len(found), sum(b["wait_event_type"] == "Lock" for b in found)


def most_waiting(sampler: Sampler) -> int:
    return max((waiting for _, waiting in sampler.samples), default=0)


ONE_EACH = ("DELETE", MISSING_USER)  # a connection each (gunicorn_proc.MISSING_USER)


def fill_pools(port: int, dsn: str, cur, rounds: int = 5) -> None:
    """Make every worker open all its connections: requests pile up behind a lock until each
    pool is lent out. Retried: the kernel, not the test, decides which worker accepts what."""
    for _ in range(rounds):
        with users_locked(dsn):
            clients = [gevent.spawn(request, port, *ONE_EACH) for _ in range(4 * BUDGET)]
            # At most 3 s: when one worker took more than its share, the pools stay short of
            # full, and the next round may share the requests out better.
            with suppress(AssertionError):
                wait_until(lambda: waiting_on_lock(cur, APP_NAME) >= BUDGET, 3, "full pools")
        assert [c.get(timeout=30).status for c in clients] == [404] * len(clients)
        if len(backends(cur, APP_NAME)) == BUDGET:
            return
    raise AssertionError(f"the pools did not grow to {BUDGET} connections in {rounds} rounds")


def test_500_concurrent_requests_succeed_within_the_connection_budget(server, database_url, admin):
    ids = seed_users(admin, 50)
    requests = [
        ("GET", f"/users/{ids[i % len(ids)]}", None)
        if i % 2
        else ("POST", "/users", {"name": f"new {i}", "email": f"new{i}@example.com"})
        for i in range(500)
    ]
    go, connected = Event(), []
    with Sampler(database_url, lock_waits) as sampler:
        with users_locked(database_url):
            clients = [
                gevent.spawn(request, server.port, method, path, body, go=go, connected=connected)
                for method, path, body in requests
            ]
            wait_until(lambda: len(connected) == len(requests), 20, "500 open connections")
            go.set()  # 500 requests at once, each wanting a connection
            wait_until(
                lambda: most_waiting(sampler) >= POOL_MAX,
                10,
                "a pool lent out in full",
            )
        finished = gevent.joinall(clients, timeout=60)
    assert len(finished) == len(requests)

    connections = [total for total, _ in sampler.samples]
    assert len(connections) >= 10, "the sampler barely ran"
    assert 1 <= max(connections) <= BUDGET

    replies = [client.get(timeout=5) for client in clients]
    assert Counter(reply.status for reply in replies) == {200: 250, 201: 250}
    for (method, path, body), reply in zip(requests, replies, strict=True):
        if method == "GET":
            assert path == f"/users/{reply.json['id']}"
        else:
            assert reply.json["email"] == body["email"]
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == 50 + 250


def test_connections_are_reused_across_1000_requests(server, database_url, admin):
    ids = seed_users(admin, 20)
    fill_pools(server.port, database_url, admin)
    before = sorted(b["pid"] for b in backends(admin, APP_NAME))
    assert len(before) == BUDGET

    paths = [f"/users/{ids[i % len(ids)]}" for i in range(1000)]
    clients = gevent.pool.Pool(16)
    statuses = clients.map(lambda path: request(server.port, "GET", path).status, paths)

    assert Counter(statuses) == {200: 1000}
    assert sorted(b["pid"] for b in backends(admin, APP_NAME)) == before


def test_each_worker_opens_and_owns_its_own_pool(server, admin):
    master = server.proc.pid
    workers = children(master)
    assert len(workers) == WORKERS
    assert len(server.log_lines("pool open")) == WORKERS

    # Every connection is held by exactly one worker; none is inherited from the master.
    client_ports = {b["client_port"] for b in backends(admin, APP_NAME)}
    owned = {pid: socket_ports(pid) & client_ports for pid in workers}
    assert all(owned.values()), owned
    assert sum(len(ports) for ports in owned.values()) == len(client_ports)
    assert set().union(*owned.values()) == client_ports
    assert not socket_ports(master) & client_ports
    # The master's own connection (migrations) was closed before the first fork.
    assert backends(admin, "service-migrate") == []


def test_the_log_names_the_database_but_never_its_password(server, database_url):
    dsn = psycopg2.extensions.parse_dsn(database_url)
    assert dsn.get("password"), "this test needs a database URL with a password"
    assert request(server.port, "GET", "/readyz").status == 200

    assert dsn["password"] not in server.log
    [line] = server.log_lines("database: ")
    assert "password=***" in line
    assert f"dbname={dsn['dbname']}" in line


@contextmanager
def requests_on_the_lock(gunicorn: Gunicorn, dsn: str, admin, n: int):
    """`n` requests (ONE_EACH), each holding a connection while `users` is locked; yields their
    greenlets once all of them wait on the lock, and releases it on exit."""
    with users_locked(dsn):
        clients = [gevent.spawn(request, gunicorn.port, *ONE_EACH) for _ in range(n)]
        wait_until(lambda: waiting_on_lock(admin, APP_NAME) == n, 10, "requests on the lock")
        yield clients


@contextmanager
def requests_in_flight(gunicorn: Gunicorn, dsn: str, admin, n: int):
    """`n` requests (ONE_EACH) while `users` is locked, more than the pools can lend:
    yields their greenlets and how many of them hold a connection (waiting on the lock with
    it) once every one is in a worker, holding a connection or waiting for one. Releases the
    lock on exit."""
    with users_locked(dsn):
        clients = [gevent.spawn(request, gunicorn.port, *ONE_EACH) for _ in range(n)]

        def holding_when_all_inside() -> int:
            holding = metric(gunicorn.port, "db_pool_in_use")
            waiting = metric(gunicorn.port, "db_pool_waiting")
            inside = holding + waiting == n and waiting_on_lock(admin, APP_NAME) == holding
            return int(holding) if inside else 0

        yield clients, wait_until(holding_when_all_inside, 10, "every request in a worker")


@pytest.mark.timing
def test_sigterm_lets_requests_in_flight_finish_and_leaves_no_connection(fresh_database, tmp_path):
    in_flight = 10  # more than the BUDGET of connections: some wait for one
    with (
        Gunicorn(fresh_database, tmp_path / "gunicorn.log", **SERVER_ENV) as gunicorn,
        autocommit(fresh_database) as admin,
    ):
        with requests_in_flight(gunicorn, fresh_database, admin, in_flight) as (clients, holding):
            assert holding < in_flight
            gunicorn.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_until(lambda: refuses_connections(gunicorn.port), 10, "the listeners to close")
            # The workers now wait for the requests still running (DRAIN_SECONDS is 0 here:
            # tests/test_drain.py has the drain): keep these running for a while, so that the
            # workers must wait for them.
            gevent.sleep(1.5)
            assert waiting_on_lock(admin, APP_NAME) == holding

        code = gunicorn.proc.wait(timeout=GRACEFUL_TIMEOUT_S)
        assert time.monotonic() - signalled < GRACEFUL_TIMEOUT_S
        assert code == 0
        # Accepted before the SIGTERM, holding a connection or waiting for one: each gets its
        # answer in full (README: gunicorn finishes requests in flight), never a 503.
        assert [client.get(timeout=5).status for client in clients] == [404] * in_flight
        wait_until(lambda: not backends(admin, APP_NAME), 10, "the service's connections to close")
    assert "graceful timeout" not in gunicorn.log


def post_chunked(port: int, chunks: list[bytes], request_id: str = "") -> tuple[int, dict, dict]:
    """POST /users with a body in chunks and no Content-Length, as a streaming client sends it:
    the one request whose body `request` (a JSON document, sent whole) cannot send."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
        conn.request("POST", "/users", body=iter(chunks), headers=headers, encode_chunked=True)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def access_line(gunicorn: Gunicorn, request_id: str) -> dict:
    """The access log line of one request, once it is written."""
    found = wait_until(
        lambda: access_lines([json.loads(line) for line in gunicorn.log_lines(request_id)]),
        10,
        f"the access line of {request_id}",
    )
    [line] = access_lines(found, request_id)
    return line


def test_a_chunked_body_is_read_whole_and_refused_413_past_one_mib(server, admin):
    user = b'{"name": "Ada", "email": "ada@example.com"}'
    assert post_chunked(server.port, [user[:10], user[10:]])[0] == 201

    # Within the first MiB the body is a whole JSON object; only the bytes after it make it too
    # long. Cut at 1 MiB, it would be stored.
    padded = b'{"name": "Pad", "email": "pad@example.com"}'.ljust(1 << 20) + b"and more"
    chunks = [padded[i : i + 65536] for i in range(0, len(padded), 65536)]
    status, headers, body = post_chunked(server.port, chunks, "chunked-413")
    assert (status, body["error"]["code"]) == (413, "request_entity_too_large")
    assert headers["X-Request-ID"] == "chunked-413"  # logged and counted like any answer
    assert access_line(server, "chunked-413")["status"] == 413

    exactly = b'{"name": "Max", "email": "max@example.com"}'.ljust(1 << 20)
    assert post_chunked(server.port, [exactly])[0] == 201
    admin.execute("SELECT name FROM users ORDER BY id")
    assert admin.fetchall() == [("Ada",), ("Max",)]


def test_a_client_that_hangs_up_after_one_mib_of_chunks_is_not_a_500(server, admin):
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /users HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"X-Request-ID: hangup-at-limit\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % (1 << 20)
            + b'{"name": "Cut", "email": "cut@example.com"}'.ljust(1 << 20)
            + b"\r\n"  # and no last chunk: the client is gone
        )
    assert access_line(server, "hangup-at-limit")["status"] == 400
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == 0


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_cut_short_at_the_body_deadline_is_answered_408_and_stores_nothing(
    database_url, admin, tmp_path, framing
):
    """A whole JSON object, 10 bytes short of its Content-Length (or sent as a chunk with no
    last chunk after it), from a client that keeps its connection open and waits for an
    answer. At the body deadline the server stops reading (service/server/connections.py) and
    the app gets the bytes that came: it refuses them (service/app.py) with 408, which the
    client reads before the connection closes. Let through, the create would be stored."""
    body = b'{"name":"a","email":"a@example.com"}'
    head = (
        b"POST /users HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"X-Request-ID: cut-short\r\n"
    )
    if framing == "chunked":
        sent = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(body), body)
    else:
        sent = head + b"Content-Length: %d\r\n\r\n" % (len(body) + 10) + body
    env = {"WEB_CONCURRENCY": "1", "HTTP_BODY_TIMEOUT": "1"}
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        with socket.create_connection((HOST, gunicorn.port), timeout=10) as sock:
            sock.sendall(sent)
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        line = access_line(gunicorn, "cut-short")

    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert (line["route"], line["status"]) == ("/users", 408)
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == 0


@pytest.mark.timing
def test_a_quick_stop_with_queries_running_ends_at_once_and_leaves_no_connection(
    fresh_database, tmp_path
):
    """SIGINT (Ctrl-C on a bare gunicorn) is gunicorn's quick stop: requests in flight are
    dropped, and each worker closes its pool while their queries still run."""
    in_flight = 4
    with (
        Gunicorn(fresh_database, tmp_path / "gunicorn.log", **SERVER_ENV) as gunicorn,
        autocommit(fresh_database) as admin,
    ):
        with requests_on_the_lock(gunicorn, fresh_database, admin, in_flight) as clients:
            gunicorn.proc.send_signal(signal.SIGINT)
            # Well before gunicorn's own timeout (25 s) would SIGKILL a worker stuck in exit.
            code = gunicorn.proc.wait(timeout=10)
        assert len(gevent.joinall(clients, timeout=5)) == in_flight  # each answered or dropped
        wait_until(lambda: not backends(admin, APP_NAME), 10, "the service's connections to close")
    assert code == 0
    assert "SIGKILL" not in gunicorn.log


@pytest.mark.parametrize(
    ("name", "value"),
    [("WEB_CONCURRENCY", "0"), ("DB_POOL_TIMEOUT", "-1"), ("DB_POOL_MAX", "many")],
)
def test_a_bad_setting_stops_gunicorn_with_a_message_naming_it(database_url, tmp_path, name, value):
    gunicorn = Gunicorn(database_url, tmp_path / "gunicorn.log", **{**SERVER_ENV, name: value})
    gunicorn.refused()
    [message] = gunicorn.log_lines("configuration error:")
    assert message.startswith(f"configuration error: {name}=")
    assert value in message
    assert psycopg2.extensions.parse_dsn(database_url)["password"] not in gunicorn.log


def test_a_worker_count_other_than_web_concurrency_stops_gunicorn(database_url, tmp_path):
    gunicorn = Gunicorn(database_url, tmp_path / "gunicorn.log", **SERVER_ENV)
    gunicorn.env["GUNICORN_CMD_ARGS"] += " --workers 3"  # the pools would be sized for 2
    gunicorn.refused()
    assert "would run 3 workers but WEB_CONCURRENCY is 2" in gunicorn.log


def test_a_web_concurrency_that_is_not_a_number_stops_gunicorn_naming_it(database_url, tmp_path):
    # gunicorn parses WEB_CONCURRENCY itself, when its config module is imported, before
    # gunicorn.conf.py can validate anything: its own traceback is the message (README).
    gunicorn = Gunicorn(
        database_url, tmp_path / "gunicorn.log", **{**SERVER_ENV, "WEB_CONCURRENCY": "two"}
    )
    gunicorn.refused()
    assert 'os.environ.get("WEB_CONCURRENCY", 1)' in gunicorn.log
    assert "invalid literal for int()" in gunicorn.log
    assert psycopg2.extensions.parse_dsn(database_url)["password"] not in gunicorn.log

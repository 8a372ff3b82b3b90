"""Hostile clients against the production command: slow, silent, idle and half-sent requests
never starve a fresh client, and each attacking connection is closed within its deadline.

Sizes are the issue's, scaled: two workers of WORKER_CONNECTIONS 150, so `2 x 150 + 100`
attacking connections, with deadlines of 3 s. The bounds are coarse (a fresh client's answer
in under 2 s; an attacker closed within its deadline plus MARGIN_S); docs/reliability.md has
the figures at the production defaults, measured by `python -m bench.hostile`.
"""

import json
import socket
import time

import gevent
import pytest
from gunicorn_proc import (
    HOST,
    Gunicorn,
    metric,
    read_response,
    request,
    scrape_metrics,
    wait_until,
)
from pgutil import autocommit, seed_users, users_locked

from bench.hostile import (
    TRICKLE,
    TRICKLE_OPENING,
    Attack,
    attack,
    fresh_client,
    hold_connection,
    stalled_body,
    timed,
)

WORKER_CONNECTIONS = 150
# Fewer than one worker's slots: the kernel may hand them all to one worker, and a worker with
# no slot left sheds a connection that has sent nothing yet, as a stalled body's may not have
# when it is accepted.
STALLED = WORKER_CONNECTIONS - 30
ATTACKERS = 2 * WORKER_CONNECTIONS + 100
DEADLINE_S = 3
MARGIN_S = 3.0
FRESH_S = 2.0
LIMIT_S = 20.0  # an attacker gives up after this long: well past every deadline under test

pytestmark = pytest.mark.timing


@pytest.fixture
def server(database_url, tmp_path):
    with autocommit(database_url) as cur:
        cur.execute("SELECT count(*) FROM users")
        if cur.fetchone()[0] == 0:
            seed_users(cur, 5)
    with Gunicorn(
        database_url,
        tmp_path / "gunicorn.log",
        WEB_CONCURRENCY="2",
        WORKER_CONNECTIONS=str(WORKER_CONNECTIONS),
        DB_POOL_MAX="2",
        HTTP_HEAD_TIMEOUT=str(DEADLINE_S),
        HTTP_BODY_TIMEOUT=str(DEADLINE_S),
        HTTP_WRITE_TIMEOUT=str(DEADLINE_S),
        HTTP_KEEPALIVE_TIMEOUT=str(DEADLINE_S),
    ) as server:
        yield server


def answer(sock: socket.socket) -> bytes:
    """One whole response from `sock`: its head."""
    return read_response(sock)[0]


def get_healthz(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    return answer(sock)


def closed(server, reason: str) -> float:
    return scrape_metrics(server.port).get(
        ("http_connections_closed_total", frozenset({("reason", reason)})), 0.0
    )


def assert_fresh_client_served(probes):
    assert probes, "the fresh client sent nothing"
    slow = [(p.path, round(p.seconds, 2), p.status, p.error) for p in probes if p.seconds > FRESH_S]
    failed = [(p.path, p.status, p.error) for p in probes if p.status // 100 != 2]
    assert not failed
    assert not slow


def assert_all_closed_in_time(result, deadline_s: float):
    assert not [a.error for a in result.attackers if a.error]
    assert result.still_open() == 0, f"{result.still_open()} attackers never closed"
    held = result.held()
    assert held[-1] <= deadline_s + MARGIN_S, f"longest held {held[-1]:.1f} s"


def test_trickling_heads_are_closed_at_the_head_deadline_and_never_starve_a_fresh_client(server):
    user_id = request(server.port, "GET", "/users?limit=1").json["users"][0]["id"]
    result = attack(
        server.port,
        ATTACKERS,
        TRICKLE_OPENING,
        TRICKLE,
        every=1.0,  # a byte a second: each read is quick, the head is never whole
        limit_s=LIMIT_S,
        probe=fresh_client(server.port, user_id),
    )
    assert_fresh_client_served(result.probes)
    assert_all_closed_in_time(result, DEADLINE_S)
    # Each was closed for its head, or shed to make room: counted either way.
    assert closed(server, "head") + closed(server, "shed") >= ATTACKERS


def test_silent_connections_are_closed_at_the_head_deadline_and_never_starve_a_fresh_client(
    server,
):
    user_id = request(server.port, "GET", "/users?limit=1").json["users"][0]["id"]
    result = attack(
        server.port, ATTACKERS, limit_s=LIMIT_S, probe=fresh_client(server.port, user_id)
    )
    assert_fresh_client_served(result.probes)
    assert_all_closed_in_time(result, DEADLINE_S)
    assert closed(server, "head") + closed(server, "shed") >= ATTACKERS
    # Shedding made room: more connections than slots, and none waited for a deadline.
    assert closed(server, "shed") >= ATTACKERS - 2 * WORKER_CONNECTIONS


def test_stalled_bodies_hold_no_connection_are_closed_at_the_body_deadline_and_store_nothing(
    server, database_url
):
    """STALLED POSTs whose complete-looking JSON is shorter than their Content-Length: the pool
    (2 per worker) stays free for the fresh client, and none of them is stored, neither
    while it stalls nor when the server closes it."""
    user_id = request(server.port, "GET", "/users?limit=1").json["users"][0]["id"]
    tag = f"stalled-{time.time_ns()}"
    bodies = [
        gevent.spawn(
            hold_connection,
            server.port,
            stalled_body(f"{tag}-{i}@example.com"),
            b"",
            1.0,
            LIMIT_S,
        )
        for i in range(STALLED)
    ]
    probes = []
    round_ = fresh_client(server.port, user_id, create=True)
    started = time.monotonic()
    while not all(b.ready() for b in bodies) and time.monotonic() - started < LIMIT_S + 5:
        probes += round_()
        gevent.sleep(0.3)
    gevent.joinall(bodies, timeout=30)
    result = Attack([b.value for b in bodies], probes)
    assert_fresh_client_served(result.probes)
    assert any(p.path == "POST /users" and p.status == 201 for p in probes)
    # Head at once, then the body deadline: closed within both, from connect.
    assert_all_closed_in_time(result, 2 * DEADLINE_S)
    assert closed(server, "body") == STALLED
    with autocommit(database_url) as cur:
        cur.execute("SELECT count(*) FROM users WHERE email LIKE %s", (f"{tag}-%",))
        assert cur.fetchone()[0] == 0


def test_a_client_that_does_not_read_its_responses_is_closed_at_the_write_deadline(server):
    """Thousands of pipelined requests, no response read: once the socket buffers are full,
    the response being written misses its deadline and the connection is closed."""
    before = closed(server, "write")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((HOST, server.port))
    pipelined = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
    sender = gevent.spawn(sock.sendall, pipelined)
    started = time.monotonic()
    try:
        wait_until(
            lambda: closed(server, "write") > before,
            DEADLINE_S + MARGIN_S + 5,
            "the write deadline to close the connection",
        )
        took = time.monotonic() - started
        # Read what was written: it ends, in a close, not in a wait.
        sock.settimeout(10)
        ended = False
        while not ended:
            try:
                ended = not sock.recv(1 << 20)
            except ConnectionResetError:
                ended = True
        assert took <= DEADLINE_S + MARGIN_S + 5
    finally:
        sender.kill()
        sock.close()


def test_idle_keep_alive_connections_are_closed_at_their_deadline_and_busy_ones_are_not(server):
    idle = socket.create_connection((HOST, server.port))
    busy = socket.create_connection((HOST, server.port))
    try:
        for sock in (idle, busy):
            assert get_healthz(sock).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        idle.settimeout(DEADLINE_S + MARGIN_S)
        # The busy one sends a request every second, longer than the idle deadline.
        for _ in range(DEADLINE_S + 2):
            gevent.sleep(1.0)
            assert get_healthz(busy).startswith(b"HTTP/1.1 200")
        assert idle.recv(1) == b""
        assert time.monotonic() - started >= DEADLINE_S - 0.5
        assert closed(server, "idle") >= 1
    finally:
        idle.close()
        busy.close()


def test_idle_keep_alive_connections_give_way_to_new_clients(database_url, tmp_path):
    """Every slot held by an idle keep-alive connection (with a deadline far away): a new
    client is served at once, and the connection idle the longest is the one shed."""
    with Gunicorn(
        database_url,
        tmp_path / "gunicorn.log",
        WEB_CONCURRENCY="1",
        WORKER_CONNECTIONS="20",
        DB_POOL_MAX="2",
        HTTP_KEEPALIVE_TIMEOUT="120",
    ) as server:
        conns = []
        try:
            for _ in range(19):  # the readiness probes' connections are closed: 19 of 20 slots
                sock = socket.create_connection((HOST, server.port))
                assert get_healthz(sock).startswith(b"HTTP/1.1 200")
                conns.append(sock)
            probe = timed(server.port, "GET", "/healthz")
            assert probe.status == 200
            assert probe.seconds < FRESH_S
            conns[0].settimeout(5)
            assert conns[0].recv(1) == b""  # the oldest idle one
            for sock in conns[1:]:  # the others still serve
                assert get_healthz(sock).startswith(b"HTTP/1.1 200")
            assert closed(server, "shed") >= 1
        finally:
            for sock in conns:
                sock.close()


def test_a_client_within_its_deadlines_is_served_however_it_splits_its_request(server):
    user = b'{"name": "slow but in time", "email": "slow-%d@example.com"}' % time.time_ns()
    head = (
        b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(user)
    )
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        for part in (head[:10], head[10:], user[:5], user[5:]):
            sock.sendall(part)
            gevent.sleep(DEADLINE_S / 4)  # four parts: the head and the body each within 3 s
        assert answer(sock).startswith(b"HTTP/1.1 201")


def test_a_request_whose_client_hung_up_while_it_waited_for_a_connection_is_not_served(
    database_url, tmp_path
):
    """One worker, one pooled connection, held by a request blocked on a lock: a POST queued
    behind it whose client hangs up is not executed when the connection frees (499 in the log);
    a DELETE whose client stays is (204). (A write whose client hangs up while it waits in a
    batch, not for a connection: tests/test_batch_writes.py.)"""
    with Gunicorn(
        database_url,
        tmp_path / "gunicorn.log",
        WEB_CONCURRENCY="1",
        DB_POOL_MAX="1",
        DB_POOL_MIN="1",
        DB_POOL_TIMEOUT="20",
    ) as server:
        tag = time.time_ns()
        with autocommit(database_url) as cur:
            [uid] = seed_users(cur, 1)

        def send(method: str, path: str, email: str) -> socket.socket:
            body = b'{"name": "queued", "email": "%s"}' % email.encode()
            sock = socket.create_connection((HOST, server.port), timeout=20)
            sock.sendall(
                b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"X-Request-ID: %s\r\nContent-Length: %d\r\n\r\n%s"
                % (method, path, email.split("@")[0].encode(), len(body), body)
            )
            return sock

        with users_locked(database_url):
            holder = gevent.spawn(timed, server.port, "GET", "/users?limit=1")
            wait_until(lambda: metric(server.port, "db_pool_in_use") >= 1, 10, "the holder")
            # A create (batched) and a delete (a statement of its own): each waits for the
            # connection.
            gone = send(b"POST", b"/users", f"gone-{tag}@example.com")
            stays = send(b"DELETE", b"/users/%d" % uid, f"stays-{tag}@example.com")
            wait_until(lambda: metric(server.port, "db_pool_waiting") >= 2, 10, "2 waiting")
            gone.close()
        holder.join(timeout=20)
        assert holder.value.status == 200
        stays.settimeout(20)
        assert answer(stays).startswith(b"HTTP/1.1 204")
        stays.close()
        with autocommit(database_url) as cur:
            cur.execute(
                "SELECT email FROM users WHERE email LIKE %s OR id = %s",
                (f"%-{tag}@example.com", uid),
            )
            assert cur.fetchall() == []
        lines = wait_until(
            lambda: server.log_lines(f'"request_id":"gone-{tag}"'), 10, "the access line"
        )
        assert json.loads(lines[-1])["status"] == 499


def test_the_service_refuses_to_start_with_a_certificate(database_url, tmp_path):
    server = Gunicorn(database_url, tmp_path / "gunicorn.log", WEB_CONCURRENCY="1")
    server.env["GUNICORN_CMD_ARGS"] += " --certfile=/nonexistent.pem --keyfile=/nonexistent.key"
    server.refused()
    assert "terminate TLS in front of it" in server.log

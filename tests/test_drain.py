"""The drain on SIGTERM, for rolling deploys: `/readyz` answers 503 at once while the service
serves on for DRAIN_SECONDS, each response closing its connection; then the listeners close,
idle connections are closed, the requests in flight finish, and no server connection is left.

The production command on 127.0.0.1 with a real PostgreSQL. A lock on `users` held by the test
keeps requests in flight across the SIGTERM. The bounds are coarse: the drain is short here
(DRAIN_SECONDS=2), and each bound leaves at least half a second to a loaded machine.
"""

import http.client
import re
import signal
import socket
import time

import gevent
import pytest
from gunicorn_proc import (
    HOST,
    MISSING_USER,
    Gunicorn,
    free_port,
    refuses_connections,
    request,
    wait_until,
)
from pgutil import APP_NAME, autocommit, backends, seed_users, users_locked, waiting_on_lock

from service.api import health
from service.app import create_app
from service.server.connections import DRAIN, ClientSocket, Closes, Deadlines, WaitingForHead

DRAIN_S = 2.0
GRACEFUL_TIMEOUT_S = 25  # gunicorn.conf.py
READY_503_WITHIN_S = 1.0  # the bound, from the SIGTERM
MARGIN_S = 0.5  # the test's requests stop this long before the drain ends
EXIT_WITHIN_S = 3.0  # after the drain or the last request in flight: checks, pool close, reap
IN_FLIGHT = 3  # fewer than DB_POOL_MAX: /readyz still finds a free connection before SIGTERM
SERVER_ENV = {
    "WEB_CONCURRENCY": "2",
    "DB_POOL_MAX": "4",
    "DB_POOL_TIMEOUT": "10",
    "DB_STATEMENT_TIMEOUT_MS": "15000",
    "DRAIN_SECONDS": str(DRAIN_S),
}

pytestmark = pytest.mark.timing


def readyz(port: int) -> tuple[int, str | None]:
    """/readyz's status, and the error code of a 503."""
    reply = request(port, "GET", "/readyz", timeout=5)
    return reply.status, (reply.json["error"]["code"] if reply.status == 503 else None)


def requests_on_the_lock(gunicorn: Gunicorn, admin, n: int) -> list[gevent.Greenlet]:
    """`n` deletes of a user that does not exist (404), started while the caller holds
    `users_locked`; returns once each waits on the lock with a pooled connection of its own
    (lookups and pages would share statements: service/db/batch.py)."""
    clients = [gevent.spawn(request, gunicorn.port, "DELETE", MISSING_USER) for _ in range(n)]
    wait_until(lambda: waiting_on_lock(admin, APP_NAME) == n, 10, "requests on the lock")
    return clients


def no_connection_left(admin) -> None:
    wait_until(lambda: not backends(admin, APP_NAME), 10, "the service's connections to close")


def test_sigterm_drains_readyz_503_at_once_while_requests_are_served_then_refuses(
    fresh_database, tmp_path
):
    with (
        Gunicorn(fresh_database, tmp_path / "gunicorn.log", **SERVER_ENV) as gunicorn,
        autocommit(fresh_database) as admin,
    ):
        seed_users(admin, 1)
        with users_locked(fresh_database):
            in_flight = requests_on_the_lock(gunicorn, admin, IN_FLIGHT)
            assert readyz(gunicorn.port) == (200, None)
            gunicorn.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_until(
                lambda: readyz(gunicorn.port) == (503, "draining"),
                READY_503_WITHIN_S,
                "/readyz to answer 503 draining",
            )
            # Liveness holds, and every response tells its client to reconnect.
            alive = request(gunicorn.port, "GET", "/healthz")
            assert (alive.status, alive.headers.get("Connection")) == (200, "close")
        # The lock is released during the drain: the requests in flight complete.
        assert [client.get(timeout=10).status for client in in_flight] == [404] * IN_FLIGHT
        assert time.monotonic() < signalled + DRAIN_S - MARGIN_S, "too slow to test the drain"

        served = []
        while time.monotonic() < signalled + DRAIN_S - MARGIN_S:  # bounded: the drain's length
            n = len(served)
            created = request(
                gunicorn.port, "POST", "/users", {"name": f"D {n}", "email": f"d{n}@example.com"}
            )
            listed = request(gunicorn.port, "GET", "/users?limit=1")
            ready, alive = readyz(gunicorn.port), request(gunicorn.port, "GET", "/healthz")
            served.append(
                (
                    (created.status, created.headers.get("Connection")),
                    (listed.status, listed.headers.get("Connection")),
                    ready,
                    alive.status,
                )
            )
        assert served
        assert set(served) == {((201, "close"), (200, "close"), (503, "draining"), 200)}

        wait_until(
            lambda: refuses_connections(gunicorn.port), DRAIN_S + 3, "the listeners to close"
        )
        refused_s = time.monotonic() - signalled
        code = gunicorn.proc.wait(timeout=GRACEFUL_TIMEOUT_S)
        exited_s = time.monotonic() - signalled
        no_connection_left(admin)
    assert code == 0
    assert DRAIN_S - MARGIN_S < refused_s < DRAIN_S + EXIT_WITHIN_S
    assert exited_s < DRAIN_S + EXIT_WITHIN_S
    assert "graceful timeout" not in gunicorn.log
    assert len(gunicorn.log_lines("draining: /readyz answers 503")) == 2  # each worker


def test_requests_in_flight_after_the_drain_finish_while_new_connections_are_refused(
    fresh_database, tmp_path
):
    with (
        Gunicorn(fresh_database, tmp_path / "gunicorn.log", **SERVER_ENV) as gunicorn,
        autocommit(fresh_database) as admin,
    ):
        seed_users(admin, 1)
        with users_locked(fresh_database):
            in_flight = requests_on_the_lock(gunicorn, admin, IN_FLIGHT)
            gunicorn.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_until(
                lambda: refuses_connections(gunicorn.port), DRAIN_S + 3, "the listeners to close"
            )
            assert time.monotonic() - signalled > DRAIN_S - MARGIN_S  # served through the drain
            # Past the drain, the requests still wait on the lock, their workers with them.
            assert waiting_on_lock(admin, APP_NAME) == IN_FLIGHT
            assert gunicorn.proc.poll() is None
            released = time.monotonic()
        assert [client.get(timeout=10).status for client in in_flight] == [404] * IN_FLIGHT
        code = gunicorn.proc.wait(timeout=GRACEFUL_TIMEOUT_S)
        exited = time.monotonic()
        no_connection_left(admin)
    assert code == 0
    assert exited - released < EXIT_WITHIN_S
    assert exited - signalled < GRACEFUL_TIMEOUT_S
    assert "graceful timeout" not in gunicorn.log


def test_a_request_still_running_near_graceful_timeout_is_ended_before_the_sigkill(
    fresh_database, tmp_path
):
    graceful_s = 7  # the drain (2 s) leaves the request 2 s before the forced stop (3 s)
    gunicorn = Gunicorn(
        fresh_database, tmp_path / "gunicorn.log", **{**SERVER_ENV, "WEB_CONCURRENCY": "1"}
    )
    gunicorn.env["GUNICORN_CMD_ARGS"] += f" --graceful-timeout {graceful_s}"
    with gunicorn, autocommit(fresh_database) as admin:
        seed_users(admin, 1)
        with users_locked(fresh_database):
            [held] = requests_on_the_lock(gunicorn, admin, 1)
            gunicorn.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = gunicorn.proc.wait(timeout=graceful_s + 5)
            exited_s = time.monotonic() - signalled
        no_connection_left(admin)
    assert code == 0
    # The worker ended its request and closed its pool itself, before the master's SIGKILL.
    assert exited_s < graceful_s
    assert "Worker graceful timeout" in gunicorn.log
    assert "SIGKILL" not in gunicorn.log
    with pytest.raises((OSError, http.client.HTTPException)):
        held.get(timeout=5)


def closes_by_drain(gunicorn: Gunicorn) -> int:
    """Connections the workers closed for the drain, from their summary log lines."""
    found = (re.search(r"drain (\d+)", line) for line in gunicorn.log_lines("closed by the server"))
    return sum(int(match.group(1)) for match in found if match)


def exchange(sock: socket.socket) -> bytes:
    """Send GET /healthz on `sock` and return the response's head, once its body is in too."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before a response"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head


def test_idle_keepalive_connections_are_closed_when_the_drain_ends_not_at_their_timeout(
    fresh_database, tmp_path
):
    env = {**SERVER_ENV, "WEB_CONCURRENCY": "1", "HTTP_KEEPALIVE_TIMEOUT": "20"}
    with (
        Gunicorn(fresh_database, tmp_path / "gunicorn.log", **env) as gunicorn,
        socket.create_connection((HOST, gunicorn.port), timeout=10) as idle,
        socket.create_connection((HOST, gunicorn.port), timeout=10) as used,
    ):
        for sock in (idle, used):
            head = exchange(sock)
            assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head

        gunicorn.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: readyz(gunicorn.port)[0] == 503, READY_503_WITHIN_S, "the drain")
        # A keep-alive connection used during the drain is answered, then closed by the server.
        head = exchange(used)
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
        assert used.recv(1) == b""

        # The idle one is closed when the drain ends, not HTTP_KEEPALIVE_TIMEOUT after its use.
        assert idle.recv(1) == b""  # waits for the server to close it, for 10 s at most
        closed_s = time.monotonic() - signalled
        code = gunicorn.proc.wait(timeout=GRACEFUL_TIMEOUT_S)
        exited_s = time.monotonic() - signalled
    assert code == 0
    assert DRAIN_S - MARGIN_S < closed_s < DRAIN_S + EXIT_WITHIN_S
    assert exited_s < DRAIN_S + EXIT_WITHIN_S
    assert closes_by_drain(gunicorn) == 1


@pytest.mark.parametrize("signals", [["SIGINT"], ["SIGTERM", "SIGINT"]])
def test_a_quick_stop_skips_the_drain_even_once_it_has_started(fresh_database, tmp_path, signals):
    env = {**SERVER_ENV, "DRAIN_SECONDS": "15"}
    with (
        Gunicorn(fresh_database, tmp_path / "gunicorn.log", **env) as gunicorn,
        autocommit(fresh_database) as admin,
    ):
        for name in signals:
            if name == "SIGINT" and "SIGTERM" in signals:
                wait_until(lambda: readyz(gunicorn.port)[0] == 503, 5, "the drain to start")
            gunicorn.proc.send_signal(getattr(signal, name))
            signalled = time.monotonic()
        code = gunicorn.proc.wait(timeout=GRACEFUL_TIMEOUT_S)
        exited_s = time.monotonic() - signalled
        no_connection_left(admin)
    assert code == 0
    assert exited_s < 5  # gunicorn's quick stop gives workers 2 s; the drain would take 15
    assert "SIGKILL" not in gunicorn.log


@pytest.mark.parametrize(
    ("drain", "cmd_args"), [("25", ""), ("22", ""), ("10", " --graceful-timeout 13")]
)
def test_a_drain_that_leaves_no_time_for_requests_in_flight_is_refused(
    database_url, tmp_path, drain, cmd_args
):
    gunicorn = Gunicorn(
        database_url, tmp_path / "gunicorn.log", **{**SERVER_ENV, "DRAIN_SECONDS": drain}
    )
    gunicorn.env["GUNICORN_CMD_ARGS"] += cmd_args
    gunicorn.refused()
    graceful = 13 if cmd_args else GRACEFUL_TIMEOUT_S
    [line] = gunicorn.log_lines(f"DRAIN_SECONDS={drain} leaves the requests in flight no time")
    assert f"graceful_timeout ({graceful} s)" in line


def test_readyz_answers_503_draining_without_the_database_and_healthz_200(make_settings):
    nobody_listens = f"postgresql://u:p@{HOST}:{free_port()}/x"
    app = create_app(make_settings(DATABASE_URL=nobody_listens))  # and no pool opened
    app.extensions[health.DRAINING] = True
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["error"]["code"] == "draining"
    assert ready.headers["Retry-After"] == "1"
    assert client.get("/healthz").status_code == 200


def test_close_idle_closes_connections_that_sent_no_byte_of_a_request():
    counted = []
    waiting = WaitingForHead()
    closes = Closes(counted.append)
    deadlines = Deadlines(60, 60, 60, 60)
    pairs = [socket.socketpair() for _ in range(4)]
    fresh, partial, answered, sent = (
        ClientSocket(server.detach(), deadlines, waiting, closes) for server, _ in pairs
    )
    try:
        pairs[1][1].sendall(b"GET / HT")  # part of a head: left to finish it
        assert partial.recv(64) == b"GET / HT"
        answered.request_started()
        answered.request_finished()  # idle between two requests
        pairs[3][1].sendall(b"GET / HTTP/1.1\r\n\r\n")  # sent, not yet read: to be served
        assert [s.awaiting_request for s in (fresh, partial, answered, sent)] == [
            True,
            False,
            True,
            True,
        ]
        assert waiting.close_idle(DRAIN) == 0  # all idle for less than IDLE_GRACE_S

        assert waiting.close_idle(DRAIN, grace_s=0) == 2
        closed_by = tuple(s.closed_by for s in (fresh, partial, answered, sent))
        assert closed_by == (DRAIN, None, DRAIN, None)
        assert counted == [DRAIN, DRAIN]
        assert len(waiting) == 2
        assert pairs[0][1].recv(1) == b""  # the client sees the server's end
    finally:
        for sock in (fresh, partial, answered, sent):
            sock.close()
        for _, client in pairs:
            client.close()

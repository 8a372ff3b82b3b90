"""What service/worker.py changes in gunicorn's gevent worker.

How many waiting connections the worker's listener accepts in one turn of the event loop: real
sockets on 127.0.0.1 and gevent's real loop. A burst of clients connects while the server is
busy elsewhere, so their connections wait in the kernel's accept queue, and a check watcher
counts the loop's turns while the server accepts them. gunicorn sets `max_accept = 1` on every
listener when it runs more than one worker; the tests set it the same way.

How many sends a response takes: a request parsed by gunicorn's own parser from a real socket,
answered through `OneSendResponse` on a real socket whose sends are counted, and read back by
the client whole.
"""

import socket

import gevent
import pytest
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.config import Config
from gunicorn.http import get_parser, wsgi
from gunicorn_proc import HOST, wait_until

from service.worker import (
    CONNECTIONS_PER_ACCEPT,
    HEAD_WITH_BODY_MAX,
    BatchAcceptingServer,
    OneSendResponse,
)

BURST = 50
HELD = 200  # connections a busy worker already serves


def turns_of_each_accept(
    server_class: type[StreamServer], held: int, burst: int = BURST
) -> list[int]:
    """With `held` connections open and served, accept a burst of `burst` more with
    `server_class` limited as gunicorn limits it; the loop turn in which each was accepted."""
    turn = 0
    accepted_in: list[int] = []
    release = Event()

    class Recording(server_class):
        def do_read(self):
            accepted = super().do_read()
            if accepted and len(self.pool) >= held:
                accepted_in.append(turn)
            return accepted

    def count_turn():
        nonlocal turn
        turn += 1

    def serve(conn, address):
        release.wait()
        conn.close()

    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(held + burst)
    server = Recording(listener, handle=serve, spawn=Pool(held + burst))
    server.max_accept = 1  # what gunicorn's GeventWorker.run() does when workers > 1
    counter = gevent.get_hub().loop.check()
    counter.start(count_turn)
    clients = []
    try:
        server.start()
        clients += [socket.create_connection(listener.getsockname()) for _ in range(held)]
        wait_until(lambda: len(server.pool) == held, 10, f"{held} connections held")
        gevent.sleep(0)  # run the pool's queued "accept again" callback before stopping
        server.stop_accepting()  # the burst queues up meanwhile, as behind a busy loop
        clients += [socket.create_connection(listener.getsockname()) for _ in range(burst)]
        server.start_accepting()
        wait_until(lambda: len(server.pool) == held + burst, 10, f"{burst} more accepted")
    finally:
        release.set()
        server.stop()
        listener.close()
        counter.close()
        for client in clients:
            client.close()
    return accepted_in


def test_a_busy_worker_accepts_a_burst_in_a_few_turns():
    turns = turns_of_each_accept(BatchAcceptingServer, held=HELD)

    # One per turn, plus one for every CONNECTIONS_PER_ACCEPT held: 21, 23, then the rest.
    assert len(set(turns)) <= 3, f"accepted over {len(set(turns))} turns"


def test_an_idle_worker_accepts_one_connection_per_turn_as_gunicorn_does():
    """So that a burst reaching idle workers is shared between them."""
    turns = turns_of_each_accept(BatchAcceptingServer, held=0, burst=CONNECTIONS_PER_ACCEPT)

    assert len(set(turns)) == CONNECTIONS_PER_ACCEPT


def test_gevents_server_as_gunicorn_limits_it_accepts_one_per_turn_however_busy():
    """The problem the worker solves: behind 200 connections, the burst takes 50 turns."""
    turns = turns_of_each_accept(StreamServer, held=HELD)

    assert len(set(turns)) == BURST


class CountingSocket:
    """A real socket whose sends are recorded: each call is one send to the kernel."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sends: list[bytes] = []

    def send(self, data) -> int:
        sent = self.sock.send(data)
        self.sends.append(bytes(data[:sent]))
        return sent

    def sendall(self, data) -> None:
        self.sock.sendall(data)
        self.sends.append(bytes(data))

    def __getattr__(self, name):
        return getattr(self.sock, name)


def respond(
    response_class: type[wsgi.Response],
    status: str,
    headers: list[tuple[str, str]],
    chunks: list[bytes],
    method: str = "GET",
) -> tuple[list[bytes], bytes]:
    """Answer one request through `response_class` as gunicorn's worker does; the sends it
    made, and everything the client received."""
    client, server = socket.socketpair()
    try:
        client.sendall(f"{method} /x HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        req = next(get_parser(Config(), server, ("127.0.0.1", 40000)))
        counting = CountingSocket(server)
        resp = response_class(req, counting, Config())
        resp.start_response(status, headers)
        for chunk in chunks:
            resp.write(chunk)
        resp.close()
        server.shutdown(socket.SHUT_WR)
        received = b""
        while data := client.recv(1 << 20):
            received += data
        return counting.sends, received
    finally:
        client.close()
        server.close()


JSON_200 = ("200 OK", [("Content-Type", "application/json"), ("Content-Length", "11")])


def test_a_small_answer_goes_in_one_send():
    sends, received = respond(OneSendResponse, *JSON_200, [b'{"ok":true}'])

    assert len(sends) == 1
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b'Content-Length: 11\r\n\r\n{"ok":true}')


def test_gunicorns_own_response_takes_two_sends_for_it():
    """The cost OneSendResponse removes: a head and a body, each sent on its own."""
    sends, received = respond(wsgi.Response, *JSON_200, [b'{"ok":true}'])

    assert len(sends) == 2
    assert received == b"".join(sends)


@pytest.mark.parametrize(("status", "method"), [("204 No Content", "DELETE"), ("200 OK", "HEAD")])
def test_an_answer_without_a_body_sends_its_head_when_it_ends(status, method):
    headers = [] if status.startswith("204") else JSON_200[1]
    sends, received = respond(OneSendResponse, status, headers, [b""], method=method)

    assert len(sends) == 1
    assert received.startswith(f"HTTP/1.1 {status}\r\n".encode())
    assert received.endswith(b"\r\n\r\n")


def test_a_chunked_answer_sends_its_head_with_the_first_chunk_and_ends_well_framed():
    headers = [("Content-Type", "application/json")]  # no length: HTTP/1.1 chunks it
    sends, received = respond(OneSendResponse, "200 OK", headers, [b"[1,", b"2]"])

    assert len(sends) == 3  # head with the first chunk, the second, the last (empty) one
    head, body = received.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n"


def test_a_large_body_follows_its_head_whole_without_being_copied_behind_it():
    body = bytes(range(256)) * (HEAD_WITH_BODY_MAX // 256 + 1)
    headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))]
    sends, received = respond(OneSendResponse, "200 OK", headers, [body])

    assert sends[0].endswith(b"\r\n\r\n")  # the head alone
    assert b"".join(sends[1:]) == body
    assert received == b"".join(sends)


def test_gunicorn_builds_each_response_from_the_class_the_worker_installs(monkeypatch):
    """GeventWorker.run() replaces `wsgi.Response`; gunicorn's create() must look it up."""
    monkeypatch.setattr(wsgi, "Response", OneSendResponse)
    client, server = socket.socketpair()
    try:
        client.sendall(b"GET /x HTTP/1.1\r\nHost: test\r\n\r\n")
        req = next(get_parser(Config(), server, ("127.0.0.1", 40000)))
        resp, _ = wsgi.create(req, server, ("127.0.0.1", 40000), (HOST, 8000), Config())
    finally:
        client.close()
        server.close()

    assert type(resp) is OneSendResponse

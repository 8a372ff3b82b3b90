"""What service/server/worker.py changes in gunicorn's gevent worker: how many waiting
connections a listener accepts in one turn of the event loop.

Real sockets on 127.0.0.1 and gevent's real loop. A burst of clients connects while the server
is busy elsewhere, so their connections wait in the kernel's accept queue, and a check watcher
counts the loop's turns while the server accepts them. gunicorn's own worker sets
`max_accept = 1` on every listener when it runs more than one worker; the last test does the
same to show the problem. tests/test_e2e.py checks that real gunicorn runs this worker.
"""

import socket

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn_proc import HOST, Gunicorn, request, wait_until

from service.server.connections import Closes, Deadlines
from service.server.worker import CONNECTIONS_PER_ACCEPT, BatchAcceptingServer

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
        release.wait(30)
        conn.close()

    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(held + burst)
    own = {}
    if issubclass(server_class, BatchAcceptingServer):  # deadlines far beyond the test
        own = {"deadlines": Deadlines(60, 60, 60, 60), "closes": Closes(lambda reason: None)}
    server = Recording(listener, handle=serve, spawn=Pool(held + burst), **own)
    if server_class is StreamServer:
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


def test_gunicorn_runs_this_worker_and_each_listener_accepts_in_batches(database_url, tmp_path):
    """The production command uses it; each worker says so once its listeners accept."""
    env = {"WEB_CONCURRENCY": "2", "DB_POOL_MAX": "2"}
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        assert request(gunicorn.port, "GET", "/healthz").status == 200
        lines = wait_until(
            lambda: (
                len(found := gunicorn.log_lines("accepting 1 connection per loop turn")) == 2
                and found
            ),
            10,
            "both workers to accept",
        )
    assert gunicorn.log_lines("Using worker: service.server.worker.GeventWorker")
    assert all(f"plus 1 per {CONNECTIONS_PER_ACCEPT} held" in line for line in lines)

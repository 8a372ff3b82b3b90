"""The worker's listener accepts a burst of waiting connections in one turn of the event loop.

Real sockets on 127.0.0.1 and gevent's real loop: clients connect before the server starts, so
their connections wait in the kernel's accept queue, and a check watcher counts the loop's
turns while the server accepts them. gunicorn sets `max_accept = 1` on every listener when it
runs more than one worker; the tests set it the same way.
"""

import socket

import gevent
from gevent.server import StreamServer
from gunicorn_proc import HOST, wait_until

from service.worker import BatchAcceptingServer

BURST = 50


def turns_of_each_accept(server_class: type[StreamServer]) -> list[int]:
    """Accept a burst of BURST waiting connections with `server_class` limited as gunicorn
    limits it; the loop turn in which each connection was accepted."""
    turn = 0
    accepted_in: list[int] = []

    class Recording(server_class):
        def do_read(self):
            accepted = super().do_read()
            if accepted:
                accepted_in.append(turn)
            return accepted

    def count_turn():
        nonlocal turn
        turn += 1

    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(BURST * 2)
    clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(BURST)]
    counter = gevent.get_hub().loop.check()
    counter.start(count_turn)
    server = Recording(listener, handle=lambda conn, address: conn.close())
    server.max_accept = 1  # what gunicorn's GeventWorker.run() does when workers > 1
    try:
        server.start()
        wait_until(lambda: len(accepted_in) == BURST, 10, f"{BURST} connections accepted")
    finally:
        server.stop()
        listener.close()
        counter.close()
        for client in clients:
            client.close()
    return accepted_in


def test_a_burst_of_waiting_connections_is_accepted_in_one_loop_turn():
    turns = turns_of_each_accept(BatchAcceptingServer)

    assert len(set(turns)) == 1, f"accepted over {len(set(turns))} turns"


def test_gevents_server_as_gunicorn_limits_it_accepts_one_connection_per_turn():
    """The problem the worker solves: the same burst takes as many turns as connections."""
    turns = turns_of_each_accept(StreamServer)

    assert len(set(turns)) == BURST

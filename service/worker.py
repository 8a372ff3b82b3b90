"""The gunicorn worker: gunicorn's gevent worker, accepting new connections in batches,
letting requests into the app through its door (service/admission.py), sending each
response's head together with its body, and collecting garbage less often (`GC_THRESHOLDS`).

Accepting in batches

With more than one worker, gunicorn's gevent worker accepts one connection per turn of the
event loop (benoitc/gunicorn#2266), so that a worker busy with CPU-bound requests leaves new
connections to the others. Here the turns are long precisely when many clients are connected:
a worker with hundreds of keep-alive connections serves each ready one in a turn, so a burst of
new connections waited in the kernel's accept queue for seconds, one accept per turn, while
the connections already accepted were served. Those waits were the tail of the latency at 500
clients and more, although nothing inside the worker waited that long.

This worker scales the limit with the connections it holds: one more connection per turn for
every `CONNECTIONS_PER_ACCEPT` it serves, up to gevent's own limit of `ACCEPT_BATCH`. A turn
lasts as long as serving the worker's ready connections takes, which grows with the
connections it holds; a batch that grows with them keeps its accepts per second from falling
as it gets busier, and a burst of new connections from waiting turn after turn. A worker
that holds few connections still accepts one per turn, as gunicorn does, so that a burst
arriving at idle workers is shared between them rather than taken whole by the first one
awake. Of 150 bursts of 16 connections into two idle workers, one worker took 15 or 16 in 19
with gevent's flat limit of 100, in 0-1 with gunicorn's, in 2-3 with this one (the OS decides
which worker wakes first, and one holding 10 connections accepts 2 per turn).

One send per response

gunicorn writes a response's head and its body in two `sendall` calls. With TCP_NODELAY (which
gunicorn sets) each becomes a packet of its own, so every small JSON answer cost two sends, two
packets and two wake-ups of the client, where one would do. `OneSendResponse` holds the head
and sends it with the first body bytes (or alone, when the response ends without a body), with
one `send()` where gevent's `sendall()` also asks the socket for its buffer size each time.
On this machine (2 cores shared by wrk, gunicorn and PostgreSQL, 500 connections, medians of
alternating runs), `/healthz` took 0.50 instead of 0.59 ms of server CPU per request (4 runs
each) and answered 3,455 instead of 3,202 requests/s; `GET /users/<id>` was unchanged within
the noise (0.931 against 0.937 ms, 1,711 against 1,690 requests/s, 12 runs each).

gunicorn's master imports this module to learn the worker class, so a reload (`kill -HUP`)
keeps the version it has; a restart picks up a change here.
"""

from __future__ import annotations

import gc
import logging

from gevent.server import StreamServer
from gunicorn.http import wsgi
from gunicorn.workers import ggevent

from service import admission

log = logging.getLogger(__name__)

# gevent's default for StreamServer.max_accept: the most accepted in one turn. The accept loop
# also stops at an empty queue and when the worker holds worker_connections connections.
ACCEPT_BATCH = 100
CONNECTIONS_PER_ACCEPT = 10
# A body up to this size is copied behind the head and sent with it; a larger one is sent after
# the head, where the copy would cost more than the second send saves.
HEAD_WITH_BODY_MAX = 64 * 1024
# Python's cyclic garbage collector runs a young collection every 700 allocations (net) and,
# every 10 of those, an older one that walks every object the worker holds alive. Thousands of
# open connections keep a greenlet, a socket and gunicorn's parser each alive, so the older
# walks grow with the connections held. At 5,000 connections they took 6.5% of a worker's CPU
# (timed with gc.callbacks); with these thresholds 2.5%, and a worker's CPU per request fell
# 6% at 5,000 connections and 4% at 500 (medians of 8 alternating rounds). Everything the
# default would collect is still collected, later: the young generation holds 20,000 objects.
GC_THRESHOLDS = (20_000, 20, 20)


class BatchAcceptingServer(StreamServer):
    """gevent's StreamServer, accepting per turn one connection, plus one for every
    `CONNECTIONS_PER_ACCEPT` it holds, up to `ACCEPT_BATCH`; gunicorn's `max_accept = 1` is
    ignored."""

    @property
    def max_accept(self) -> int:
        held = len(self.pool) if self.pool is not None else 0
        return min(ACCEPT_BATCH, 1 + held // CONNECTIONS_PER_ACCEPT)

    @max_accept.setter
    def max_accept(self, value: int) -> None:
        pass  # gunicorn's per-instance limit; see the module's docstring

    def start(self) -> None:
        super().start()
        # Says that gunicorn built this class: were a gunicorn release to stop building its
        # servers from `ggevent.StreamServer`, the line would be missing (tests/test_e2e.py).
        address = self.address  # (host, port, ...) for TCP, a path for a Unix socket
        where = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else address
        log.info(
            "accepting 1 connection per loop turn, plus 1 per %d held, up to %d, on %s",
            CONNECTIONS_PER_ACCEPT,
            ACCEPT_BATCH,
            where,
        )


class _HeadHoldingSocket:
    """A connection's socket as one response writes to it: the first write, which is always
    the response's head, is held and sent with the next one, or by `flush()`."""

    __slots__ = ("_head", "_sock", "_started")

    def __init__(self, sock) -> None:
        self._sock = sock
        self._head: bytes | None = None
        self._started = False

    def sendall(self, data: bytes) -> None:
        if not self._started:
            self._started = True
            self._head = data
            return
        head, self._head = self._head, None
        if head is not None:
            if len(data) <= HEAD_WITH_BODY_MAX:
                data = head + data
            else:
                self._send(head)
        self._send(data)

    def flush(self) -> None:
        """Send the head if it is still held: the response ended without a body."""
        head, self._head = self._head, None
        if head is not None:
            self._send(head)

    def sendfile(self, *args, **kwargs):
        self.flush()
        return self._sock.sendfile(*args, **kwargs)

    def _send(self, data: bytes) -> None:
        # One send() is enough for a small answer; gevent's sendall() costs a getsockopt() and
        # a loop more each time.
        sent = self._sock.send(data)
        if sent < len(data):
            self._sock.sendall(memoryview(data)[sent:])

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class OneSendResponse(wsgi.Response):
    """gunicorn's HTTP/1 response, its head sent together with its body's first bytes."""

    def __init__(self, req, sock, cfg, *args) -> None:
        super().__init__(req, _HeadHoldingSocket(sock), cfg, *args)

    def close(self) -> None:
        super().close()
        self.sock.flush()


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker (patching, graceful stop, keep-alive, its HTTP parser, all of it
    unchanged), whose listeners are `BatchAcceptingServer`s, whose requests wait at the app's
    door, and whose responses are `OneSendResponse`s."""

    def handle_request(self, listener_name, req, sock, addr):
        """gunicorn's, behind the app's door (service/admission.py) unless the path goes
        around it."""
        door = self.wsgi.extensions.get(admission.EXTENSION)
        if door is None or req.path in admission.AROUND:
            return super().handle_request(listener_name, req, sock, addr)
        ticket = door.enter()
        token = admission.current.set(ticket)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            admission.current.reset(token)
            if ticket.admitted:
                door.leave()

    def run(self) -> None:
        # gunicorn's run() builds each listener's server from this module-level name, and
        # gunicorn.http.wsgi.create() each HTTP/1 response from `wsgi.Response`; the worker
        # process runs nothing else, so replacing them here changes this worker only.
        ggevent.StreamServer = BatchAcceptingServer
        wsgi.Response = OneSendResponse  # tests/test_worker.py checks that create() uses it
        log.info("responses: each head sent together with its body")
        gc.set_threshold(*GC_THRESHOLDS)
        log.info("garbage collector thresholds: %s", gc.get_threshold())
        super().run()

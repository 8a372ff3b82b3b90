"""The gunicorn worker: gunicorn's gevent worker, accepting new connections in batches that grow
with the connections it holds.

With more than one worker, gunicorn's gevent worker accepts one connection per turn of the
event loop (benoitc/gunicorn#2266), so that a worker busy with CPU-bound requests leaves new
connections to the others. But a turn is long precisely when many clients are connected: a
worker with hundreds of keep-alive connections serves each ready one in a turn, so a burst of
new connections waits in the kernel's accept queue for seconds, one accept per turn. That wait
is the tail latency at hundreds of clients (docs/performance.md).

`BatchAcceptingServer` accepts, per turn, one connection plus one for every
`CONNECTIONS_PER_ACCEPT` it holds, up to gevent's own default of `ACCEPT_BATCH`. A worker that
holds few connections still accepts one per turn, as gunicorn's does, so that a burst arriving
at idle workers is shared between them rather than taken whole by the first one awake.

gunicorn builds its servers inside `GeventWorker.run()`, from a module-level name; every
gunicorn worker class defines its own `run()`, and so does this one: it builds its own servers
and otherwise does what gunicorn 27.0's does (keep-alive, graceful stop, `graceful_timeout`).
gunicorn is pinned to that minor release (requirements.txt), and tests/test_e2e.py checks the
graceful stop through real gunicorn.

Each accepted connection becomes a `ClientSocket` (service/server/connections.py), which keeps
the deadlines of its phase (head, body, write, idle) on every read and write; the worker moves
it from phase to phase around each request. A listener that takes its last free slot sheds the
connection that has waited longest for a request head.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from functools import partial

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.workers import ggevent

from config import load_settings
from service.observability import metrics
from service.server.connections import SHED, ClientSocket, Closes, Deadlines, WaitingForHead

log = logging.getLogger(__name__)

# gevent's default for StreamServer.max_accept: the most accepted in one turn. The accept loop
# also stops at an empty queue and when the worker holds worker_connections connections.
ACCEPT_BATCH = 100
CONNECTIONS_PER_ACCEPT = 10


class BatchAcceptingServer(StreamServer):
    """gevent's StreamServer, accepting per loop turn one connection, plus one for every
    `CONNECTIONS_PER_ACCEPT` it holds, up to `ACCEPT_BATCH`; its connections are
    `ClientSocket`s, and the one that takes the last free slot sheds the connection that has
    waited longest for a request head."""

    def __init__(self, *args, deadlines: Deadlines, closes: Closes, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadlines = deadlines
        self.closes = closes
        self.waiting_for_head = WaitingForHead()

    @property
    def max_accept(self) -> int:
        held = len(self.pool) if self.pool is not None else 0
        return min(ACCEPT_BATCH, 1 + held // CONNECTIONS_PER_ACCEPT)

    def do_read(self):
        accepted = super().do_read()
        if accepted is None:  # another worker took it
            return None
        client, address = accepted
        return (
            ClientSocket(client.detach(), self.deadlines, self.waiting_for_head, self.closes),
            address,
        )

    def do_handle(self, client: ClientSocket, address) -> None:
        if self.pool is not None and self.pool.free_count() <= 1:
            longest = self.waiting_for_head.longest_waiting()
            if longest is not None and longest is not client:
                longest.close_for(SHED)  # its greenlet ends at once, freeing its slot
        super().do_handle(client, address)


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker (patching, keep-alive, its HTTP parser, graceful stop), whose
    listeners are `BatchAcceptingServer`s."""

    def run(self) -> None:
        if self.cfg.is_ssl:  # gunicorn.conf.py refuses it at start; a ClientSocket is no SSLSocket
            raise RuntimeError("TLS is terminated in front of the service, not by gunicorn")
        settings = load_settings(os.environ)
        deadlines = Deadlines(
            head=settings.http_head_timeout,
            body=settings.http_body_timeout,
            write=settings.http_write_timeout,
            idle=self.cfg.keepalive,
        )
        self.closes = Closes(metrics.connection_closed)
        servers = []
        for sock in self.sockets:
            sock.setblocking(1)
            server = BatchAcceptingServer(
                sock,
                handle=partial(self.handle, sock),
                spawn=Pool(self.worker_connections),
                deadlines=deadlines,
                closes=self.closes,
            )
            server.start()
            servers.append(server)
        log.info(
            "accepting 1 connection per loop turn, plus 1 per %d held, up to %d; deadlines: %s",
            CONNECTIONS_PER_ACCEPT,
            ACCEPT_BATCH,
            deadlines,
        )
        while self.alive:
            self.notify()
            self.closes.log_if_due()
            gevent.sleep(1.0)
        self._stop(servers)

    def timeout_ctx(self):
        """gunicorn's limit on reading a request head (gevent.Timeout(keepalive) around its
        parser): none here, since every read on a `ClientSocket` keeps its own deadline."""
        return contextlib.nullcontext()

    def handle(self, listener, client: ClientSocket, addr) -> None:
        try:
            super().handle(listener, client, addr)
        finally:
            client.connection_ended()

    def handle_request(self, listener_name, req, sock: ClientSocket, addr):
        sock.request_started()
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            sock.request_finished()

    def _stop(self, servers: list[BatchAcceptingServer]) -> None:
        """Stop accepting, let the requests in flight finish for up to `graceful_timeout`, then
        end the rest (gunicorn's own sequence)."""
        for server in servers:
            server.close()
        started = time.time()
        while time.time() - started <= self.cfg.graceful_timeout:
            if all(server.pool.free_count() == server.pool.size for server in servers):
                self.closes.log_if_due(at_exit=True)
                return
            self.notify()
            gevent.sleep(1.0)
        self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
        for server in servers:
            server.stop(timeout=1)
        self.closes.log_if_due(at_exit=True)

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
and otherwise does what gunicorn 27.0's does (keep-alive, graceful stop, `graceful_timeout`),
its graceful stop starting with a drain (below). gunicorn is pinned to that minor release
(requirements.txt), and tests/test_e2e.py and tests/test_drain.py check the graceful stop
through real gunicorn.

Each accepted connection becomes a `ClientSocket` (service/server/connections.py), which keeps
the deadlines of its phase (head, body, write, idle) on every read and write; the worker moves
it from phase to phase around each request. A listener that takes its last free slot sheds the
connection that has waited longest for a request head.

SIGTERM starts a drain, for a rolling deploy behind a load balancer: at once the app is marked
draining (`/readyz` answers 503, service/api/health.py) while the worker keeps accepting and
serving for DRAIN_SECONDS from the signal, each response with `Connection: close` (gunicorn's
own `handle_request` does that once `alive` is false), so that clients move to new connections,
which the load balancer sends to ready instances. Then the worker closes its listeners and its
idle connections and lets the requests in flight finish, up to `graceful_timeout` from the
signal less `FORCED_STOP_S`; whatever still runs then is ended, and the pool is closed
(gunicorn.conf.py's `worker_exit`) before the master's SIGKILL at `graceful_timeout`. SIGINT
and SIGQUIT stay gunicorn's quick stop: no drain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from functools import partial

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.workers import ggevent

from config import load_settings
from service.api import health
from service.observability import metrics
from service.server import refusals
from service.server.connections import (
    DRAIN,
    SHED,
    ClientSocket,
    Closes,
    Deadlines,
    WaitingForHead,
)

log = logging.getLogger(__name__)

# gevent's default for StreamServer.max_accept: the most accepted in one turn. The accept loop
# also stops at an empty queue and when the worker holds worker_connections connections.
ACCEPT_BATCH = 100
CONNECTIONS_PER_ACCEPT = 10
# What a forced stop needs before the master's SIGKILL: gevent's StreamServer.stop(timeout=1)
# waits up to 1 s for the handlers, then up to 1 s for those it kills (one waiting on a query
# may not die), and 1 s is left for the worker's exit (worker_exit closes the pool).
FORCED_STOP_S = 3.0


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
            longest = self.waiting_for_head.sheddable(client)
            if longest is not None:
                longest.close_for(SHED)  # its greenlet ends at once, freeing its slot
        super().do_handle(client, address)

    def close_idle_connections(self) -> int:
        """Shut down the connections that have sent no byte of a request since they were
        accepted or last answered (reason `drain`); returns how many. Their greenlets end at
        once; a connection partway through a head is left to finish it (or miss its deadline)."""
        return self.waiting_for_head.close_idle(DRAIN)


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker (patching, keep-alive, its HTTP parser, graceful stop), whose
    listeners are `BatchAcceptingServer`s, and whose graceful stop starts with a drain."""

    # time.monotonic() of the SIGTERM that started the drain; None until then.
    draining_since: float | None = None
    drain_seconds = 0.0

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM: mark the app draining at once (`/readyz` then answers 503), then stop as
        gunicorn does (`alive` false); `_stop()` serves on for DRAIN_SECONDS from now.

        A signal handler, run by whichever greenlet is running: it only sets values, and
        neither logs nor waits. Before the app is loaded there is nothing to mark.
        """
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            _mark_app_draining()
        super().handle_exit(sig, frame)

    def run(self) -> None:
        if self.cfg.is_ssl:  # gunicorn.conf.py refuses it at start; a ClientSocket is no SSLSocket
            raise RuntimeError("TLS is terminated in front of the service, not by gunicorn")
        settings = load_settings(os.environ)
        self.drain_seconds = settings.drain_seconds
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

    def handle_error(self, req, client, addr, exc) -> None:
        """A request gunicorn could not parse or frame: refused in the API's JSON error shape
        (service/server/refusals.py), logged as gunicorn logs it; anything else as gunicorn
        answers it (500)."""
        refusal = refusals.answer(exc)
        if refusal is None:
            super().handle_error(req, client, addr, exc)
            return
        peer = addr[0] if isinstance(addr, tuple) and addr else ""
        self.log.warning("Invalid request from ip=%s: %s", peer, exc)
        with contextlib.suppress(Exception):  # as gunicorn: a client already gone is no error
            util.write_nonblock(client, refusal)

    def _stop(self, servers: list[BatchAcceptingServer]) -> None:
        """After a SIGTERM, serve on until DRAIN_SECONDS after it; then (at once for any other
        stop) close the listeners and the idle connections, and let the requests in flight
        finish, up to `graceful_timeout` from the stop less `FORCED_STOP_S`; then end the rest
        (gunicorn's forced stop), so that the pool closes before the master's SIGKILL.

        Meanwhile the master is told every second that the worker is alive (`notify()`)."""
        stopping_since = time.monotonic() if self.draining_since is None else self.draining_since
        if self.draining_since is not None and self.drain_seconds:
            _mark_app_draining()  # again, for a SIGTERM that came while the app was loading
            self.log.info(
                "draining: /readyz answers 503; serving until %g s after the SIGTERM",
                self.drain_seconds,
            )
            self._serve_until(stopping_since + self.drain_seconds)
        for server in servers:
            server.close()
        idle = sum(server.close_idle_connections() for server in servers)
        in_flight = sum(len(server.pool) for server in servers)
        self.log.info(
            "listeners closed; %d idle connections closed, %d connections in flight",
            idle,
            in_flight,
        )
        finish_by = stopping_since + self.cfg.graceful_timeout - FORCED_STOP_S
        if not self._finish_in_flight(servers, finish_by):
            self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
            for server in servers:
                server.stop(timeout=1)
        self.closes.log_if_due(at_exit=True)

    def _serve_until(self, until: float) -> None:
        """Serve on, accepting, until `until` (time.monotonic())."""
        while (remaining := until - time.monotonic()) > 0:
            self.notify()
            self.closes.log_if_due()
            gevent.sleep(min(1.0, remaining))

    def _finish_in_flight(self, servers: list[BatchAcceptingServer], until: float) -> bool:
        """Wait until the connections of closed listeners end, or `until` (time.monotonic());
        whether they all did."""
        for server in servers:
            while not server.pool.join(timeout=min(1.0, max(0.0, until - time.monotonic()))):
                if time.monotonic() >= until:
                    return False
                self.notify()
        return True


def _mark_app_draining() -> None:
    """Tell this worker's app that it is draining (service/api/health.py), once it is loaded."""
    wsgi = sys.modules.get("service.server.wsgi")  # absent until the worker loads the app
    app = getattr(wsgi, "app", None)
    if app is not None:
        app.extensions[health.DRAINING] = True

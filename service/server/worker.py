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
"""

from __future__ import annotations

import logging
import time
from functools import partial

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.sock import ssl_context
from gunicorn.workers import ggevent

log = logging.getLogger(__name__)

# gevent's default for StreamServer.max_accept: the most accepted in one turn. The accept loop
# also stops at an empty queue and when the worker holds worker_connections connections.
ACCEPT_BATCH = 100
CONNECTIONS_PER_ACCEPT = 10


class BatchAcceptingServer(StreamServer):
    """gevent's StreamServer, accepting per loop turn one connection, plus one for every
    `CONNECTIONS_PER_ACCEPT` it holds, up to `ACCEPT_BATCH`."""

    @property
    def max_accept(self) -> int:
        held = len(self.pool) if self.pool is not None else 0
        return min(ACCEPT_BATCH, 1 + held // CONNECTIONS_PER_ACCEPT)


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker (patching, keep-alive, its HTTP parser, graceful stop), whose
    listeners are `BatchAcceptingServer`s."""

    def run(self) -> None:
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for sock in self.sockets:
            sock.setblocking(1)
            server = BatchAcceptingServer(
                sock,
                handle=partial(self.handle, sock),
                spawn=Pool(self.worker_connections),
                **ssl_args,
            )
            server.start()
            servers.append(server)
        log.info(
            "accepting 1 connection per loop turn, plus 1 per %d held, up to %d",
            CONNECTIONS_PER_ACCEPT,
            ACCEPT_BATCH,
        )
        while self.alive:
            self.notify()
            gevent.sleep(1.0)
        self._stop(servers)

    def _stop(self, servers: list[BatchAcceptingServer]) -> None:
        """Stop accepting, let the requests in flight finish for up to `graceful_timeout`, then
        end the rest (gunicorn's own sequence)."""
        for server in servers:
            server.close()
        started = time.time()
        while time.time() - started <= self.cfg.graceful_timeout:
            if all(server.pool.free_count() == server.pool.size for server in servers):
                return
            self.notify()
            gevent.sleep(1.0)
        self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
        for server in servers:
            server.stop(timeout=1)

"""The gunicorn worker: gunicorn's gevent worker, accepting new connections in batches.

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

gunicorn's master imports this module to learn the worker class, so a reload (`kill -HUP`)
keeps the version it has; a restart picks up a change here.
"""

from __future__ import annotations

import logging

from gevent.server import StreamServer
from gunicorn.workers import ggevent

log = logging.getLogger(__name__)

# gevent's default for StreamServer.max_accept: the most accepted in one turn. The accept loop
# also stops at an empty queue and when the worker holds worker_connections connections.
ACCEPT_BATCH = 100
CONNECTIONS_PER_ACCEPT = 10


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


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker (patching, graceful stop, keep-alive, its HTTP parser, all of it
    unchanged), whose listeners are `BatchAcceptingServer`s."""

    def run(self) -> None:
        # gunicorn's run() builds each listener's server from this module-level name; the
        # worker process runs nothing else, so replacing it here changes this worker only.
        ggevent.StreamServer = BatchAcceptingServer
        super().run()

"""The gunicorn worker: gunicorn's gevent worker, accepting new connections in batches.

With more than one worker, gunicorn's gevent worker accepts one connection per turn of the
event loop (benoitc/gunicorn#2266), so that a worker busy with CPU-bound requests leaves new
connections to the others. Here the turns are long precisely when many clients are connected:
a worker with hundreds of keep-alive connections serves each ready one in a turn, so a burst of
new connections waited in the kernel's accept queue for seconds, one accept per turn, while
the connections already accepted were served. Those waits were the tail of the latency at 500
clients and more, although nothing inside the worker waited that long.

This worker keeps gevent's own limit instead, up to `ACCEPT_BATCH` connections per turn: a new
connection then waits at most a turn, like every other, and what follows is the pool's
first-come first-served queue. Both workers still take their share: each is woken for the same
queue and accepts what is there when it looks.
"""

from __future__ import annotations

from gevent.server import StreamServer
from gunicorn.workers import ggevent

# gevent's default for StreamServer.max_accept. The accept loop also stops at an empty queue
# and when the worker holds worker_connections connections.
ACCEPT_BATCH = 100


class BatchAcceptingServer(StreamServer):
    """gevent's StreamServer, which keeps accepting up to `ACCEPT_BATCH` connections per turn
    when gunicorn sets its `max_accept` to 1."""

    @property
    def max_accept(self) -> int:
        return ACCEPT_BATCH

    @max_accept.setter
    def max_accept(self, value: int) -> None:
        pass  # gunicorn's per-instance limit; see the module's docstring


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker (patching, graceful stop, keep-alive, its HTTP parser, all of it
    unchanged), whose listeners are `BatchAcceptingServer`s."""

    def run(self) -> None:
        # gunicorn's run() builds each listener's server from this module-level name; the
        # worker process runs nothing else, so replacing it here changes this worker only.
        ggevent.StreamServer = BatchAcceptingServer
        super().run()

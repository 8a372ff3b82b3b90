"""Whether the client of the request in context is still there.

A request can wait long for its turn (in the kernel's accept queue, for a pool connection)
and its client may give up meanwhile. Serving it would do work nobody reads, and a write the
client believes failed, and may well send again. The pool asks `hung_up()` once it holds a
connection for the request (`service.db.CLIENT_GONE`), before anything is sent; a batch of
writes asks `closed()` of each write's socket once its statement holds one.
"""

from __future__ import annotations

import select

from flask import has_request_context, request
from gevent.monkey import get_original

_poll = get_original("select", "poll")
# The peer has shut down its sending side, or the connection is gone altogether. Bytes
# waiting to be read (a pipelined request) do not count: the client may still read.
_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR


def hung_up() -> bool:
    """Whether the request's client has closed (or half-closed) its connection; False outside
    a request, or under a server that does not expose the socket (`gunicorn.socket`).

    A client that half-closes after sending its request, and still reads the answer, counts
    as gone: HTTP/1.1 clients do not, and proxies treat it so too (nginx's 499).
    """
    if not has_request_context():
        return False
    return closed(socket_of_request())


def body_timed_out() -> bool:
    """Whether the server stopped reading the request's body at its deadline (the socket's
    `body_deadline_missed`, service/server/connections.py); False under another server."""
    return getattr(socket_of_request(), "body_deadline_missed", False)


def socket_of_request():
    """The client socket of the request in context, or None under a server that does not
    expose it (`gunicorn.socket`)."""
    return request.environ.get("gunicorn.socket")


def closed(sock) -> bool:
    """Whether the client on `sock` has closed (or half-closed) its connection, as `hung_up()`
    says it; False for None."""
    if sock is None:
        return False
    try:
        fileno = sock.fileno()
    except OSError:
        return True
    if fileno < 0:
        return True
    poller = _poll()
    poller.register(fileno, _GONE)
    return bool(poller.poll(0))

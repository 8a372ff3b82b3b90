"""Deadlines on the wire, and which connections give way when a worker's slots run out.

Every connection a worker accepts is a `ClientSocket`, and every read and write of gunicorn's
on it (its HTTP parser, the request body the app reads, the response gunicorn writes) runs
against one deadline, set by the phase the connection is in:

| phase | from | to | deadline |
|---|---|---|---|
| head | accept, or a later request's first byte | the end of the head | HTTP_HEAD_TIMEOUT |
| body | the end of the head | the response's first byte | HTTP_BODY_TIMEOUT |
| write | the response's first byte | its last | HTTP_WRITE_TIMEOUT |
| idle | the end of a response | the next request's first byte | HTTP_KEEPALIVE_TIMEOUT |

A deadline bounds the phase as a whole, not each read: a client sending one byte a second
gets no more time than one sending nothing. A later request whose head was partly sent with
the previous one (pipelined) has the idle and head deadlines together. The body phase spans
the app's work as well: HTTP_BODY_TIMEOUT bounds only reading, since the app never reads after
it has started a response, nor waits for the database before it has read the body.

A connection that misses its deadline is shut down: gunicorn then sees what it sees when a
client hangs up (end of input when reading, EPIPE when writing), and closes it without a log
line of its own. One that misses its body deadline is shut down for reading only: the app sees
a body cut short, which it refuses, and its answer (408, service/app.py) is still written,
within the write deadline, before the connection closes. The closes
are counted by reason in `/metrics` (`http_connections_closed_total`) and summed up in one log
line per worker at most every `LOG_EVERY_S`.

gunicorn writes a response's head alone, then its body: the socket holds the head and sends it
with the body's first write, one send per response (docs/performance.md).

A connection closed while the client's input is still unread (a body refused partway: broken
chunked framing, a trailer section over the limit) closes lingering, as nginx's
`lingering_close` does: closing a socket with unread input makes the kernel send a reset, which
can destroy the response at the client before it is read. So the server sends its end of input
after the response, then reads and discards what the client still sends, until it closes, or
`LINGER_MAX_BYTES`, or `LINGER_S`; then it closes.

When a worker takes the last free slot of a listener (WORKER_CONNECTIONS), the connection that
has waited longest for a request head (idle keep-alive, silent, or trickling) and has no input
waiting to be read is shed, reason `shed`, so that a slot stays free for the next client.
Connections whose request is being read or served are never shed. An idle keep-alive
connection may be closed at any time (RFC 9112 9.8), and clients retry on a new one.

When a stopping worker's drain is over, it closes the connections that sent no byte of a
request since they were accepted or last answered, have nothing waiting to be read, and have
been idle `IDLE_GRACE_S` at least, reason `drain` (`WaitingForHead.close_idle`): otherwise
each would hold the stop until its idle or head deadline. The others (a head partly in, a
request unread, a client just answered) are left to be served or to meet their deadlines.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket as stdlib_socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from gevent import socket as gsocket
from gevent.monkey import get_original

_poll = get_original("select", "poll")
_POLLIN = get_original("select", "POLLIN")

log = logging.getLogger(__name__)

HEAD, BODY, WRITE, IDLE, SHED, DRAIN = "head", "body", "write", "idle", "shed", "drain"
REASONS = (HEAD, BODY, WRITE, IDLE, SHED, DRAIN)
LOG_EVERY_S = 10.0
# The largest first write of a response held to leave with the next (a response head).
HOLD_MAX = 8192
# How long a connection must have been idle for the end of a drain to close it: a client that
# got its last answer just now may be sending its next request.
IDLE_GRACE_S = 1.0
# How many of the longest-waiting connections shedding looks at for one without input.
SHED_CANDIDATES = 8
# A lingering close (below): how long, and how many bytes, the client's unread input is read
# and discarded for, after the response, before the connection is closed all the same.
LINGER_S = 2.0
LINGER_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Deadlines:
    """Seconds allowed to each phase of a connection (see the module's table)."""

    head: float
    body: float
    write: float
    idle: float


class Closes:
    """Connections this worker closed for missing a deadline or to free a slot: counted at once
    (`count(reason)`), logged as one summary line when `log_if_due()` finds `LOG_EVERY_S`
    passed since the last (or the worker is exiting)."""

    def __init__(self, count: Callable[[str], None]) -> None:
        self._count = count
        self._since_log: Counter[str] = Counter()
        self._logged_at = time.monotonic()

    def closed(self, reason: str) -> None:
        self._count(reason)
        self._since_log[reason] += 1

    def log_if_due(self, at_exit: bool = False) -> None:
        now = time.monotonic()
        if not self._since_log or (now - self._logged_at < LOG_EVERY_S and not at_exit):
            return
        summary = ", ".join(f"{reason} {self._since_log[reason]}" for reason in REASONS)
        log.info(
            "connections closed by the server in the last %.0f s: %s",
            now - self._logged_at,
            summary,
        )
        self._since_log.clear()
        self._logged_at = now


class WaitingForHead:
    """A listener's connections that wait for a request head, longest-waiting first."""

    def __init__(self) -> None:
        self._sockets: dict[ClientSocket, None] = {}

    def add(self, sock: ClientSocket) -> None:
        self._sockets.pop(sock, None)
        self._sockets[sock] = None

    def discard(self, sock: ClientSocket) -> None:
        self._sockets.pop(sock, None)

    def close_idle(self, reason: str, grace_s: float = IDLE_GRACE_S) -> int:
        """Shut down (`close_for(reason)`) every connection that has sent no byte of a request
        since it was accepted or last answered, nor has one waiting to be read, and has been
        idle `grace_s` at least; returns how many. The others are left to be served, or to
        their deadlines: a request sent just before the close is answered, not dropped."""
        now = time.monotonic()
        idle = [
            sock
            for sock in self._sockets
            if sock.awaiting_request and now - sock.idle_since >= grace_s and not sock.has_input()
        ]
        for sock in idle:
            sock.close_for(reason)
        return len(idle)

    def sheddable(self, newcomer: ClientSocket) -> ClientSocket | None:
        """The longest waiting of the first `SHED_CANDIDATES` connections that has no input
        waiting to be read (a request that arrived is served, not shed), other than
        `newcomer`; None when there is none."""
        for sock, _ in zip(self._sockets, range(SHED_CANDIDATES), strict=False):
            if sock is not newcomer and not sock.has_input():
                return sock
        return None

    def __len__(self) -> int:
        return len(self._sockets)


class ClientSocket(gsocket.socket):
    """A gevent socket whose reads and writes keep the deadline of the connection's phase.

    The worker moves it from phase to phase: `request_started()` once gunicorn parsed a head,
    `request_finished()` once the response is written; the first write moves it to the write
    phase by itself. `close_for(reason)` shuts it down from any greenlet: a read waiting on it
    then returns end of input, and a write fails with EPIPE.
    """

    __slots__ = (
        "_awaiting_request",
        "_closed_by",
        "_closes",
        "_deadline",
        "_deadlines",
        "_held",
        "_idle_since",
        "_phase",
        "_waiting",
    )

    def __init__(
        self, fileno: int, deadlines: Deadlines, waiting: WaitingForHead, closes: Closes
    ) -> None:
        super().__init__(fileno=fileno)
        self._deadlines = deadlines
        self._waiting = waiting
        self._closes = closes
        self._closed_by: str | None = None
        self._held = b""
        self._idle_since = time.monotonic()
        self._phase = HEAD
        self._awaiting_request = True
        self._deadline = time.monotonic() + deadlines.head
        waiting.add(self)

    @property
    def closed_by(self) -> str | None:
        """Why the server shut this connection down (a `REASONS` entry), or None."""
        return self._closed_by

    @property
    def awaiting_request(self) -> bool:
        """True until a byte of a request arrives, from accept and from each response's end."""
        return self._awaiting_request

    @property
    def idle_since(self) -> float:
        """time.monotonic() of the accept, or of the last response's end."""
        return self._idle_since

    def has_input(self) -> bool:
        """Whether bytes (or the peer's end of input) wait to be read on the socket."""
        if self._closed_by is not None:
            return False
        poller = _poll()
        try:
            poller.register(self.fileno(), _POLLIN)
        except (OSError, ValueError):  # closed meanwhile
            return False
        return bool(poller.poll(0))

    def request_started(self) -> None:
        """The head is in: the body's deadline starts."""
        self._waiting.discard(self)
        self._phase = BODY
        self._deadline = time.monotonic() + self._deadlines.body

    def request_finished(self) -> None:
        """The response is out (a head still held is sent now): the wait for the next request
        starts."""
        self.flush()
        self._phase = IDLE
        self._awaiting_request = True
        self._idle_since = time.monotonic()
        self._deadline = self._idle_since + self._deadlines.idle
        self._waiting.add(self)

    def connection_ended(self) -> None:
        self._waiting.discard(self)

    def close_for(self, reason: str) -> None:
        """Shut the connection down, counted under `reason`; once only."""
        if self._closed_by is not None:
            return
        self._closed_by = reason
        self._waiting.discard(self)
        self._closes.closed(reason)
        # gevent wakes a greenlet waiting on the socket with an error, which _read() turns into
        # end of input; the peer gets a FIN, but for a missed body: its answer is still to go.
        # OSError: already gone at the peer's end.
        with contextlib.suppress(OSError):
            self.shutdown(stdlib_socket.SHUT_RD if reason == BODY else stdlib_socket.SHUT_RDWR)

    @property
    def body_deadline_missed(self) -> bool:
        """Whether the request body stopped coming at its deadline (HTTP_BODY_TIMEOUT)."""
        return self._closed_by == BODY

    def recv(self, *args):
        return self._read(super().recv, args, b"")

    def recv_into(self, *args):
        return self._read(super().recv_into, args, 0)

    def _read(self, read, args, nothing):
        """`read(*args)` within the phase's deadline; `nothing` (end of input) once the
        connection is shut down, whether it missed the deadline here or was shed."""
        if self._closed_by is None:
            remaining = self._deadline - time.monotonic()
            if remaining > 0:
                self.settimeout(remaining)
                try:
                    data = read(*args)
                except TimeoutError:
                    pass
                except OSError:
                    if self._closed_by is None:
                        raise
                    return nothing  # shut down from another greenlet while waiting
                else:
                    if data:
                        self._awaiting_request = False
                        if self._phase == IDLE:
                            self._phase = HEAD
                            self._deadline = time.monotonic() + self._deadlines.head
                    return data
            self.close_for(self._phase)
        return nothing

    def sendall(self, data, flags=0):
        """Send all of `data` within the write deadline, or raise EPIPE having shut the
        connection down. A response's first write (gunicorn writes the head alone, then the
        body) is held, up to `HOLD_MAX` bytes, and leaves with the next write, the response's
        end (`request_finished()`) or `close()`: one send per response instead of two."""
        if self._phase != WRITE:
            self._phase = WRITE
            self._deadline = time.monotonic() + self._deadlines.write
            if not flags and len(data) <= HOLD_MAX and self._closed_by is None:
                self._held = bytes(data)
                return None
        if self._held:
            data, self._held = self._held + data, b""
        return self._send(data, flags)

    def flush(self) -> None:
        """Send a held response head now."""
        if self._held:
            data, self._held = self._held, b""
            self._send(data, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # best effort: the connection is ending anyway
            self.flush()
            if self.has_input():
                self._linger()
        super().close()

    def _linger(self) -> None:
        """Send end of input, then read and discard the client's input until it closes, or
        `LINGER_MAX_BYTES`, or `LINGER_S` (raising TimeoutError then)."""
        self.shutdown(stdlib_socket.SHUT_WR)
        until = time.monotonic() + LINGER_S
        discarded = 0
        while discarded < LINGER_MAX_BYTES:
            self.settimeout(max(0.0, until - time.monotonic()))
            data = super().recv(65536)
            if not data:
                return
            discarded += len(data)

    def _send(self, data, flags):
        if self._closed_by is None or self._closed_by == BODY:
            remaining = self._deadline - time.monotonic()
            if remaining > 0:
                self.settimeout(remaining)
                try:
                    return super().sendall(data, flags)
                except TimeoutError:
                    pass
            self.close_for(WRITE)
        raise BrokenPipeError(errno.EPIPE, f"connection closed by the server ({self._closed_by})")
